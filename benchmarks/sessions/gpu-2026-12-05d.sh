#!/bin/bash
# The fourth GPU session of 2026-12-05 (an H100), the engine of 05c (store/nodes.py): the rest of
# the performance issue's table with it.  H = 1 again (05c: 0.868), the 1M causal and cold rows,
# then 4M warm and causal, one round each.
set -u
S=${STATE:?}
. "$(dirname "$0")/steps.sh"  # step NAME SECONDS command...; $BENCH
mkdir -p /tmp/cqsa-bench
step warm-1m 150 $BENCH --rounds 3 --cases n1M-H1-12GB n1M-12GB-causal --notes "store/nodes.py, three rounds"
step cold 80 $BENCH --cases n1M-4GB-cold --notes "store/nodes.py, a fresh process"
step warm-4m 420 $BENCH --cases n4M-4GB n4M-4GB-causal --notes "store/nodes.py"
echo "== all steps done $(date -u +%T)"
