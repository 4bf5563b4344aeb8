#!/bin/bash
# The eleventh GPU session of 2026-12-04.  Session j's sample of a 1M causal job: its tasks
# waited for the GPU turn and, holding it, for reads queued behind the reads of tasks that
# could not compute yet.  Now the IO threads serve the earliest task first (execution/iopool.py,
# cqsa.io-order: tasks).  A/B of io-order (tasks, fifo) x cuda-turn (auto = kernels at W = 1,
# streams) on the 1M warm rows, two rounds each; the one-task H = 1 row once; GPU tests first.
set -u
S=${STATE:?}
. "$(dirname "$0")/steps.sh"  # step NAME SECONDS command...; $BENCH
mkdir -p /tmp/cqsa-bench
step pytest 200 python3 -m pytest -m gpu -q -p no:cacheprovider tests/test_keyblocks.py tests/test_pieces.py tests/test_exactness.py tests/test_devicethread.py
step pytest-cpu 120 python3 -m pytest -q -p no:cacheprovider tests/test_iopool.py tests/test_stop.py
C="--rounds 2 --cases n1M-12GB n1M-12GB-causal"
step kernels-tasks 110 $BENCH $C n1M-H1-12GB --notes "io-order tasks (the earliest task's IO first), cuda-turn auto (kernels)"
step kernels-fifo 100 env DASK_CQSA__IO_ORDER=fifo $BENCH $C --notes "A/B: io-order fifo, cuda-turn auto (kernels)"
step streams-tasks 100 env DASK_CQSA__CUDA_TURN=streams $BENCH $C --notes "A/B: io-order tasks, cuda-turn streams"
step streams-fifo 100 env DASK_CQSA__CUDA_TURN=streams DASK_CQSA__IO_ORDER=fifo $BENCH $C --notes "A/B: io-order fifo, cuda-turn streams"
echo "== all steps done $(date -u +%T)"
