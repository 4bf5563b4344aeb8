"""Per-process host-memory cache of input blocks and partial results, and the IO pool.

Each group of q, k, v is read by |D| quorum tasks and each partial result
once by its merge.  When a worker runs many of those tasks, keeping what it
read (and what it wrote) in host memory turns most store reads into memory
hits: the store is read about once instead of |D| times.

Policy: least-recently-used eviction under a byte budget
(``cqsa.host-cache``: bytes, "4GB", or "auto" = a quarter of the worker's
memory limit, or of the machine's RAM outside a worker).  Entries are CPU
tensors; keys include the job token, so jobs never see each other's data.
A partial is dropped once merged.  The cache is only an accelerator: every
entry is also durably in the store, so a lost worker loses nothing.

The IO pool is a process-wide thread pool for store reads and writes, so a
task overlaps its IO with its compute (zarr's sync API is thread-safe).
"""

from __future__ import annotations

import threading
from collections import OrderedDict
from collections.abc import Callable, Hashable
from concurrent.futures import ThreadPoolExecutor
from functools import lru_cache

import psutil
import torch

from cqsa_dask.core.units import parse_budget

__all__ = ["HostCache", "host_cache", "io_pool"]


class HostCache:
    """A thread-safe LRU map from keys to CPU tensors, bounded in bytes."""

    def __init__(self, capacity: int):
        self.capacity = capacity
        self._items: OrderedDict[Hashable, torch.Tensor] = OrderedDict()
        self._bytes = 0
        self._lock = threading.Lock()
        self.hits = self.misses = 0

    @property
    def nbytes(self) -> int:
        return self._bytes

    def get(self, key: Hashable) -> torch.Tensor | None:
        with self._lock:
            t = self._items.get(key)
            if t is None:
                self.misses += 1
                return None
            self._items.move_to_end(key)
            self.hits += 1
            return t

    def put(self, key: Hashable, t: torch.Tensor) -> None:
        if t.nbytes > self.capacity:
            return
        with self._lock:
            old = self._items.pop(key, None)
            if old is not None:
                self._bytes -= old.nbytes
            self._items[key] = t
            self._bytes += t.nbytes
            while self._bytes > self.capacity:
                _, ev = self._items.popitem(last=False)
                self._bytes -= ev.nbytes

    def pop(self, key: Hashable) -> torch.Tensor | None:
        with self._lock:
            t = self._items.pop(key, None)
            if t is not None:
                self._bytes -= t.nbytes
            return t

    def get_or_load(self, key: Hashable, load: Callable[[], torch.Tensor]) -> torch.Tensor:
        """The cached tensor for ``key``, loading (and caching) it on a miss."""
        t = self.get(key)
        if t is None:
            t = load()
            self.put(key, t)
        return t


def _capacity(setting: int | str) -> int:
    if setting != "auto":
        return 0 if setting in (0, "0") else parse_budget(setting)
    try:
        from distributed import get_worker

        limit = get_worker().memory_manager.memory_limit
    except (ImportError, ValueError, AttributeError):
        limit = None
    return int((limit or psutil.virtual_memory().total) // 4)


@lru_cache(maxsize=1)
def host_cache(setting: int | str = "auto") -> HostCache:
    """The process's cache (created on first use with ``setting``)."""
    return HostCache(_capacity(setting))


@lru_cache(maxsize=1)
def io_pool(threads: int = 4) -> ThreadPoolExecutor:
    """The process's IO thread pool."""
    return ThreadPoolExecutor(max_workers=threads, thread_name_prefix="cqsa-io")
