"""The worker runtime: what a worker keeps for its tasks, set up once per worker.

::

    client ──ensure_runtime(client, options)──> scheduler: CQSAWorkerPlugin(options),
              (idempotent: named by options.runtime_key)  sent to every worker, now and later;
                                                          RowLockRelease (lockrelease.py), once
    worker ──plugin.setup──> WorkerRuntime(options, worker)
    task   ──runtime(options)──> that runtime (outside such a worker: a process-local one)

A :class:`WorkerRuntime` owns

    cache        the host cache of input blocks and partials (``hostcache.py``)
    pool         the IO threads (``cqsa.io-threads``), the earliest task's work first (``iopool.py``)
    streams      one CUDA stream per worker thread (``task_stream``)
    turn         the CPU compute turn: one task at a time runs torch math on the CPU
    fold slots   at most n folds at once (bounded partials bound their journals so)
    row locks    a lease of the scheduler's semaphore per (job, row stripe) inside a worker,
                 freed by the scheduler's RowLockRelease if the worker dies (``rowlocks.py``)

Process-wide settings (``process.py``: torch's intra-op threads, zarr's async
concurrency, the CUDA allocator's per-process cap and expandable segments)
are applied only in a worker that owns its process (one a nanny started:
``LocalCluster(processes=True)``, ``dask worker``).  A threaded worker runs
in the user's process, and there nothing process-wide changes: torch keeps
its threads, zarr its concurrency and the allocator its settings (no cap:
the budget is then only the planner's).
"""

from __future__ import annotations

import contextlib
import logging
import threading
from collections.abc import Iterator
from contextlib import AbstractContextManager
from typing import TYPE_CHECKING, Any

import torch
from distributed import WorkerPlugin

from cqsa_dask.execution.hostcache import HostCache, cache_capacity
from cqsa_dask.execution.iopool import IOPool
from cqsa_dask.execution.lockrelease import PLUGIN_NAME as RELEASE_PLUGIN
from cqsa_dask.execution.lockrelease import ensure_release
from cqsa_dask.execution.options import RunOptions
from cqsa_dask.execution.process import configure_process, torch_threads
from cqsa_dask.execution.rowlocks import RowLocks

if TYPE_CHECKING:
    from distributed import Client, Worker

__all__ = ["CQSAWorkerPlugin", "WorkerRuntime", "ensure_runtime", "plugin_name", "runtime", "worker_budget"]

log = logging.getLogger(__name__)

_PREFIX = "cqsa-runtime-"


def plugin_name(options: RunOptions) -> str:
    """The worker plugin's name for ``options``: one runtime per distinct per-worker settings."""
    return _PREFIX + options.runtime_key


class WorkerRuntime:
    """Caches, pools, streams and locks of one worker (module docstring).

    Args:
        options: the per-worker settings (``RunOptions``; its per-task fields are not used).
        memory_limit: the worker's memory limit in bytes (sizes ``host_cache="auto"``).
        owns_process: apply process-wide settings (torch threads, zarr concurrency, the
            CUDA allocator); False for a threaded worker or outside a worker.
        row_locks: shared with other runtimes of the process (process-local locks must be one set).
        budget: bytes of ``options.resource`` the worker advertises (the allocator cap), if any.
    """

    def __init__(self, options: RunOptions, *, memory_limit: float | None = None, owns_process: bool = False,
                 row_locks: RowLocks | None = None, budget: float | None = None):
        self.options, self.owns_process = options, owns_process
        self.cache = HostCache(cache_capacity(options.host_cache, memory_limit))
        self.pool = IOPool(options.io_threads, ordered=options.io_order == "tasks")
        self.row_locks = row_locks or RowLocks()
        self._cpu_turn = threading.Lock()
        self._cuda_turn = threading.Lock()  # one per worker process: a worker drives one GPU
        self._slots: dict[int, threading.BoundedSemaphore] = {}
        self._threads = threading.local()
        self._guard = threading.Lock()
        self.device_fraction: float | None = None
        if owns_process:  # process-wide settings, only in a process of our own
            self.device_fraction = configure_process(options, budget)

    def bind_thread(self) -> None:
        """Called by each task in its thread: a worker thread that ran torch before this
        runtime was set up keeps its own intra-op thread count, so set it there too."""
        if self.owns_process and not getattr(self._threads, "bound", False):
            torch.set_num_threads(torch_threads(self.options))
            self._threads.bound = True

    # -- what tasks use ------------------------------------------------------------------------
    def turn(self, device_type: str, cuda_turn: str = "streams") -> AbstractContextManager[Any]:
        """Held while a task runs torch math on ``device_type``.  On the CPU one task computes
        at a time: its ops already use every core, and two at once oversubscribe them, while
        the other tasks in flight read and write meanwhile.  On CUDA the same with
        ``cuda_turn="kernels"`` (the holder waits for its kernels before it lets go);
        "streams": no turn, the tasks' streams share the device."""
        if device_type == "cpu":
            return self._cpu_turn
        return self._cuda_turn if cuda_turn == "kernels" else contextlib.nullcontext()

    def fold_slots(self, n: int) -> threading.BoundedSemaphore:
        """At most ``n`` folds at once in this worker (n = the plan's tasks in flight): bounds
        the journals on disk (``Plan.partial_bytes``); folds of different rows run in parallel."""
        with self._guard:
            return self._slots.setdefault(n, threading.BoundedSemaphore(n))

    def row_lock(self, token: str, group: int) -> AbstractContextManager[Any]:
        """The lock of row ``group`` of job ``token`` (``RowLocks``); call from the task's thread."""
        return self.row_locks.get(token, group)

    @contextlib.contextmanager
    def task_stream(self, dev: torch.device) -> Iterator[None]:
        """On CUDA, run the task on its thread's own stream, so that two tasks in flight on
        one device overlap one's copies with the other's kernels.

        One stream per worker thread, kept for the runtime's life: the caching allocator
        reuses a freed block only for the stream it was allocated on, so a new stream per
        task (torch hands out up to 32 in turn) left each task's blocks cached on its own
        stream, and the worker's reserved memory grew far past its budget.
        """
        if dev.type != "cuda":
            yield
            return
        streams: dict[torch.device, torch.cuda.Stream] = self._threads.__dict__.setdefault("streams", {})
        stream = streams.get(dev)
        if stream is None:
            stream = streams[dev] = torch.cuda.Stream(dev)
        with torch.cuda.stream(stream):
            yield
        stream.synchronize()

    def close(self) -> None:
        """Drop the cache (the plugin's teardown).  The IO pool is not shut down: a task still
        running with this runtime keeps using it; its threads end once nothing holds the pool."""
        self.cache = HostCache(0)


class CQSAWorkerPlugin(WorkerPlugin):
    """Sets up a :class:`WorkerRuntime` on every worker; registered by :func:`ensure_runtime`."""

    idempotent = True  # registered again with the same options: nothing happens

    def __init__(self, options: RunOptions):
        self.options = options
        self.name = plugin_name(options)
        self.runtime: WorkerRuntime | None = None

    def setup(self, worker: Worker) -> None:
        self.runtime = WorkerRuntime(
            self.options, memory_limit=worker.memory_manager.memory_limit, owns_process=owns_process(worker),
            budget=_advertised(worker, self.options.resource))

    def teardown(self, worker: Worker) -> None:
        if self.runtime is not None:
            self.runtime.close()
            self.runtime = None


def owns_process(worker: Worker) -> bool:
    """Whether ``worker`` has its process to itself: a nanny started it (``LocalCluster
    (processes=True)``, ``dask worker``).  A threaded worker shares the user's process."""
    return worker.nanny is not None


_local: dict[str, WorkerRuntime] = {}
_local_locks = RowLocks()
_local_guard = threading.Lock()


def runtime(options: RunOptions) -> WorkerRuntime:
    """The runtime for a task run with ``options``: the one the plugin set up on this worker,
    else (a worker without the plugin, or no worker: tests calling tasks directly) one kept
    for this process that changes nothing process-wide."""
    try:
        from distributed import get_worker

        worker = get_worker()
    except (ImportError, ValueError):
        worker = None
    if worker is not None:
        plugin = worker.plugins.get(plugin_name(options))
        if isinstance(plugin, CQSAWorkerPlugin) and plugin.runtime is not None:
            return plugin.runtime
    with _local_guard:
        rt = _local.get(options.runtime_key)
        if rt is None:
            limit = worker.memory_manager.memory_limit if worker is not None else None
            rt = _local[options.runtime_key] = WorkerRuntime(options, memory_limit=limit, row_locks=_local_locks)
        return rt


def ensure_runtime(client: Client, options: RunOptions) -> None:
    """Make every worker of ``client``'s cluster (and every worker joining it) hold a runtime
    for ``options``, and the scheduler free the row locks of workers that leave
    (``lockrelease.py``).  Cheap when both are there already (one message to the scheduler); a
    runtime of other settings is replaced (its cache dropped; tasks still running with it
    finish on it).  Call before submitting a job's tasks."""
    name = plugin_name(options)
    # a lambda travels by value: the scheduler need not import this module (nor torch)
    present, releases = client.run_on_scheduler(lambda dask_scheduler, p=_PREFIX, r=RELEASE_PLUGIN: (
        [n for n in dask_scheduler.worker_plugins if n.startswith(p)], r in dask_scheduler.plugins))
    ensure_release(client, releases)
    if name in present:
        return
    for other in present:
        with contextlib.suppress(ValueError):  # removed meanwhile (another client replacing it too)
            client.unregister_worker_plugin(other)
    client.register_plugin(CQSAWorkerPlugin(options), name=name)


def worker_budget(resource: str) -> float | None:
    """The amount of ``resource`` the Dask worker running the calling task advertises
    (None outside a worker, or when it advertises none)."""
    try:
        from distributed import get_worker

        return _advertised(get_worker(), resource)
    except (ImportError, ValueError):
        return None


def _advertised(worker: Worker, resource: str) -> float | None:
    amount = worker.state.total_resources.get(resource)
    return float(amount) if amount else None
