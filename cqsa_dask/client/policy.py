"""Run policy: how a job is sized for the device its workers compute on.

The planner (``core.plan``) is pure arithmetic; what it needs beyond the
problem and the budget depends on where tasks run, and that is a property of
the *workers*, not of the machine the job is submitted from::

    device kind   tasks in flight (cqsa.tasks-in-flight "auto")   host staging
    cuda          2: one task loads while another computes         yes: read-ahead and write-behind
                                                                    buffers live in host memory
    cpu           1: one task already uses every core              no: they are the same memory

So a job submitted from a CPU-only login node to GPU workers is planned for
the GPU.  The device kind comes from, in order: the workers of a running
cluster (each resolves ``cqsa.device`` as it would for a task and answers),
or, for a local cluster about to be started, this machine (with torch
already loaded: ``torch.cuda.is_available()``; without it, as ``cqsa plan``
answers in well under a second, the presence of an NVIDIA device node).

These settings size a run; they are not part of the job's identity: a job
resumes under other settings (another host, margin or tasks in flight) as
long as its problem and the planner's decision (groups, heads per task,
partials) are the same (``Plan.identity``).
"""

from __future__ import annotations

import glob
import os
import sys
from typing import TYPE_CHECKING, Any, Literal

from cqsa_dask import config
from cqsa_dask.core.errors import BudgetError, InvalidInputError, SchedulerError
from cqsa_dask.core.plan import parse_query_piece
from cqsa_dask.core.units import parse_budget

if TYPE_CHECKING:
    from distributed import Client

__all__ = ["DeviceKind", "local_device_kind", "plan_options", "stream_limit", "workers_device_kind"]

DeviceKind = Literal["cuda", "cpu"]


def _kind_of(setting: str) -> DeviceKind:
    """The device kind ``cqsa.device`` = ``setting`` resolves to in this process."""
    if setting != "auto":
        return "cuda" if str(setting).startswith("cuda") else "cpu"
    if "torch" in sys.modules:  # loaded already: ask it (what a task would do)
        import torch

        return "cuda" if torch.cuda.is_available() else "cpu"
    visible = os.environ.get("CUDA_VISIBLE_DEVICES")
    if visible is not None and visible.strip() in ("", "-1", "none", "NoDevFiles"):
        return "cpu"
    return "cuda" if glob.glob("/dev/nvidia[0-9]*") else "cpu"


def local_device_kind() -> DeviceKind:
    """The device kind tasks of a local cluster on this machine would use."""
    return _kind_of(str(config.get("device")))


def workers_device_kind(client: Client) -> DeviceKind:
    """The device kind the workers of ``client``'s scheduler compute on.

    Raises :class:`SchedulerError` when there are no workers, or when they
    disagree (one plan cannot fit both kinds: run one kind per scheduler, or
    force ``cqsa.device``).
    """
    from cqsa_dask.execution.process import describe_worker  # torch: only where workers are asked

    described: dict[str, Any] = client.run(describe_worker, str(config.get("device")))
    kinds = {addr: d["device"] for addr, d in described.items()}
    if not kinds:
        raise SchedulerError("the Dask scheduler has no workers: start some with `dask worker ADDRESS "
                             f"--resources {config.get('resource')}=BYTES`")
    found = sorted(set(kinds.values()))
    if len(found) > 1:
        counts = ", ".join(f"{k} on {sum(v == k for v in kinds.values())}" for k in found)
        raise SchedulerError(f"the workers compute on different devices ({counts}); one job is planned for one "
                             "kind: give it workers of one kind, or set cqsa.device")
    return "cuda" if found[0] == "cuda" else "cpu"


def plan_options(kind: DeviceKind | None = None) -> dict[str, Any]:
    """Keyword arguments of ``make_plan`` that size a job for device ``kind`` (default: this machine's).

    ``cqsa.tasks-in-flight`` ("auto": 2 on CUDA, 1 on the CPU), host staging on
    CUDA, ``cqsa.memory-margin``, ``cqsa.partials``, ``cqsa.partials-limit``, ``cqsa.query-piece``
    and ``cqsa.stream-keys`` (``stream_limit``).
    """
    cuda = (kind or local_device_kind()) == "cuda"
    flight = config.get("tasks-in-flight")
    return {
        "stream_limit": stream_limit(config.get("stream-keys"), cuda),
        "tasks_in_flight": (2 if cuda else 1) if flight == "auto" else int(flight),
        "margin": float(config.get("memory-margin")),
        "host_staging": cuda,
        "partials": str(config.get("partials")),
        "partials_limit": config.get("partials-limit"),
        "query_piece": parse_query_piece(config.get("query-piece")),
    }


def stream_limit(value: Any, cuda: bool) -> int:
    """``cqsa.stream-keys`` as the planner's ``stream_limit`` (bytes of host memory the k and v of a
    W = 1 job's tasks in flight may take when streamed to the device in key blocks; 0: never).

    "auto": on CUDA a quarter of this machine's memory (the workers' machine for a local cluster;
    set bytes for workers elsewhere), on the CPU 0 (host memory is the device there); true: a
    quarter of this machine's memory on any device; false or 0: never; bytes ("8GB"): that much.
    """
    if isinstance(value, str) and value.strip().lower() in ("auto", "true", "false"):
        value = {"auto": cuda, "true": True, "false": False}[value.strip().lower()]
    if isinstance(value, bool):
        if not value:
            return 0
        import psutil

        return int(psutil.virtual_memory().total // 4)
    try:
        return parse_budget(value) if value not in (0, "0") else 0
    except BudgetError:
        raise InvalidInputError(f"cqsa.stream-keys must be 'auto', true, false or bytes such as '8GB', "
                                f"got {value!r}") from None
