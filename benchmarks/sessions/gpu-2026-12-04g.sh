#!/bin/bash
# The seventh GPU session of 2026-12-04: the kernel probe on the compute thread, while the first
# reads run (before: on each task's own thread, before its reads).  The GPU tests of the threaded
# default and of stopping; 1M cold in a fresh process (session f: 0.528); the 1M warm rows.
set -u
S=${STATE:?}
. "$(dirname "$0")/steps.sh"  # step NAME SECONDS command...; $BENCH
mkdir -p /tmp/cqsa-bench
step cold-fresh 80 $BENCH --cases n1M-4GB-cold --notes "kernel probe on the compute thread; threaded worker, a fresh process"
step pytest 150 python3 -m pytest -q -p no:cacheprovider tests/test_stop.py tests/test_cluster.py tests/test_devicethread.py -k "stop or gpu or auto or threaded or device"
step warm-threads 130 $BENCH --rounds 2 --cases n1M-12GB n1M-12GB-causal n1M-H1-12GB --notes "kernel probe on the compute thread; threaded worker"
echo "== all steps done $(date -u +%T)"
