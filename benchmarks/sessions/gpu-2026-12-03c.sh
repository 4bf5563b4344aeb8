#!/bin/bash
# The GPU session of 2026-12-03 (evening), first call
# (benchmarks/device_session.sh WAIT --script benchmarks/sessions/gpu-2026-12-03c.sh):
#   the fused analysis kernel's tests on CUDA, its tile settings and speed against the job's kernel,
#   one task's read step by step, the performance issue's 1M cases, then the 4M analysis benchmark.
set -u
S=${STATE:?}
. "$(dirname "$0")/steps.sh"  # step NAME SECONDS command...; $BENCH
nvidia-smi --query-gpu=name,memory.used,memory.total --format=csv
python3 -c "import triton, torch; print('triton', triton.__version__, 'torch', torch.__version__)"
step pytest-fused 240 python3 -m pytest -q -p no:cacheprovider tests/test_analysis_fused.py
step pytest-gpu 240 python3 -m pytest -m gpu -q -p no:cacheprovider tests/test_analysis.py
step fused-kernel 240 python3 -m benchmarks.fused_kernel --out "$S/fused-kernel.json"
step read-speed 120 python3 -m benchmarks.read_speed --out "$S/read-speed.json"
step bench-1M 300 $BENCH --cases n1M-12GB n1M-12GB-causal n1M-H1-12GB n1M-4GB-cold --notes "warm-up by a tiny job"
rm -rf /tmp/cqsa-bench
step analyze-4M 480 python3 workflows/analyze_gpu.py --workdir /tmp/cqsa-analyze --plot "$S/analysis-4M.png"
rm -rf /tmp/cqsa-analyze
echo "== all steps done $(date -u +%T)"
