"""Stopping a job's running tasks at their next step, when they run in the submitting process.

A threaded local cluster (``cqsa.local-cluster.processes`` false, or "auto" on one GPU) runs
the tasks in the process that submitted them.  When the job ends early there (Ctrl-C, SIGTERM,
a failed task), the client cancels the job's futures, but Dask cannot stop a task already
running: it would run to its end (tens of seconds for a 4M-token task) before the cluster
closes and the process exits.  So the client marks the job here once its futures are
cancelled, and a running task checks the mark between steps::

    client  observed(): clear(token) ... cancel futures ─> request(token) ─> wait_idle(token)
    task    with running(token): for each step: check(token)  ─> JobCancelledError, the
            task's IO cancelled, its half-written row removed

``wait_idle`` lets the client return (and release the store's lease) only once the job's
tasks in this process have stopped writing: a failed or interrupted run leaves no temporary
file behind, and no task of it writes after another run took the store (bounded by
``WAIT_S``: a step of a large task can take longer; it is then logged).

Worker processes hold their own copy of this registry, which nobody marks: their tasks
end when the cluster stops their processes, as before.
"""

from __future__ import annotations

import contextlib
import logging
import threading
import time
from collections.abc import Iterator

from cqsa_dask.core.errors import JobCancelledError

__all__ = ["WAIT_S", "check", "clear", "request", "running", "wait_idle"]

log = logging.getLogger(__name__)

WAIT_S = 10.0  # the longest a stopped job waits for its tasks in this process to end

_stopped: set[str] = set()
_lock = threading.Lock()
_running: dict[str, int] = {}  # tasks of a job running in this process
_idle = threading.Condition(_lock)


@contextlib.contextmanager
def running(token: str) -> Iterator[None]:
    """Count a task of job ``token`` as running in this process while the block runs."""
    with _lock:
        _running[token] = _running.get(token, 0) + 1
    try:
        yield
    finally:
        with _lock:
            left = _running[token] - 1
            if left:
                _running[token] = left
            else:
                del _running[token]
                _idle.notify_all()


def wait_idle(token: str, timeout: float = WAIT_S) -> bool:
    """Wait up to ``timeout`` seconds for job ``token``'s tasks in this process to end; whether
    they did."""
    with _idle:
        done = _idle.wait_for(lambda: token not in _running, timeout)
    if not done:
        log.warning("job %s: %d task(s) in this process still running %.0f s after it stopped; they end "
                    "at their next step", token, _running.get(token, 0), timeout)
    return done


def request(token: str) -> None:
    """Stop job ``token``'s tasks running in this process at their next step."""
    with _lock:
        _stopped.add(token)


def clear(token: str) -> None:
    """Let job ``token`` run again in this process (a resumed run, a retry)."""
    with _lock:
        _stopped.discard(token)


def check(token: str) -> None:
    """Raise :class:`JobCancelledError` if job ``token`` was stopped.  The task's worker is
    given a moment to learn that the task was cancelled, so that the error is not logged as a
    failure of a task nobody waits for."""
    if token not in _stopped:
        return
    _wait_released(deadline=time.monotonic() + 1.0)
    raise JobCancelledError(f"job {token} was stopped (interrupted, or another of its tasks failed)")


def _wait_released(deadline: float) -> None:
    """Wait (until ``deadline``) for the running task's worker to hold it as cancelled: a
    task that ends in error while still "executing" there is logged as failed."""
    try:
        from distributed import get_worker
        from distributed.worker import thread_state

        worker, key = get_worker(), getattr(thread_state, "key", None)
    except (ImportError, ValueError):
        return
    while time.monotonic() < deadline:
        ts = worker.state.tasks.get(key) if key is not None else None
        if ts is None or ts.state not in ("executing", "long-running"):
            return
        time.sleep(0.02)
