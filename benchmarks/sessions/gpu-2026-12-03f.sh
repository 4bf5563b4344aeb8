#!/bin/bash
# The GPU session of 2026-12-03 (evening), last call: one task's reads (pageable copies too), then
# the 1M warm cases with inputs read into pageable memory (cqsa.pin-host-memory false), against the
# same cases with pinned reads earlier in the session (the first pinned buffers cost 1.16 GB/s).
set -u
S=${OUT:?}
BENCH="python3 -m benchmarks.bench --suite gpu-perf --workdir /tmp/cqsa-bench --out-dir $S"
mkdir -p /tmp/cqsa-bench
timeout 40 python3 -m benchmarks.read_speed --out "$S/read-speed.json" > "$S/read-speed.log" 2>&1
grep -o '"read_pageable_GBps[^]]*]\|"upload[a-z_]*GBps[^]]*]\|"pinned_alloc_GBps[^]]*]' "$S/read-speed.json"
DASK_CQSA__PIN_HOST_MEMORY=false timeout 150 $BENCH --cases n1M-12GB n1M-12GB-causal n1M-H1-12GB \
  --notes "pin-host-memory false (pageable reads)" > "$S/bench-1M-pageable.log" 2>&1
grep -v '^ \|^Traceback\|^distributed\.\|^tornado\.\|^$' "$S/bench-1M-pageable.log" | tail -6
