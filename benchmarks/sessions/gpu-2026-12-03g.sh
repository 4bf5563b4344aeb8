#!/bin/bash
# The GPU session of 2026-12-03 (late evening), first call: rows computed alone in query pieces
# (cqsa.query-piece) on CUDA; the performance issue's 1M rows with pieces, then without them
# (query-piece 0, the engine before) in the same session, then the cold run on a threaded local
# cluster (local-cluster.processes false) against the default worker process.
set -u
S=${STATE:?}
. "$(dirname "$0")/steps.sh"  # step NAME SECONDS command...; $BENCH
mkdir -p /tmp/cqsa-bench
nvidia-smi --query-gpu=name,memory.used,memory.total --format=csv
step pytest-gpu 240 python3 -m pytest -m gpu -q -p no:cacheprovider -x tests/test_pieces.py tests/test_exactness.py
step bench-1M 240 $BENCH --cases n1M-12GB n1M-12GB-causal n1M-H1-12GB n1M-4GB-cold --notes "query pieces (auto)"
step bench-1M-whole 150 env DASK_CQSA__QUERY_PIECE=0 $BENCH --cases n1M-12GB n1M-H1-12GB --notes "whole rows (query-piece 0)"
step bench-cold-threads 120 env DASK_CQSA__LOCAL_CLUSTER__PROCESSES=False $BENCH --cases n1M-4GB-cold --notes "threaded local cluster"
echo "== all steps done $(date -u +%T)"
