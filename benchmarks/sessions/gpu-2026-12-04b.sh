#!/bin/bash
# The second GPU session of 2026-12-04 (same code as session a, whose machine went cold after its
# 4M rows): the 1M rows warm (two rounds), 1M cold, then 4M under 1 GB and 16 GB.
set -u
S=${STATE:?}
. "$(dirname "$0")/steps.sh"  # step NAME SECONDS command...; $BENCH
mkdir -p /tmp/cqsa-bench
step bench-1M 200 $BENCH --rounds 2 --cases n1M-12GB-causal n1M-H1-12GB n1M-12GB --notes "k, v read in key blocks, the first piece on each as it lands"
step bench-cold 100 $BENCH --cases n1M-4GB-cold --notes "k, v read in key blocks, worker processes"
step bench-4M-1GB-16GB 420 $BENCH --cases n4M-1GB n4M-16GB --notes "k, v in key blocks (1 GB: streamed, 16 GB: resident)"
echo "== all steps done $(date -u +%T)"
