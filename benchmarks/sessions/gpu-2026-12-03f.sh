#!/bin/bash
# The GPU session of 2026-12-03 (evening), last call: the GPU-marked tests on the committed engine
# (CUDA plans are now sized under the allocator cap and ask the resource for their share of it).
set -u
S=${OUT:?}
mkdir -p /tmp/cqsa-bench
timeout 120 python3 -m pytest -m gpu -q -p no:cacheprovider -x tests/test_exactness.py tests/test_synthetic.py tests/test_analysis.py tests/test_analysis_fused.py tests/test_transformers.py > "$S/pytest-gpu.log" 2>&1
echo "pytest-gpu rc=$?"; tail -3 "$S/pytest-gpu.log"
