#!/bin/bash
# The GPU session of 2026-12-03 (night), second call: the 4M rows of the performance issue with the
# committed engine (kernels queued from one compute thread per device): 4 GB non-causal and causal
# against SDPA, 16 GB, then 1 GB run to its end (a box of 420 s instead of the case's 300 s).
set -u
S=${STATE:?}
. "$(dirname "$0")/steps.sh"  # step NAME SECONDS command...; $BENCH
mkdir -p /tmp/cqsa-bench
step bench-4M 480 $BENCH --cases n4M-4GB n4M-4GB-causal n4M-16GB --notes "compute thread per device"
step bench-4M-1GB 470 $BENCH --cases n4M-1GB --box n4M-1GB=420 --notes "compute thread per device, run to its end"
echo "== all steps done $(date -u +%T)"
