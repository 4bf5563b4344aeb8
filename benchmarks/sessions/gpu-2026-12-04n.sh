#!/bin/bash
# The fourteenth GPU session of 2026-12-04.  Session m's GPU trace of the 1M, H = 1 job: the pieces'
# kernels take 0.926 s (SDPA 0.94), the GPU idles 0.325 s before the first and 0.052 s after the
# last, and the copies to the device take 0.306 s for 0.8 GB (pageable host memory): the first piece
# waits for k and v to be copied.  A/B of pinned reads (cqsa.pin-host-memory auto: on CUDA) against
# the default (false) on the 1M warm rows (two rounds each), the cold row, and a trace of H = 1.
set -u
S=${STATE:?}
. "$(dirname "$0")/steps.sh"  # step NAME SECONDS command...; $BENCH
mkdir -p /tmp/cqsa-bench
C="--rounds 2 --cases n1M-H1-12GB n1M-12GB n1M-12GB-causal"
step warm-pinned 110 env DASK_CQSA__PIN_HOST_MEMORY=auto $BENCH $C --notes "A/B: pin-host-memory auto (pinned on CUDA)"
step warm-default 110 $BENCH $C --notes "defaults (pin-host-memory false)"
step cold-pinned 70 env DASK_CQSA__PIN_HOST_MEMORY=auto $BENCH --cases n1M-4GB-cold --notes "A/B: pin-host-memory auto, a fresh process"
step traced-pinned 60 env DASK_CQSA__PIN_HOST_MEMORY=auto CQSA_BENCH_GPU_TRACE=1 $BENCH --cases n1M-H1-12GB --notes "A/B: pin-host-memory auto; GPU trace"
echo "== all steps done $(date -u +%T)"
