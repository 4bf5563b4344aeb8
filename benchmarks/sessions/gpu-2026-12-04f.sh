#!/bin/bash
# The sixth GPU session of 2026-12-04: the threaded worker (processes auto) against worker
# processes in one session.  1M cold first, in a fresh process (as session d: a second run() in a
# process that ran a job before measured 0.81 in session e); the three warm 1M rows, two rounds,
# threads then processes; 4M under 4 GB on the threaded worker (a long job: its cost, if any).
set -u
S=${STATE:?}
. "$(dirname "$0")/steps.sh"  # step NAME SECONDS command...; $BENCH
mkdir -p /tmp/cqsa-bench
step cold-fresh 80 $BENCH --cases n1M-4GB-cold --notes "threaded worker, a fresh process"
step warm-threads 130 $BENCH --rounds 2 --cases n1M-12GB n1M-12GB-causal n1M-H1-12GB --notes "threaded worker (processes auto)"
step warm-processes 130 env DASK_CQSA__LOCAL_CLUSTER__PROCESSES=true $BENCH --rounds 2 --cases n1M-12GB n1M-12GB-causal n1M-H1-12GB --notes "A/B: worker processes"
step 4M-threads 240 $BENCH --cases n4M-4GB --notes "threaded worker (processes auto)"
echo "== all steps done $(date -u +%T)"
