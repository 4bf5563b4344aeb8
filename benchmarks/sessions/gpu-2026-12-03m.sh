#!/bin/bash
# The GPU session of 2026-12-03 (night), last call: the issue's first row, 4M under 4 GB through
# run() with no client (the local cluster started and closed inside the timed call).
set -u
S=${STATE:?}
. "$(dirname "$0")/steps.sh"  # step NAME SECONDS command...; $BENCH
mkdir -p /tmp/cqsa-bench
step bench-4M-cold 300 $BENCH --cases n4M-4GB-cold --notes "compute thread per device, worker processes"
echo "== all steps done $(date -u +%T)"
