#!/bin/bash
# The GPU session of 2026-12-03 (evening), second call: the 4M analysis benchmark with the fused
# kernel's chosen tiles (128 x 64, 4 warps, 3 stages), then more tile settings.
set -u
S=${STATE:?}
. "$(dirname "$0")/steps.sh"  # step NAME SECONDS command...; $BENCH
mkdir -p /tmp/cqsa-analyze
step analyze-4M 480 python3 workflows/analyze_gpu.py --workdir /tmp/cqsa-analyze --plot "$S/analysis-4M.png"
rm -rf /tmp/cqsa-analyze
step fused-kernel 150 python3 -m benchmarks.fused_kernel --out "$S/fused-kernel-2.json"
echo "== all steps done $(date -u +%T)"
