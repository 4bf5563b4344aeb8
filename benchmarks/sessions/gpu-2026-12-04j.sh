#!/bin/bash
# The tenth GPU session of 2026-12-04.  Session i's sample showed the benchmark's warm cluster
# still started a worker process: it built run()'s spec without the GPU, so "auto" chose
# processes, and the warm rows of sessions d-g compared processes with processes.  Fixed
# (benchmarks/cluster.py); now the real A/B of the warm rows, two rounds each, threads then
# processes, and a sampled 1M causal job on the threaded worker.
set -u
S=${STATE:?}
. "$(dirname "$0")/steps.sh"  # step NAME SECONDS command...; $BENCH
mkdir -p /tmp/cqsa-bench
step warm-threads 130 $BENCH --rounds 2 --cases n1M-12GB n1M-12GB-causal n1M-H1-12GB --notes "threaded worker (processes auto; the benchmark's cluster fixed)"
step warm-processes 130 env DASK_CQSA__LOCAL_CLUSTER__PROCESSES=true $BENCH --rounds 2 --cases n1M-12GB n1M-12GB-causal n1M-H1-12GB --notes "A/B: worker processes"
step sampled 60 env CQSA_BENCH_SAMPLE=1 $BENCH --cases n1M-12GB-causal --notes "sampled (benchmarks/sampler.py), threaded worker"
echo "== all steps done $(date -u +%T)"
