"""Clients and clusters: the embedded local cluster, or any Dask scheduler.

The memory budget is a Dask worker resource (``cqsa.resource``, default
``device_mem``).  The local cluster advertises it on its workers; with an
external scheduler the user starts ``dask worker ADDR --resources
device_mem=12e9``.  Before submitting, :func:`check_capacity` makes sure at
least one worker can hold a task, since a resource request nobody satisfies
would wait forever.  The local cluster's scheduler preloads
``cqsa_dask.dashboard`` (the /cqsa page, its JSON and Prometheus metrics).
"""

from __future__ import annotations

import contextlib
import logging
import signal
import threading
from collections.abc import Iterator
from typing import Any

from distributed import Client, LocalCluster

from cqsa_dask import config
from cqsa_dask.core.errors import SchedulerError

__all__ = ["DASHBOARD_PRELOAD", "advertised", "check_capacity", "connect"]

DASHBOARD_PRELOAD = "cqsa_dask.dashboard"

log = logging.getLogger(__name__)


@contextlib.contextmanager
def connect(client: Client | None = None, scheduler: str | None = None, *,
            budget_bytes: int, resource: str, threads: int = 2) -> Iterator[Client]:
    """Yield ``client``, a client of ``scheduler``, or one of a new local cluster.

    A local cluster gets ``threads`` threads per worker unless
    ``cqsa.local-cluster.threads-per-worker`` says otherwise.  Only what
    this function starts is closed on exit.
    """
    if client is not None:
        yield client
        return
    if scheduler is not None:
        try:
            c = Client(scheduler, timeout="10s")
        except (OSError, TimeoutError) as e:
            raise SchedulerError(f"no Dask scheduler answers at {scheduler!r}: {e}") from None
        with c:
            yield c
        return
    def lc(key: str) -> Any:
        return config.get(f"local-cluster.{key}")

    # The scheduler runs in this process: register the /cqsa page before it is
    # built, then preload the module, as `dask scheduler --preload
    # cqsa_dask.dashboard` does for a scheduler of the user's own.
    from cqsa_dask import dashboard  # noqa: F401

    with _no_sigint_in_children():  # the workers are spawned now, with SIGINT ignored; the job is not
        cluster = LocalCluster(
            n_workers=int(lc("n-workers")),
            threads_per_worker=threads if lc("threads-per-worker") == "auto" else int(lc("threads-per-worker")),
            processes=bool(lc("processes")), dashboard_address=lc("dashboard-address"),
            resources={resource: float(budget_bytes)},
            silence_logs=logging.getLevelName(str(lc("silence-logs")).upper()),
            scheduler_kwargs={"preload": [DASHBOARD_PRELOAD]},
        )
    with cluster, Client(cluster) as c:
        yield c


@contextlib.contextmanager
def _no_sigint_in_children() -> Iterator[None]:
    """Start worker processes with SIGINT ignored: Ctrl-C in a terminal goes to the whole process
    group, and each worker (and its nanny) would print a KeyboardInterrupt traceback.  The user's
    process alone is interrupted; it closes the cluster, which stops the workers.  Python keeps an
    inherited SIG_IGN for SIGINT, so only the start-up window needs the handler changed."""
    if threading.current_thread() is not threading.main_thread():
        yield
        return
    previous = signal.signal(signal.SIGINT, signal.SIG_IGN)
    try:
        yield
    finally:
        signal.signal(signal.SIGINT, previous)


def advertised(client: Client, resource: str) -> list[float]:
    """The amount of ``resource`` each connected worker advertises.

    Asked of the scheduler itself: the client's cached scheduler info is
    replaced by a periodic refresh that may momentarily list no workers.
    """

    def read(dask_scheduler: Any) -> list[float]:
        return [float(ws.resources.get(resource, 0)) for ws in dask_scheduler.workers.values()]

    return list(client.run_on_scheduler(read))


def check_capacity(client: Client, resource: str, need: int) -> None:
    """Raise :class:`SchedulerError` unless some worker offers ``need`` of ``resource``."""
    have = advertised(client, resource)
    if not have:
        raise SchedulerError("the Dask scheduler has no workers: start some with `dask worker ADDRESS "
                             f"--resources {resource}=BYTES`")
    if max(have) < need:
        raise SchedulerError(
            f"no worker advertises {need:,} bytes of resource {resource!r} (largest: {max(have):,.0f}); "
            f"start workers with `--resources {resource}={need}` or lower the budget"
        )
