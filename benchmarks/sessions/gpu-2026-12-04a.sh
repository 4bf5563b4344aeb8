#!/bin/bash
# The GPU session of 2026-12-04: k and v of a one-group task in key blocks (execution/keyblocks.py):
# streamed from host memory where they do not fit the budget whole (4M under 4 GB and 1 GB is now
# W = 1 instead of W = 13 / 133), and read in blocks that the first piece starts on where they do.
# Its GPU tests, then the issue's rows: 4M (4 GB, causal, 1 GB, 16 GB), 1M warm (two rounds), 1M cold.
set -u
S=${STATE:?}
. "$(dirname "$0")/steps.sh"  # step NAME SECONDS command...; $BENCH
mkdir -p /tmp/cqsa-bench
step pytest 240 python3 -m pytest -m gpu -q -p no:cacheprovider tests/test_keyblocks.py tests/test_pieces.py tests/test_exactness.py tests/test_devicethread.py
step bench-4M 480 $BENCH --cases n4M-4GB n4M-4GB-causal --notes "k, v streamed in key blocks (W = 1)"
step bench-4M-1GB-16GB 300 $BENCH --cases n4M-1GB n4M-16GB --notes "k, v in key blocks (1 GB: streamed, 16 GB: resident)"
step bench-1M 200 $BENCH --rounds 2 --cases n1M-12GB-causal n1M-H1-12GB n1M-12GB --notes "k, v read in key blocks, the first piece on each as it lands"
step bench-cold 90 $BENCH --cases n1M-4GB-cold --notes "k, v read in key blocks, worker processes"
echo "== all steps done $(date -u +%T)"
