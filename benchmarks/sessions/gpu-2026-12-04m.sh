#!/bin/bash
# The thirteenth GPU session of 2026-12-04.  New since session l: the kernel warm-up (a job of one
# token group on a threaded local worker builds its attention plans on the compute thread while
# the cluster starts: execution/warmup.py, cqsa.kernel-warmup) and k, v of a key block read
# together (keyblocks.py: v's blocks no longer queue behind all of k's).  GPU tests; the cold row
# A/B (warm-up on, off; a fresh process each, twice); the 1M warm rows; a GPU trace of H = 1.
set -u
S=${STATE:?}
. "$(dirname "$0")/steps.sh"  # step NAME SECONDS command...; $BENCH
mkdir -p /tmp/cqsa-bench
step pytest 150 python3 -m pytest -m gpu -q -p no:cacheprovider tests/test_warmup.py tests/test_keyblocks.py tests/test_pieces.py
step cold-warmup 70 $BENCH --cases n1M-4GB-cold --notes "kernel warm-up on (the default), a fresh process"
step cold-nowarmup 70 env DASK_CQSA__KERNEL_WARMUP=false $BENCH --cases n1M-4GB-cold --notes "A/B: kernel warm-up off, a fresh process"
step cold-warmup-2 70 $BENCH --cases n1M-4GB-cold --notes "kernel warm-up on (the default), a fresh process"
step cold-nowarmup-2 70 env DASK_CQSA__KERNEL_WARMUP=false $BENCH --cases n1M-4GB-cold --notes "A/B: kernel warm-up off, a fresh process"
step warm-1M 110 $BENCH --rounds 2 --cases n1M-12GB n1M-12GB-causal n1M-H1-12GB --notes "defaults; k and v of a key block read together"
step traced 60 env CQSA_BENCH_GPU_TRACE=1 $BENCH --cases n1M-H1-12GB --notes "GPU trace (benchmarks/gputrace.py)"
echo "== all steps done $(date -u +%T)"
