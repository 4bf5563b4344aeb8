"""What a worker process of ours sets for itself, and what it tells the client.

Process-wide settings belong to the process, so only a worker that owns its
process applies them (``WorkerRuntime``, ``owns_process``):

    torch          intra-op threads (``cqsa.torch-threads``)
    zarr           async concurrency (``cqsa.zarr-concurrency``)
    CUDA allocator expandable segments (``cqsa.expandable-segments``), and a
                   per-process cap just under the worker's budget resource
                   (``cqsa.cap-device-memory``)

A cluster that spawns worker processes passes ``worker_env(options)`` as
their environment, so that the allocator setting holds before torch starts
(otherwise the runtime sets it when it starts: for the segments made from
then on).  ``describe_worker`` answers, through ``client.run``, what a
worker computes on.
"""

from __future__ import annotations

import os
from typing import Any

import torch

from cqsa_dask.core.plan import capped_bytes
from cqsa_dask.execution.options import RunOptions
from cqsa_dask.kernels.attention import resolve_device

__all__ = ["cap_device", "capped_bytes", "configure_process", "describe_worker", "expandable_segments",
           "torch_threads", "usable_cpus", "worker_env"]

_SEGMENTS = "expandable_segments:True"
_ALLOC_VARS = ("PYTORCH_CUDA_ALLOC_CONF", "PYTORCH_ALLOC_CONF")


def configure_process(options: RunOptions, budget: float | None) -> float | None:
    """Apply ``options``' process-wide settings to this worker process (call only in a worker
    process of ours); ``budget``: bytes of the resource the worker advertises.  Returns the
    fraction of the device the allocator is capped at (None: no cap)."""
    import zarr

    if options.expandable_segments:
        expandable_segments()
    zarr.config.set({"async.concurrency": options.zarr_concurrency})
    torch.set_num_threads(torch_threads(options))
    dev = resolve_device(options.device)
    if dev.type == "cuda" and options.cap_device_memory and budget is not None:
        return cap_device(dev, budget)
    return None


def torch_threads(options: RunOptions) -> int:
    """Torch's intra-op threads in a worker process: ``torch_threads``, None = every core the
    process may run on (its CPU affinity: dask-cuda pins a GPU's worker to the cores near it)."""
    return options.torch_threads or usable_cpus()


def usable_cpus() -> int:
    """The cores this process may run on (``os.sched_getaffinity``; every core where it is unknown)."""
    return len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count() or 1


def worker_env(options: RunOptions) -> dict[str, str]:
    """Environment variables for worker processes a cluster spawns for ``options``
    (``LocalCluster(env=...)`` or ``Nanny(env=...)``): the CUDA allocator's expandable
    segments, set before torch starts, unless this environment already chose an allocator
    setting (which the workers then inherit)."""
    if not options.expandable_segments or any(v in os.environ for v in _ALLOC_VARS):
        return {}
    return {"PYTORCH_CUDA_ALLOC_CONF": _SEGMENTS}


def expandable_segments() -> None:
    """Let torch's CUDA caching allocator grow segments in place instead of carving fixed
    ones (``PYTORCH_CUDA_ALLOC_CONF=expandable_segments:True``), unless the process's
    environment already sets the allocator.  Call only in a worker process of ours.

    Under the per-process cap (``cap_device``) a fixed-segment allocator fails once free
    memory is split between segments: with two tasks in flight under a small budget, memory
    reserved but split between segments left a small request unservable.  Set before CUDA
    starts in this process, it applies from the first allocation; after, through torch's
    setter, to the segments made from then on.
    """
    if any(v in os.environ for v in _ALLOC_VARS):
        return  # the user's choice
    os.environ["PYTORCH_CUDA_ALLOC_CONF"] = _SEGMENTS
    if torch.cuda.is_available() and torch.cuda.is_initialized():
        setter = getattr(torch._C, "_accelerator_setAllocatorSettings", None) or getattr(
            torch._C, "_cuda_cudaCachingAllocator_set_allocator_settings", None)
        if setter is not None:
            setter(_SEGMENTS)


def cap_device(device: torch.device, budget: float) -> float:
    """Cap torch's caching allocator on ``device`` just under ``budget`` bytes for this
    process (``torch.cuda.set_per_process_memory_fraction``, ``capped_bytes``); return
    the fraction set.

    The budget then bounds what the process reserves, not only what the planner
    predicts: past the cap the allocator frees its cached blocks and retries before it
    fails.  The CUDA context and library handles are outside the allocator and come on
    top (docs/design.md).
    """
    index = device.index if device.index is not None else torch.cuda.current_device()  # "cuda": the current one
    fraction = min(1.0, capped_bytes(budget) / torch.cuda.get_device_properties(index).total_memory)
    torch.cuda.set_per_process_memory_fraction(fraction, index)
    return fraction


def describe_worker(device: str = "auto") -> dict[str, Any]:
    """What this process computes on for ``cqsa.device`` = ``device``, for
    ``client.run(describe_worker)``: {"device": "cuda" | "cpu", "device_name", "gpus",
    "device_memory" (bytes, None on the CPU), "cpus", "torch_threads"}.  Meant for worker
    processes: on CUDA it initialises CUDA in the process it runs in."""
    dev = resolve_device(device)
    gpus = torch.cuda.device_count() if torch.cuda.is_available() else 0
    name, memory = "cpu", None
    if dev.type == "cuda":
        import torch.cuda as tc

        index = dev.index or 0
        if index < gpus:
            props = tc.get_device_properties(index)
            name, memory = str(props.name), int(props.total_memory)
    return {"device": dev.type, "device_name": name, "gpus": gpus, "device_memory": memory,
            "cpus": usable_cpus(), "torch_threads": torch.get_num_threads()}
