#!/bin/bash
# The GPU session of 2026-12-03 (night), last call: under the kernels turn, one task's first reads at
# a time (WorkerRuntime.first_reads), so the task that computes first reads alone. The GPU tests of
# the pieces (both turns), then the 1M rows where the tasks start together. Measured at commit
# 77929fb; no gain (docs/benchmarks.md, "The night"), so the change was reverted after it.
set -u
S=${STATE:?}
. "$(dirname "$0")/steps.sh"  # step NAME SECONDS command...; $BENCH
mkdir -p /tmp/cqsa-bench
step pytest 80 python3 -m pytest -m gpu -q -p no:cacheprovider -x tests/test_pieces.py
step bench-1M 100 $BENCH --cases n1M-12GB n1M-12GB-causal --notes "first reads one task at a time under the kernels turn"
echo "== all steps done $(date -u +%T)"
