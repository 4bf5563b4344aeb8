#!/bin/bash
# The GPU session of 2026-12-03 (late evening), last call: the plans that count a query piece at
# W = 1 (1M under 4 GB is now W = 1, four one-head tasks): the cold run on worker processes (the
# default) and on a threaded local cluster, and the warm 12 GB row.
set -u
S=${STATE:?}
. "$(dirname "$0")/steps.sh"  # step NAME SECONDS command...; $BENCH
mkdir -p /tmp/cqsa-bench
step bench-threads 60 env DASK_CQSA__LOCAL_CLUSTER__PROCESSES=False $BENCH --cases n1M-4GB-cold --notes "W = 1 in pieces, threaded local cluster"
step bench-1M 100 $BENCH --cases n1M-12GB n1M-4GB-cold --notes "W = 1 in pieces, worker processes"
echo "== all steps done $(date -u +%T)"
