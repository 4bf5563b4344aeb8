#!/bin/bash
# The GPU session of 2026-12-03 (late evening), third call: the causal diagonal in blocks the size
# of a piece (at most four kernel shapes a row): its kernels alone against the prefix calls of the
# second call, the GPU tests of the pieces, the 1M rows.
set -u
S=${STATE:?}
. "$(dirname "$0")/steps.sh"  # step NAME SECONDS command...; $BENCH
mkdir -p /tmp/cqsa-bench
step causal-blocks 60 python3 -m benchmarks.causal_pieces --out "$S/causal-blocks.json"
step pytest-pieces 150 python3 -m pytest -m gpu -q -p no:cacheprovider -x tests/test_pieces.py
step bench-1M 200 $BENCH --cases n1M-12GB-causal n1M-12GB n1M-H1-12GB --notes "query pieces (auto), causal diagonal in piece-sized key blocks"
echo "== all steps done $(date -u +%T)"
