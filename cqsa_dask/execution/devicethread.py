"""One compute thread per CUDA device in a process: every task's kernels are queued from it.

::

    task thread ──on_device(dev, fn)──> dev's compute thread: fn() on the task's current stream
                <──fn's result (or its exception)──

cuDNN keeps its handles and the execution plans of its attention graphs (one
per shape) per host thread.  Dask runs a task on whichever of its worker
threads is free, so each thread paid those set-ups again: measured on an H200
(docs/benchmarks.md, "Measurements behind the defaults"), the pieces of a 1M
causal head took 0.47 s of kernels on a thread that had run them, 0.56 s on a
fresh thread and 1.2-1.3 s on the first thread to build their plans, and a
job's tasks computed 0.75-0.97 s on threads new to them against 0.56 s.
Queuing every task's kernels from one thread per device pays those set-ups
once per process and keeps them for the next job.

Kernel launches are asynchronous: the compute thread only queues work on the
calling task's stream, so tasks sharing the device through streams still
overlap.  ``fn`` must not wait for the device (a synchronize, a ``.item()``)
or for another task: a wait there holds every task's launches.  On the CPU
``fn`` runs on the calling thread (its ops use every core; the CPU turn keeps
one task computing at a time).
"""

from __future__ import annotations

import threading
from collections.abc import Callable
from concurrent.futures import Future, ThreadPoolExecutor
from typing import TypeVar

import torch

__all__ = ["on_device", "submit_on_device"]

T = TypeVar("T")

_PREFIX = "cqsa-compute-cuda"
_threads: dict[int, ThreadPoolExecutor] = {}
_guard = threading.Lock()


def on_device(dev: torch.device, fn: Callable[[], T]) -> T:
    """``fn()`` run on ``dev``'s compute thread, with the calling thread's current stream of
    ``dev`` as its current stream; its result, or its exception raised here.  On the CPU, or
    called from a compute thread, ``fn()`` runs here."""
    if dev.type != "cuda" or threading.current_thread().name.startswith(_PREFIX):
        return fn()
    return submit_on_device(dev, fn).result()


def submit_on_device(dev: torch.device, fn: Callable[[], T]) -> Future[T]:
    """Queue ``fn()`` on CUDA device ``dev``'s compute thread, with the calling thread's current stream
    of ``dev`` as its current stream; its future (work queued later waits for it)."""
    index = dev.index if dev.index is not None else torch.cuda.current_device()
    with _guard:
        pool = _threads.get(index)
        if pool is None:
            pool = _threads[index] = ThreadPoolExecutor(max_workers=1, thread_name_prefix=f"{_PREFIX}{index}")
    stream = torch.cuda.current_stream(index)

    def queued() -> T:
        with torch.cuda.stream(stream):
            return fn()

    return pool.submit(queued)
