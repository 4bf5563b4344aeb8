"""The locks of shared rows (bounded partials): workers folding into one row take turns.

One lock per (job, row stripe): rows share a lock modulo :data:`STRIPES`.
Inside a Dask worker the lock is a lease of the scheduler's semaphore
extension (at most one lease per name), whose id names the holder::

    fold in worker W ──semaphore_acquire(name, lease "cqsa-holder:<W.id>:<uuid>",
                                         timeout ATTEMPT_SECONDS), again until granted──> scheduler
    ... the fold ...
                     ──semaphore_release(name, lease)──> scheduler
    W dies           ──> the scheduler removes W ──> RowLockRelease (lockrelease.py) frees
                         the leases of W at once

Why not ``distributed.Lock`` (the same extension): its lease ids are random,
so nothing ties a lease to a worker, and the lease of a worker killed inside
a fold was freed only when it timed out (``distributed.scheduler.locks.
lease-timeout``, 30 s): every later fold into that row, and its merge,
waited that long.  And a lease that times out while its holder still runs
(a fold longer than the timeout whose refreshes are late) lets a second fold
into the row: the extension's "overbooking".  These leases have no timeout;
only their holder, or the release plugin once the holder has left, frees them.

Outside a worker (tasks called directly, tests) the lock is a process-local
``threading.Lock``.
"""

from __future__ import annotations

import threading
import uuid
from contextlib import AbstractContextManager
from typing import TYPE_CHECKING, Any, Self

from cqsa_dask.execution.lockrelease import ATTEMPT_SECONDS, lease_id

if TYPE_CHECKING:
    from distributed import Worker

__all__ = ["STRIPES", "RowLocks", "lock_name"]

STRIPES = 256  # row locks per job: rows share a lock modulo this


def lock_name(token: str, stripe: int) -> str:
    """The scheduler-wide name of job ``token``'s lock of row stripe ``stripe``."""
    return f"cqsa-{token}-row-{stripe}"


class RowLocks:
    """The row locks of one process: a :class:`_LeaseLock` per (job, row stripe) inside a Dask
    worker, a ``threading.Lock`` outside one."""

    def __init__(self) -> None:
        self._local: dict[tuple[str, int], threading.Lock] = {}
        self._leased: dict[tuple[str, int], _LeaseLock] = {}
        self._guard = threading.Lock()

    def get(self, token: str, group: int) -> AbstractContextManager[Any]:
        """The lock of row ``group`` of job ``token``.  Call from the task's own thread (the lock
        binds to its worker there); use it from any thread."""
        key = (token, group % STRIPES)
        with self._guard:
            try:
                from distributed import get_worker

                worker = get_worker()
            except (ImportError, ValueError):
                return self._local.setdefault(key, threading.Lock())
            if key not in self._leased:
                self._leased[key] = _LeaseLock(lock_name(*key), worker)
            return self._leased[key]


class _LeaseLock:
    """A lease of the scheduler's semaphore ``name`` (one lease at most), held by a worker.

    Usable from any thread but the worker's event loop; each ``with`` block holds its own
    lease, so threads of one worker contend like threads of different workers."""

    def __init__(self, name: str, worker: Worker):
        self.name = name
        self._scheduler, self._loop, self._holder = worker.scheduler, worker.loop, str(worker.id)
        self._registered = False
        self._held = threading.local()  # the leases this thread holds, innermost last

    def __enter__(self) -> Self:
        from distributed.utils import sync

        lease = lease_id(self._holder, uuid.uuid4().hex)
        sync(self._loop, self._acquire, lease)
        self._held.__dict__.setdefault("leases", []).append(lease)
        return self

    def __exit__(self, *exc: object) -> None:
        from distributed.utils import sync

        sync(self._loop, self._release, self._held.leases.pop())

    async def _acquire(self, lease: str) -> None:
        """Wait for the lease in attempts of ATTEMPT_SECONDS (lockrelease.py says why); a retried
        request with the same id is idempotent on the scheduler."""
        from distributed.utils_comm import retry_operation

        if not self._registered:
            await retry_operation(self._scheduler.semaphore_register, name=self.name, max_leases=1,
                                  lease_timeout=None, operation=f"register row lock {self.name}")
            self._registered = True
        while not await retry_operation(self._scheduler.semaphore_acquire, name=self.name,
                                        timeout=ATTEMPT_SECONDS, lease_id=lease,
                                        operation=f"acquire row lock {self.name}"):
            pass

    async def _release(self, lease: str) -> None:
        from distributed.utils_comm import retry_operation

        await retry_operation(self._scheduler.semaphore_release, name=self.name, lease_id=lease,
                              operation=f"release row lock {self.name}")
