"""Submitting a graph and waiting for it: the one loop every job and analysis goes through.

    client.get(graph, keys, sync=False) ──as_completed──> results, progress(done, total)
        the first task that errs (or is cancelled: lost workers or scheduler) cancels the rest
        and raises JobFailedError naming it; the whole wait runs inside the job's span, and the
        /cqsa page is told how it ended (done, failed, cancelled by Ctrl-C); a job that ends
        early stops its tasks running in this process (a threaded worker: execution/stop.py) and
        returns once they stopped writing
"""

from __future__ import annotations

import time
from collections.abc import Callable
from typing import Any

from distributed import Client, as_completed, span

from cqsa_dask.core.errors import JobFailedError
from cqsa_dask.execution import stop
from cqsa_dask.execution.telemetry import Outcome, finish_job, job_span_name

__all__ = ["Progress", "observed"]

Progress = Callable[[int, int], None]


def observed(client: Client, graph: Any, keys: list[Any], progress: Progress | None, token: str,
             what: str = "task", submitted: Callable[[], None] | None = None) -> tuple[list[dict[str, Any]], float]:
    """Run ``graph`` for ``keys`` in the span of job ``token``; (the tasks' records, seconds).
    ``what`` names a task in the failure message ("task", "analysis task"); ``submitted`` is
    called once the graph is with the scheduler."""
    t0 = time.perf_counter()
    outcome: Outcome = "failed"
    stop.clear(token)
    try:
        with span(job_span_name(token)):
            results = _execute(client, graph, keys, progress, what, submitted)
        outcome = "done"
    except KeyboardInterrupt:
        outcome = "cancelled"
        raise
    finally:
        if outcome != "done":  # its futures are cancelled: stop its tasks running in this process,
            stop.request(token)  # and return once they stopped writing (the caller then releases the lease)
            stop.wait_idle(token)
        seconds = time.perf_counter() - t0
        finish_job(client, token, outcome, seconds)
    return results, seconds


def _execute(client: Client, graph: Any, keys: list[Any], progress: Progress | None,
             what: str, submitted: Callable[[], None] | None = None) -> list[dict[str, Any]]:
    """Submit ``graph``, wait for ``keys``, fail fast with the failing task's name."""
    if not keys:
        return []
    futures = client.get(graph, keys, sync=False)
    if submitted is not None:
        submitted()
    total, done = len(futures), 0
    results = []
    try:
        for fut in as_completed(futures):
            if fut.status == "error":
                exc = fut.exception()
                raise JobFailedError(f"{what} {fut.key!r} failed: {type(exc).__name__}: {exc}")
            if fut.status == "cancelled":
                raise JobFailedError(f"{what} {fut.key!r} was cancelled (lost workers or scheduler)")
            results.append(fut.result())
            done += 1
            if progress is not None:
                progress(done, total)
    finally:
        client.cancel(futures)
    return results
