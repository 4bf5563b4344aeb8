#!/bin/bash
# The third GPU session of 2026-12-05 (an H100): the job's start without zarr's round trips
# (store/nodes.py: arrays created and opened from their zarr.json; a new job's markers not read;
# one-chunk reads without the pool hand-over).  The store operations timed one by one
# (benchmarks/store_ops.py, 05c's first call measured them before the change), the GPU tests,
# the 1M H = 1 and H = 4 rows in three rounds, and a GPU trace of warm H = 1 rounds.
set -u
S=${STATE:?}
. "$(dirname "$0")/steps.sh"  # step NAME SECONDS command...; $BENCH
mkdir -p /tmp/cqsa-bench
step store-ops 120 python3 -m benchmarks.store_ops --out "$S/store-ops-after.json"
step pytest 300 python3 -m pytest -m gpu -q -p no:cacheprovider tests/test_exactness.py tests/test_keyblocks.py tests/test_pieces.py tests/test_devicethread.py tests/test_synthetic.py
step warm-rows 150 $BENCH --rounds 3 --cases n1M-H1-12GB n1M-12GB --notes "store/nodes.py, three rounds"
step traced-h1 80 env CQSA_BENCH_GPU_TRACE=1 $BENCH --rounds 2 --cases n1M-H1-12GB --notes "A/B: GPU trace of warm H = 1 rounds (not current)"
echo "== all steps done $(date -u +%T)"
