"""Clients and clusters: the embedded local cluster, or any Dask scheduler.

The memory budget is a Dask worker resource (``cqsa.resource``, default
``device_mem``).  The local cluster advertises it on its workers; with an
external scheduler the user starts ``dask worker ADDR --resources
device_mem=12e9``.  Before submitting, :func:`check_capacity` makes sure at
least one worker can hold a task, since a resource request nobody satisfies
would wait forever.  The local cluster's scheduler preloads
``cqsa_dask.dashboard`` (the /cqsa page, its JSON and Prometheus metrics);
its spec and the backend that starts it (dask-cuda's LocalCUDACluster, or
the same spec by hand) are ``client.local``'s.
"""

from __future__ import annotations

import contextlib
import logging
import os
from collections.abc import Iterator, Sequence
from typing import Any

from distributed import Client

from cqsa_dask import config
from cqsa_dask.client.local import DASHBOARD_PRELOAD, choose_backend, local_spec, start
from cqsa_dask.core.errors import InvalidInputError, SchedulerError
from cqsa_dask.core.units import parse_budget

__all__ = ["DASHBOARD_PRELOAD", "advertised", "check_capacity", "connect", "local_gpus", "resolve_budget",
           "visible_gpus"]

log = logging.getLogger(__name__)


@contextlib.contextmanager
def connect(client: Client | None = None, scheduler: str | None = None, *,
            budget_bytes: int, resource: str, threads: int = 2, gpus: Sequence[str] = ()) -> Iterator[Client]:
    """Yield ``client``, a client of ``scheduler``, or one of a new local cluster.

    A local cluster gets ``threads`` threads per worker unless
    ``cqsa.local-cluster.threads-per-worker`` says otherwise; with ``gpus``
    (device ids, ``local_gpus``) one worker process per entry, pinned to that
    device (``CUDA_VISIBLE_DEVICES``), each advertising ``budget_bytes``;
    otherwise ``cqsa.local-cluster.n-workers`` workers.  It is started by
    ``cqsa.local-cluster.backend`` (``client.local``: dask-cuda where it is
    installed and GPUs are in use, else the same spec by hand).  Only what
    this function starts is closed on exit.
    """
    if client is not None:
        yield client
        return
    if scheduler is not None:
        _check_tls_config(scheduler)
        try:
            c = Client(scheduler, timeout="10s")
        except (OSError, TimeoutError) as e:
            raise SchedulerError(f"no Dask scheduler answers at {scheduler!r}: {e}") from None
        with c:
            yield c
        return
    spec = local_spec(budget_bytes=budget_bytes, resource=resource, threads=threads, gpus=gpus)
    backend = choose_backend(spec)  # a backend that cannot start fails before anything is loaded
    # The scheduler runs in this process: register the /cqsa page before it is
    # built, then preload the module, as `dask scheduler --preload
    # cqsa_dask.dashboard` does for a scheduler of the user's own.
    from cqsa_dask import dashboard  # noqa: F401

    cluster = start(spec, backend)
    with cluster, Client(cluster) as c:
        yield c


def _check_tls_config(scheduler: str) -> None:
    """A ``tls://`` address needs a CA and a client certificate from dask config
    (``distributed.comm.tls.*``); without them distributed fails with a bare TypeError."""
    from distributed.security import Security

    if scheduler.startswith("tls://") and Security().get_connection_args("client")["ssl_context"] is None:
        raise SchedulerError(f"{scheduler} is a TLS address but dask config names no certificate: set "
                             "distributed.comm.tls.ca-file, .client.cert and .client.key (or DASK_DISTRIBUTED__COMM__"
                             "TLS__CA_FILE, __CLIENT__CERT, __CLIENT__KEY); see docs/cluster.md")


def visible_gpus() -> list[str]:
    """The ids of the GPUs this process may use (``CUDA_VISIBLE_DEVICES`` when set), without
    starting CUDA here (workers must create their own contexts on their own devices)."""
    import torch

    count = torch.cuda.device_count() if torch.cuda.is_available() else 0
    env = os.environ.get("CUDA_VISIBLE_DEVICES")
    ids = [s.strip() for s in env.split(",") if s.strip()] if env else [str(i) for i in range(count)]
    return ids[:count]


def local_gpus(setting: Any = None) -> list[str]:
    """The devices of a local cluster's workers: ``cqsa.local-cluster.gpus`` ("all": every
    visible GPU; "none": no GPU worker; "0,1" or [0, 1]: those of the visible GPUs, by index;
    repeats allowed).  :class:`InvalidInputError` names a GPU that does not exist."""
    value = config.get("local-cluster.gpus", setting)
    visible = visible_gpus()
    if value in (None, "all", "auto"):
        return visible
    if value in ("none", "", []) or value is False:
        return []
    items = value.split(",") if isinstance(value, str) else list(value)
    try:
        wanted = [int(str(x).strip()) for x in items if str(x).strip()]
    except ValueError:
        raise InvalidInputError(f"gpus must be 'all', 'none' or GPU numbers such as 0,1; got {value!r}") from None
    bad = [g for g in wanted if not 0 <= g < len(visible)]
    if bad:
        have = f"GPUs 0-{len(visible) - 1}" if visible else "no GPU"
        raise InvalidInputError(f"no GPU {', '.join(map(str, bad))}: this machine shows {have}; "
                                "give --gpus numbers among them (see nvidia-smi), or --gpus none")
    return [visible[g] for g in wanted]


def advertised(client: Client, resource: str) -> list[float]:
    """The amount of ``resource`` each connected worker advertises.

    Asked of the scheduler itself: the client's cached scheduler info is
    replaced by a periodic refresh that may momentarily list no workers.
    """

    def read(dask_scheduler: Any) -> list[float]:
        return [float(ws.resources.get(resource, 0)) for ws in dask_scheduler.workers.values()]

    return list(client.run_on_scheduler(read))


def resolve_budget(memory_budget: int | str | None, client: Client | None, resource: str,
                   default: int | str) -> int:
    """The budget in bytes: ``memory_budget`` when given; else the smallest amount of ``resource``
    that ``client``'s workers advertise; else ``default``."""
    if memory_budget is not None:
        return parse_budget(memory_budget)
    if client is not None:
        have = [h for h in advertised(client, resource) if h > 0]
        if have:
            return int(min(have))
    return parse_budget(default)


def check_capacity(client: Client, resource: str, need: int) -> None:
    """Raise :class:`SchedulerError` unless some worker offers ``need`` of ``resource``."""
    have = advertised(client, resource)
    if not have:
        raise SchedulerError("the Dask scheduler has no workers: start some with `dask worker ADDRESS "
                             f"--resources {resource}=BYTES`")
    if max(have) < need:
        raise SchedulerError(
            f"no worker advertises {need:,} bytes of resource {resource!r} (largest: {max(have):,.0f}); "
            f"start workers with `--resources {resource}={need}` (`dask worker`; LocalCluster(resources="
            f"{{{resource!r}: {need}}})) or lower the budget"
        )
