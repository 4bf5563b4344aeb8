"""The host-memory cache of input blocks and partial results (one per worker runtime).

Each group of q, k, v is read by |D| quorum tasks and each partial result
once by its merge.  When a worker runs many of those tasks, keeping what it
read (and what it wrote) in host memory turns most store reads into memory
hits: the store is read about once instead of |D| times.

Policy: least-recently-used eviction under a byte budget
(``cqsa.host-cache``: bytes, "4GB", or "auto" = a quarter of the worker's
memory limit, or of the machine's RAM without one).  Entries are CPU
tensors; keys include the job token, so jobs never see each other's data.
A partial is dropped once merged.  The cache is only an accelerator: every
entry is also durably in the store, so a lost worker loses nothing.
The worker runtime (``runtime.py``) owns the cache; this module only
implements it.
"""

from __future__ import annotations

import threading
from collections import OrderedDict
from collections.abc import Callable, Hashable

import psutil
import torch

from cqsa_dask.core.units import parse_budget

__all__ = ["HostCache", "cache_capacity"]


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


def cache_capacity(setting: int | str, memory_limit: float | None = None) -> int:
    """Bytes of the cache for ``cqsa.host-cache`` = ``setting``: bytes or "4GB"; 0 for none;
    "auto": a quarter of ``memory_limit`` (the worker's), or of the machine's RAM without one."""
    if setting != "auto":
        return 0 if setting in (0, "0") else parse_budget(setting)
    return int((memory_limit or psutil.virtual_memory().total) // 4)
