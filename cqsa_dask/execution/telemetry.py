"""Telemetry: what the client and the tasks tell the scheduler while a job runs.

::

    client ──log_event("cqsa-job", {"action": "start", plan, done bitmaps})──┐
    task   ──Worker.log_event("cqsa-task", {"action": "start", index})───────┤
    task   ──Worker.log_event("cqsa-task", {"action": "end", bytes, memory})─┼─> scheduler
    client ──log_event("cqsa-job", {"action": "end", outcome})───────────────┘   CQSAPlugin
    task   ──context_meter.digest_metric("cqsa-compute", s, "seconds")──> Fine Performance
                                                       Metrics, grouped by span "cqsa-<token>"

The scheduler adds ``"worker"`` (the sender's address) to task events; the
plugin of :mod:`cqsa_dask.dashboard` turns them into the /cqsa page and the
Prometheus metrics.  Without that plugin the events only land in the
scheduler's event log (``client.get_events("cqsa-task")``).

Policy: telemetry is best effort.  Nothing here raises into a task or a job;
a failed send is logged at debug level.  This module imports neither bokeh
nor the dashboard, so worker processes stay light.
"""

from __future__ import annotations

import logging
import time
from typing import TYPE_CHECKING, Any, Literal

import numpy as np

if TYPE_CHECKING:
    from distributed import Client

    from cqsa_dask.core.plan import Plan

__all__ = [
    "JOB_TOPIC",
    "PLUGIN_NAME",
    "TASK_TOPIC",
    "announce_job",
    "finish_job",
    "job_span_name",
    "page_link",
    "report_task",
    "task_started",
    "worker_address",
]

log = logging.getLogger(__name__)

JOB_TOPIC = "cqsa-job"
TASK_TOPIC = "cqsa-task"
PLUGIN_NAME = "cqsa"

Outcome = Literal["done", "failed", "cancelled"]


def job_span_name(token: str) -> str:
    """Name of the ``distributed.span`` a job's tasks run in."""
    return f"cqsa-{token}"


def _bits(done: np.ndarray) -> dict[str, Any]:
    """A (W, B, J) 0/1 array as packed bits (msgpack-friendly, 1 bit per task)."""
    a = np.asarray(done, dtype=np.uint8)
    return {"shape": list(a.shape), "bits": np.packbits(a.ravel() != 0).tobytes()}


def announce_job(client: Client, token: str, plan: Plan, *, store: str, resource: str,
                 task_done: np.ndarray, merge_done: np.ndarray) -> None:
    """Tell the scheduler a job starts: its plan and the tasks a resume skips."""
    msg = {
        "action": "start", "token": token, "store": store, "resource": resource, "time": time.time(),
        "plan": plan.to_dict(), "task_done": _bits(task_done), "merge_done": _bits(merge_done),
    }
    _send(client, msg)


def finish_job(client: Client, token: str, outcome: Outcome, seconds: float) -> None:
    """Tell the scheduler a job ended (``outcome``: done, failed or cancelled)."""
    _send(client, {"action": "end", "token": token, "outcome": outcome, "seconds": seconds, "time": time.time()})


def _wire_safe(obj: Any) -> Any:
    """``obj`` with integers beyond 64 bits as floats: msgpack cannot carry them (a 2**30-token
    plan has 5.9e20 FLOPs), and a message that fails to serialise breaks the client's stream."""
    if isinstance(obj, dict):
        return {k: _wire_safe(v) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return type(obj)(_wire_safe(v) for v in obj)
    if isinstance(obj, int) and not isinstance(obj, bool) and not -(2**63) <= obj < 2**63:
        return float(obj)
    return obj


def _send(client: Client, msg: dict[str, Any]) -> None:
    try:
        client.log_event(JOB_TOPIC, _wire_safe(msg))
    except Exception as e:  # noqa: BLE001  (best effort: a lost scheduler fails the job elsewhere)
        log.debug("could not send %s event: %s", msg.get("action"), e)


def worker_address() -> str | None:
    """Address of the Dask worker running the calling task (None outside a worker)."""
    try:
        from distributed import get_worker

        return str(get_worker().address)
    except (ImportError, ValueError):
        return None


def task_started(token: str, kind: Literal["quorum", "merge"], index: tuple[int, int, int]) -> float:
    """Tell the scheduler a task starts executing; return the start (Unix seconds).

    The scheduler's "processing" state also covers tasks a worker holds back
    until its ``device_mem`` resource is free: only this event means running.
    """
    start = time.time()
    _log_task({"action": "start", "token": token, "kind": kind, "index": list(index), "start": start})
    return start


def report_task(token: str, index: tuple[int, int, int], record: dict[str, Any], start: float) -> None:
    """Send one finished task's figures (a task's result dict) to the scheduler.

    Also digests its compute/I-O seconds and bytes into Dask's fine performance
    metrics, where they appear under the task prefix and the job's span.
    """
    _digest(record)
    keys = ("kind", "seconds", "compute_seconds", "io_seconds", "bytes_read", "bytes_written",
            "peak_device_bytes", "device_in_use", "kernel")
    msg = {k: record[k] for k in keys if k in record}
    msg.update(action="end", token=token, index=list(index), start=start,
               end=start + float(record.get("seconds", 0.0)))
    _log_task(msg)


def _log_task(msg: dict[str, Any]) -> None:
    try:
        from distributed import get_worker

        worker = get_worker()
    except (ImportError, ValueError):  # called outside a worker (tests, debugging)
        return
    try:
        worker.log_event(TASK_TOPIC, msg)
    except Exception as e:  # noqa: BLE001  (best effort: telemetry never fails a task)
        log.debug("could not send task event: %s", e)


def _digest(record: dict[str, Any]) -> None:
    try:
        from distributed.metrics import context_meter
    except ImportError:  # pragma: no cover
        return
    if record.get("kind") == "quorum":
        context_meter.digest_metric("cqsa-compute", float(record["compute_seconds"]), "seconds")
        context_meter.digest_metric("cqsa-io", float(record["io_seconds"]), "seconds")
    else:
        context_meter.digest_metric("cqsa-merge", float(record["seconds"]), "seconds")
    context_meter.digest_metric("cqsa-read", float(record["bytes_read"]), "bytes")
    context_meter.digest_metric("cqsa-write", float(record["bytes_written"]), "bytes")


def _scheduler_has_plugin(dask_scheduler: Any) -> bool:
    return PLUGIN_NAME in dask_scheduler.plugins


def page_link(client: Client) -> str | None:
    """URL of the scheduler's /cqsa page, else Dask's dashboard link (or None).

    The page exists when the scheduler was started with the
    ``cqsa_dask.dashboard`` preload (as ``cqsa``'s local cluster is).
    """
    link = client.dashboard_link
    if not link or not link.endswith("/status"):
        return link
    try:
        enabled = bool(client.run_on_scheduler(_scheduler_has_plugin))
    except Exception:  # noqa: BLE001  (a scheduler without cqsa_dask cannot unpickle the probe)
        enabled = False
    return link[: -len("status")] + "cqsa" if enabled else link
