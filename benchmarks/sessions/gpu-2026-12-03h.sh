#!/bin/bash
# The GPU session of 2026-12-03 (late evening), second call: what causal pieces cost in kernels
# alone; the causal 1M row with and without pieces; the cold run on a threaded local cluster
# (fixed) against worker processes; the 1M rows with k and v read on two threads; then 4M under
# 1 GB with the resource asks under the cap.
set -u
S=${STATE:?}
. "$(dirname "$0")/steps.sh"  # step NAME SECONDS command...; $BENCH
mkdir -p /tmp/cqsa-bench
step causal-pieces 90 python3 -m benchmarks.causal_pieces --out "$S/causal-pieces.json"
step bench-1M 200 $BENCH --cases n1M-12GB n1M-12GB-causal n1M-H1-12GB n1M-4GB-cold --notes "query pieces (auto), k and v read on two threads, worker processes"
step bench-causal-whole 90 env DASK_CQSA__QUERY_PIECE=0 $BENCH --cases n1M-12GB-causal --notes "whole rows (query-piece 0)"
step bench-cold-threads 90 env DASK_CQSA__LOCAL_CLUSTER__PROCESSES=False $BENCH --cases n1M-4GB-cold --notes "threaded local cluster"
rm -rf /tmp/cqsa-bench; mkdir -p /tmp/cqsa-bench
step bench-4M-1GB 430 $BENCH --cases n4M-1GB --deadline 420 --notes "resource asks under the allocator cap"
echo "== all steps done $(date -u +%T)"
