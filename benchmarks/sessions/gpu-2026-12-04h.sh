#!/bin/bash
# The eighth GPU session of 2026-12-04 (the code of session f, the probe change reverted): the GPU
# tests of the threaded default; 1M cold in a fresh process again (f: 0.528, d: 0.468).
set -u
S=${STATE:?}
. "$(dirname "$0")/steps.sh"  # step NAME SECONDS command...; $BENCH
mkdir -p /tmp/cqsa-bench
step cold-fresh 80 $BENCH --cases n1M-4GB-cold --notes "threaded worker, a fresh process"
step pytest 120 python3 -m pytest -q -p no:cacheprovider tests/test_stop.py tests/test_cluster.py -k "stop or gpu or auto or threaded"
echo "== all steps done $(date -u +%T)"
