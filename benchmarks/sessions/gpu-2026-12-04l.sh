#!/bin/bash
# The twelfth GPU session of 2026-12-04.  Session k: with the IO threads serving the earliest task
# first, streams beat turns at W = 1 (1M causal 0.965 against 0.925), so cqsa.cuda-turn is now
# streams at every size.  The 1M rows under the new defaults (two rounds), a cold run in a fresh
# process, a GPU trace and a thread sample of the H = 1 and causal jobs (benchmarks/gputrace.py,
# sampler.py), then the 4M, 4 GB rows (the threaded worker, not measured there before).
set -u
S=${STATE:?}
. "$(dirname "$0")/steps.sh"  # step NAME SECONDS command...; $BENCH
mkdir -p /tmp/cqsa-bench
step warm-1M 110 $BENCH --rounds 2 --cases n1M-12GB n1M-12GB-causal n1M-H1-12GB --notes "defaults: cuda-turn streams, io-order tasks"
step cold-fresh 80 $BENCH --cases n1M-4GB-cold --notes "defaults, a fresh process"
step traced 80 env CQSA_BENCH_GPU_TRACE=1 $BENCH --cases n1M-H1-12GB n1M-12GB-causal --notes "GPU trace (benchmarks/gputrace.py)"
step sampled 60 env CQSA_BENCH_SAMPLE=1 $BENCH --cases n1M-H1-12GB --notes "sampled (benchmarks/sampler.py)"
step warm-4M 420 $BENCH --cases n4M-4GB n4M-4GB-causal --notes "defaults: threaded worker, cuda-turn streams, io-order tasks"
echo "== all steps done $(date -u +%T)"
