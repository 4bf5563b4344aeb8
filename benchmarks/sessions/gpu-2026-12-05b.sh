#!/bin/bash
# The second GPU session of 2026-12-05 (an H100 was lent; the first, 05a, re-measured the 1M rows).
# New since: partials stored in float32 (execution/partials/all.py) and the error model's test of
# cancelling partials.  The GPU tests: exactness on CUDA (W = 13 bfloat16 jobs write float32
# partials; the cancelling-partials case on cuDNN), key blocks, pieces, the device thread.
set -u
S=${STATE:?}
. "$(dirname "$0")/steps.sh"  # step NAME SECONDS command...; $BENCH
step pytest 300 python3 -m pytest -m gpu -q -p no:cacheprovider tests/test_exactness.py tests/test_keyblocks.py tests/test_pieces.py tests/test_devicethread.py tests/test_synthetic.py
echo "== all steps done $(date -u +%T)"
