#!/bin/bash
# The ninth GPU session of 2026-12-04: where the threads of a 1M causal job and a 1M H = 1 job
# spend their time (benchmarks/sampler.py: CQSA_BENCH_SAMPLE=1, the threaded worker), to find
# what the causal job's reads wait on.
set -u
S=${STATE:?}
. "$(dirname "$0")/steps.sh"  # step NAME SECONDS command...; $BENCH
mkdir -p /tmp/cqsa-bench
step sampled 150 env CQSA_BENCH_SAMPLE=1 $BENCH --cases n1M-12GB-causal n1M-H1-12GB --notes "sampled (benchmarks/sampler.py), threaded worker"
echo "== all steps done $(date -u +%T)"
