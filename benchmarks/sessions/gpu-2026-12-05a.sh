#!/bin/bash
# Planned for the next GPU session (none was lent on 2026-12-05): the 1M rows of issue 20 in three
# rounds, so that two of H = 1's three pairs run with cuDNN's plans for its shapes already built in
# the process (its first round builds them inside the job); then a GPU trace of warm H = 1 rounds
# (the 12-04 traces were of first rounds), and the cold row.  See docs/benchmarks.md, "The
# performance issue's table": H = 1 measured 0.773 (needs 0.85; 1.14-1.20 s once plans are built).
set -u
S=${STATE:?}
. "$(dirname "$0")/steps.sh"  # step NAME SECONDS command...; $BENCH
mkdir -p /tmp/cqsa-bench
step warm-rows 150 $BENCH --rounds 3 --cases n1M-12GB n1M-H1-12GB n1M-12GB-causal --notes "defaults, three rounds"
step traced-h1 80 env CQSA_BENCH_GPU_TRACE=1 $BENCH --rounds 2 --cases n1M-12GB n1M-H1-12GB --notes "A/B: GPU trace of warm H = 1 rounds (not current)"
step cold 70 $BENCH --cases n1M-4GB-cold --notes "defaults, a fresh process"
echo "== all steps done $(date -u +%T)"
