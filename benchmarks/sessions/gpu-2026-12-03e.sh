#!/bin/bash
# The GPU session of 2026-12-03 (evening), third call: the performance issue's 4M rows with the
# committed engine (4 GB plain and causal, 16 GB, then 1 GB within a deadline).
set -u
S=${STATE:?}
. "$(dirname "$0")/steps.sh"  # step NAME SECONDS command...; $BENCH
mkdir -p /tmp/cqsa-bench
step pytest-fused 120 python3 -m pytest -q -p no:cacheprovider tests/test_analysis_fused.py
step bench-4M 330 $BENCH --cases n4M-4GB n4M-4GB-causal
step bench-4M-more 420 $BENCH --cases n4M-16GB n4M-1GB --deadline 400
echo "== all steps done $(date -u +%T)"
