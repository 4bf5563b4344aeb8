#!/bin/bash
# The rest of the performance issue's table after a session lost its machine mid-way through
# gpu-table.sh (2026-12-06): the 4M budgets row, then the H = 1 row over five rounds, in one device call:
#   mkdir -p /tmp/cqsa-bench; STATE=$OUT bash benchmarks/sessions/gpu-rest.sh
set -u
S=${STATE:?}
. "$(dirname "$0")/steps.sh"  # step NAME SECONDS command...; $BENCH
mkdir -p /tmp/cqsa-bench
nvidia-smi --query-gpu=name --format=csv,noheader
step budgets-4m 240 $BENCH --cases n4M-16GB n4M-1GB --notes "the issue's table: 1 GB against 16 GB"
step h1 120 $BENCH --rounds 5 --cases n1M-H1-12GB --notes "the issue's table, H = 1 over five rounds"
echo "== all steps done $(date -u +%T)"
