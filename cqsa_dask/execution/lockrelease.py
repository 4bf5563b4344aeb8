"""The scheduler's side of the row locks: free the leases of workers that left.

A row lock (``rowlocks.py``) is a lease of the scheduler's semaphore
extension whose id names the worker holding it, and which never times out::

    lease id  "cqsa-holder:<worker id>:<uuid>"      (worker id: Worker.id, the scheduler's
                                                     WorkerState.server_id)

    scheduler.remove_worker(W) ──> RowLockRelease.remove_worker
        free every lease whose holder is no longer a worker of the scheduler,
        now and every 0.2 s for the next ``window`` seconds

The repeat covers an acquire the dead worker had left waiting on the
scheduler: the scheduler finishes such a request whatever became of its
sender, so it may still be granted, to nobody, after the removal.  Workers
wait in attempts of ``ATTEMPT_SECONDS`` (``rowlocks.py``), so no request of a
removed worker outlives ``ATTEMPT_SECONDS`` after it; the window adds a margin.
Each freed lease is logged to the scheduler's event topic ``cqsa-row-locks``.

Policy: this module imports only the standard library, tornado and
distributed (no torch, no cqsa_dask): :func:`ensure_release` ships it to the
scheduler by value, so a scheduler without cqsa_dask installed runs it, and
it needs no scheduler configuration.  It reads the semaphore extension's
lease table (``SemaphoreExtension.leases``, distributed's own structure) and
frees through the extension's ``release`` handler; without that extension
it does nothing.
"""

from __future__ import annotations

import logging
import sys
import time
from typing import TYPE_CHECKING, Any

from distributed.diagnostics.plugin import SchedulerPlugin

if TYPE_CHECKING:
    from distributed import Client, Scheduler

__all__ = ["ATTEMPT_SECONDS", "HOLDER_TAG", "PLUGIN_NAME", "TOPIC", "RowLockRelease", "ensure_release", "holder_of",
           "lease_id"]

log = logging.getLogger(__name__)

PLUGIN_NAME = "cqsa-row-locks"
TOPIC = "cqsa-row-locks"  # scheduler event topic: one event per sweep that freed leases
HOLDER_TAG = "cqsa-holder:"
ATTEMPT_SECONDS = 1.0  # a worker's request for a row lock waits at most this long on the scheduler
_MARGIN_SECONDS = 2.0
_SWEEP_MS = 200


def lease_id(worker_id: str, unique: str) -> str:
    """The id of a lease held by the worker whose ``Worker.id`` is ``worker_id``."""
    return f"{HOLDER_TAG}{worker_id}:{unique}"


def holder_of(lease: Any) -> str | None:
    """The worker id a lease id names; None for a lease that is not a row lock's."""
    if not isinstance(lease, str) or not lease.startswith(HOLDER_TAG):
        return None
    return lease[len(HOLDER_TAG):].rpartition(":")[0]


class RowLockRelease(SchedulerPlugin):
    """Frees the row-lock leases of removed workers (module docstring)."""

    name = PLUGIN_NAME
    idempotent = True  # registered by every run: the first one stays

    def __init__(self, window: float = ATTEMPT_SECONDS + _MARGIN_SECONDS):
        self.window = window
        self.scheduler: Scheduler | None = None
        self._until = 0.0
        self._sweeps: Any = None  # a tornado PeriodicCallback while sweeping

    async def start(self, scheduler: Scheduler) -> None:
        self.scheduler = scheduler

    def remove_worker(self, scheduler: Scheduler, worker: str, *, stimulus_id: str, **kwargs: Any) -> None:
        from tornado.ioloop import PeriodicCallback

        self.scheduler = scheduler
        self.free()
        self._until = time.monotonic() + self.window
        if self._sweeps is None:
            self._sweeps = PeriodicCallback(self._sweep, _SWEEP_MS)
            self._sweeps.start()

    def _sweep(self) -> None:
        self.free()
        if time.monotonic() > self._until and self._sweeps is not None:
            self._sweeps.stop()
            self._sweeps = None

    async def close(self) -> None:
        if self._sweeps is not None:
            self._sweeps.stop()
            self._sweeps = None

    def free(self) -> int:
        """Release every row-lock lease whose holder is not a worker now; how many were released."""
        scheduler = self.scheduler
        ext = scheduler.extensions.get("semaphores") if scheduler is not None else None
        if scheduler is None or ext is None:
            return 0
        live = {ws.server_id for ws in scheduler.workers.values()}
        freed = []
        for name, leases in list(ext.leases.items()):
            for lease in list(leases):
                holder = holder_of(lease)
                if holder is not None and holder not in live:
                    ext.release(name=name, lease_id=lease)
                    freed.append({"name": name, "holder": holder})
        if freed:
            log.info("freed %d row lock(s) of workers that left: %s", len(freed), freed)
            scheduler.log_event(TOPIC, {"action": "freed", "leases": freed})
        return len(freed)


def ensure_release(client: Client, present: bool) -> None:
    """Register :class:`RowLockRelease` on ``client``'s scheduler unless ``present`` (its name is
    among the scheduler's plugins).  The class travels by value (module docstring)."""
    if present:
        return
    import cloudpickle

    module = sys.modules[__name__]
    if module.__name__ not in cloudpickle.list_registry_pickle_by_value():
        cloudpickle.register_pickle_by_value(module)
    client.register_plugin(RowLockRelease(), name=PLUGIN_NAME)
