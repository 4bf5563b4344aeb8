#!/bin/bash
# The fourth GPU session of 2026-12-04: the local cluster's worker a thread of the calling process
# on one GPU (cqsa.local-cluster.processes auto, d4bf9c7).  The GPU tests of that default and of
# stopping a threaded worker's tasks; 1M cold under the new default and, A/B in the same session,
# with worker processes; the 1M warm rows (two rounds) on the threaded worker.
set -u
S=${STATE:?}
. "$(dirname "$0")/steps.sh"  # step NAME SECONDS command...; $BENCH
mkdir -p /tmp/cqsa-bench
step pytest 150 python3 -m pytest -q -p no:cacheprovider -x tests/test_stop.py tests/test_cluster.py -k "stop or gpu or auto or threaded"
step bench-cold 90 $BENCH --cases n1M-4GB-cold --notes "local cluster: one threaded worker (processes auto)"
step ab-cold-processes 90 env DASK_CQSA__LOCAL_CLUSTER__PROCESSES=true $BENCH --cases n1M-4GB-cold --notes "A/B: worker processes"
step bench-1M 220 $BENCH --rounds 2 --cases n1M-12GB-causal n1M-H1-12GB n1M-12GB --notes "threaded worker (processes auto)"
echo "== all steps done $(date -u +%T)"
