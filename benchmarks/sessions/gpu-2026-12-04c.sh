#!/bin/bash
# The third GPU session of 2026-12-04: where a cold start goes (benchmarks/startup.py), then A/B
# runs of the two 1M rows short of their targets (causal, H = 1): 8 IO threads, query pieces of 64K.
set -u
S=${STATE:?}
. "$(dirname "$0")/steps.sh"  # step NAME SECONDS command...; $BENCH
mkdir -p /tmp/cqsa-bench
step startup 60 python3 -m benchmarks.startup --out "$S/startup-$(date -u +%Y%m%dT%H%M%SZ).json"
step ab-io8 150 env DASK_CQSA__IO_THREADS=8 $BENCH --rounds 2 --cases n1M-12GB-causal n1M-H1-12GB --notes "A/B: io-threads 8"
step ab-piece64k 150 env DASK_CQSA__QUERY_PIECE=65536 $BENCH --rounds 2 --cases n1M-12GB-causal n1M-H1-12GB --notes "A/B: query-piece 65536"
echo "== all steps done $(date -u +%T)"
