#!/bin/bash
# The performance issue's whole table on one card with the engine as committed (last run: session
# 06b, 2026-12-06, one H100), with cqsa.first-pieces 2 beside the default on H = 1 and 1M (its A/B:
# the run records the setting, and benchmarks.report keeps it out of the current figures).  About
# 11 minutes (06b: 04:20-04:31): run it detached,
#   bash benchmarks/device_session.sh 560 --script benchmarks/sessions/gpu-table.sh
# (its pytest step needs the test wheels too: ../shared/gpu/fetch-wheels.sh pytest pluggy iniconfig
# hypothesis sortedcontainers attrs; carry .whl and start the call with the line it prints),
# and call that again at once (a machine idle for 30 s goes back) until it prints DONE; then copy
# the result files into benchmarks/results/,
# run `python -m benchmarks.report` and update "The performance issue's table" in docs/benchmarks.md.
# The steps that decide most come first: a machine taken back mid-way loses the rest.
set -u
S=${STATE:?}
. "$(dirname "$0")/steps.sh"  # step NAME SECONDS command...; $BENCH
mkdir -p /tmp/cqsa-bench
step pytest 300 python3 -m pytest -m gpu -q -p no:cacheprovider tests/test_exactness.py tests/test_keyblocks.py tests/test_pieces.py tests/test_devicethread.py tests/test_synthetic.py
step warm-1m 200 $BENCH --rounds 3 --cases n1M-12GB n1M-12GB-causal n1M-H1-12GB --notes "the issue's table, three rounds"
DASK_CQSA__FIRST_PIECES=2 step warm-1m-first2 150 $BENCH --rounds 3 --cases n1M-H1-12GB n1M-12GB --notes "cqsa.first-pieces 2, against warm-1m (the default, 1)"
step budgets-4m 300 $BENCH --cases n4M-16GB n4M-1GB --notes "the issue's table: 1 GB against 16 GB"
step cold 80 $BENCH --cases n1M-4GB-cold --notes "the issue's table, a fresh process"
step warm-4m 420 $BENCH --cases n4M-4GB n4M-4GB-causal --notes "the issue's table"
echo "== all steps done $(date -u +%T)"
