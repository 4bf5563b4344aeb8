#!/bin/bash
# The fifth GPU session of 2026-12-04: why the threaded worker ran slower than a worker process
# in session d (1M cold 7.2 s of tasks against 5.2; warm H = 1 1.39 s against 1.18).  A/B in one
# session: the threaded worker again (noise), then with the CUDA allocator's expandable segments
# set for the whole process (what a worker process gets from cqsa.expandable-segments).
set -u
S=${STATE:?}
. "$(dirname "$0")/steps.sh"  # step NAME SECONDS command...; $BENCH
mkdir -p /tmp/cqsa-bench
step threads 150 $BENCH --rounds 2 --cases n1M-H1-12GB n1M-4GB-cold --notes "threaded worker (processes auto)"
step threads-es 150 env PYTORCH_CUDA_ALLOC_CONF=expandable_segments:True $BENCH --rounds 2 --cases n1M-H1-12GB n1M-4GB-cold --notes "A/B: threaded worker, expandable segments in the process"
step processes 150 env DASK_CQSA__LOCAL_CLUSTER__PROCESSES=true $BENCH --rounds 2 --cases n1M-H1-12GB n1M-4GB-cold --notes "A/B: worker processes"
echo "== all steps done $(date -u +%T)"
