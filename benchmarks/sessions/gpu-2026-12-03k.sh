#!/bin/bash
# The GPU session of 2026-12-03 (night), first call: every task's kernels queued from one compute
# thread per device (execution/devicethread.py). Its GPU tests, then the 1M rows of the performance
# issue, two rounds each (the second job on the same cluster finds the kernels' plans built), the
# cold runs, and two settings weighed on the short rows (tasks in flight 4, pinned reads).
set -u
S=${STATE:?}
. "$(dirname "$0")/steps.sh"  # step NAME SECONDS command...; $BENCH
mkdir -p /tmp/cqsa-bench
step pytest 200 python3 -m pytest -m gpu -q -p no:cacheprovider -x tests/test_devicethread.py tests/test_pieces.py tests/test_exactness.py
step bench-1M 150 $BENCH --rounds 2 --cases n1M-12GB-causal n1M-H1-12GB n1M-12GB --notes "kernels queued from one compute thread per device"
step bench-cold 80 $BENCH --cases n1M-4GB-cold --notes "compute thread, worker processes"
step bench-cold-threads 60 env DASK_CQSA__LOCAL_CLUSTER__PROCESSES=False $BENCH --cases n1M-4GB-cold --notes "compute thread, threaded local cluster"
step bench-flight4 60 env DASK_CQSA__TASKS_IN_FLIGHT=4 $BENCH --cases n1M-12GB-causal --notes "compute thread, tasks in flight 4"
echo "== all steps done $(date -u +%T)"
