#!/bin/bash
# The GPU session of 2026-12-03 (afternoon), one detached run across device calls
# (benchmarks/device_session.sh WAIT --script benchmarks/sessions/gpu-2026-12-03b.sh):
#   the GPU-marked tests; the performance issue's 1M cases under both cuda-turn settings, kernel
#   throughput by size, the transformers prefill workflow, then the 4M cases under the better
#   turn, the analysis benchmark, the dask-cuda check and the remaining 4M rows.
# Each step has its own time limit and log ($STATE/<step>.log); result files go to $STATE.
set -u
S=${STATE:?}
. "$(dirname "$0")/steps.sh"  # step NAME SECONDS command...; $BENCH
nvidia-smi --query-gpu=name,memory.used,memory.total --format=csv
step pytest-gpu 300 python3 -m pytest -m gpu -q -p no:cacheprovider tests/test_exactness.py tests/test_synthetic.py \
  tests/test_analysis.py tests/test_transformers.py
step bench-1M-kernels 260 $BENCH --cases n1M-12GB n1M-12GB-causal n1M-H1-12GB n1M-4GB-cold \
  --notes "cuda-turn kernels (the default)"
step bench-1M-streams 150 env DASK_CQSA__CUDA_TURN=streams $BENCH --cases n1M-12GB n1M-12GB-causal n1M-H1-12GB \
  --notes "cuda-turn streams: the A/B of the 1M warm cases"
step kernel-sizes 150 python3 -m benchmarks.kernel_sizes --out "$S/kernel-sizes.json"
step prefill-256k 330 python3 workflows/long_document_prefill.py --preset llama-1b --dtype bfloat16 \
  --seq-len 262144 --budget 8GB --overhead-calls 1
# the turn for the 4M cases: the one with the better ratio on the 1M warm cases (sum over the three)
TURN=$(python3 - "$S" <<'PY'
import glob, json, sys
best = {}
for f in glob.glob(sys.argv[1] + "/gpu-perf-*.json"):
    d = json.load(open(f))
    turn = (d.get("settings") or {}).get("cuda-turn")
    r = [x["figures"]["ratio"] for x in d["results"] if x.get("figures") and x["case"]["mode"] == "warm"]
    if turn and len(r) == 3:
        best[turn] = sum(r)
print(max(best, key=best.get) if best else "kernels")
PY
)
echo "== the 4M cases run with cuda-turn $TURN"
step bench-4M 420 env DASK_CQSA__CUDA_TURN=$TURN $BENCH --cases n4M-4GB n4M-4GB-causal --notes "cuda-turn $TURN"
rm -rf /tmp/cqsa-bench
step analyze-4M 480 env DASK_CQSA__CUDA_TURN=$TURN python3 workflows/analyze_gpu.py --workdir /tmp/cqsa-analyze \
  --plot "$S/analysis-4M.png"
rm -rf /tmp/cqsa-analyze
if [ -f benchmarks/gpu_checks/dask_cuda_check.py ]; then
  step dask-cuda 180 python3 benchmarks/gpu_checks/dask_cuda_check.py
fi
step bench-4M-more 560 env DASK_CQSA__CUDA_TURN=$TURN $BENCH --cases n4M-4GB-cold n4M-16GB n4M-1GB \
  --deadline 540 --notes "cuda-turn $TURN"
echo "== all steps done $(date -u +%T)"
