#!/usr/bin/env bash
# Start cqsa workers on this machine: one Dask worker process per GPU.
#
#   deploy/start-worker.sh SCHEDULER_ADDRESS [DEVICE_MEM_BYTES]
#
# Each process sees one GPU (CUDA_VISIBLE_DEVICES), runs 2 threads (one for
# the quorum task that holds the GPU, one for merges and I/O) and advertises
# DEVICE_MEM_BYTES (default 12e9) of the `device_mem` resource: the memory
# budget a quorum task is planned against.  Keep it below the GPU's memory,
# leaving room for the CUDA context and the allocator's slack.  Without
# nvidia-smi (a CPU machine) one CPU worker is started instead.
#
# Environment:
#   CQSA_WORKER_MEMORY_LIMIT  host memory limit per worker process (default:
#                             this machine's memory divided by the processes)
#   CQSA_RESOURCE             resource name (default device_mem; it must match
#                             the client's cqsa.resource)
#   CQSA_GPUS                 GPU indices to use, e.g. "0 1" (default: all)
set -euo pipefail

if [ $# -lt 1 ]; then
    echo "usage: $0 SCHEDULER_ADDRESS [DEVICE_MEM_BYTES]" >&2
    exit 2
fi
scheduler=$1
device_mem=${2:-12e9}
resource=${CQSA_RESOURCE:-device_mem}

if [ -n "${CQSA_GPUS:-}" ]; then
    read -r -a gpus <<< "$CQSA_GPUS"
elif command -v nvidia-smi > /dev/null 2>&1; then
    mapfile -t gpus < <(nvidia-smi --query-gpu=index --format=csv,noheader)
else
    gpus=()
fi

procs=${#gpus[@]}
[ "$procs" -gt 0 ] || procs=1
total_kb=$(awk '/^MemTotal:/ {print $2}' /proc/meminfo)
memory_limit=${CQSA_WORKER_MEMORY_LIMIT:-$(( total_kb * 1024 / procs ))}

# Threads: two quorum tasks in flight on a GPU plus one for merges; one plus one on the CPU.
if [ "$procs" -gt 1 ] || [ ${#gpus[@]} -gt 0 ]; then nthreads=3; else nthreads=2; fi

start() {  # start NAME [env assignments...]
    local name=$1
    shift
    env "$@" dask worker "$scheduler" --nthreads "$nthreads" --name "$name" \
        --resources "${resource}=${device_mem}" --memory-limit "$memory_limit" &
    echo "started worker $name (pid $!): ${resource}=${device_mem}, memory limit ${memory_limit}" >&2
}

if [ ${#gpus[@]} -eq 0 ]; then
    start "$(hostname)-cpu"
else
    for i in "${gpus[@]}"; do
        start "$(hostname)-gpu${i}" "CUDA_VISIBLE_DEVICES=${i}"
    done
fi

# Stop all of this script's workers on Ctrl-C or `kill` of this script.
trap 'kill $(jobs -p) 2> /dev/null; wait' INT TERM
wait
