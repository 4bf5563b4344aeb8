"""Interrupting a job whose worker is a thread of the submitting process (``execution/stop.py``).

::

    run() on LocalCluster(processes=False)   Ctrl-C (KeyboardInterrupt in the main thread) while
                                            a task runs: the task stops at its next query piece
                                            (its marker unset, no failure logged) before run()
                                            returns, the worker is idle; resume computes the
                                            rest, exact against float64
    stop.request / clear / check             per job, in this process only
    stop.running / wait_idle                 the job's tasks in this process, waited for
"""

from __future__ import annotations

import logging
import os
import signal
import threading
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import dask.config
import pytest
import torch
import zarr
from conftest import draw_inputs
from distributed import Client, LocalCluster
from reference import check_exact

import cqsa_dask
from cqsa_dask.core.errors import CQSAError, JobCancelledError
from cqsa_dask.execution import stop
from cqsa_dask.execution.taskio import TaskIO
from cqsa_dask.execution.tasks import _QuorumRun
from cqsa_dask.store.chunkio import read_markers
from cqsa_dask.store.jobstate import status
from cqsa_dask.store.layout import array, engine, open_store


def test_a_stop_is_per_job_and_cleared_by_the_next_run() -> None:
    stop.check("job-a")  # never stopped: nothing happens
    stop.request("job-a")
    with pytest.raises(JobCancelledError, match="job job-a was stopped") as e:
        stop.check("job-a")
    assert isinstance(e.value, CQSAError)
    stop.check("job-b")  # another job runs on
    stop.clear("job-a")
    stop.check("job-a")


def test_wait_idle_returns_once_the_jobs_tasks_in_this_process_ended(caplog: pytest.LogCaptureFixture) -> None:
    """``wait_idle`` waits for the tasks of its job only, and gives up (logging it) at its timeout."""
    release, other = threading.Event(), threading.Event()

    def task(token: str, until: threading.Event) -> None:
        with stop.running(token):
            until.wait(10)

    threads = [threading.Thread(target=task, args=("job-w", release)),
               threading.Thread(target=task, args=("job-w", release)),
               threading.Thread(target=task, args=("job-x", other))]
    for t in threads:
        t.start()
    time.sleep(0.05)
    with caplog.at_level(logging.WARNING, logger="cqsa_dask.execution.stop"):
        assert not stop.wait_idle("job-w", timeout=0.1)
    assert "job job-w: 2 task(s) in this process still running" in caplog.text
    threading.Timer(0.2, release.set).start()
    t0 = time.monotonic()
    assert stop.wait_idle("job-w", timeout=5)  # job-x still runs
    assert 0.15 < time.monotonic() - t0 < 4
    assert stop.wait_idle("job-never-ran", timeout=0)
    other.set()
    for t in threads:
        t.join()


def _interrupt_once_running(cluster: LocalCluster, fired: list[Any], store: Path) -> None:
    """Send this process SIGINT (what Ctrl-C in a terminal does) once the threaded worker runs
    its first quorum task and has a row of it open (written in part: a temporary chunk file in
    ``store``); that task's key goes to ``fired``."""
    (worker,) = cluster.workers.values()
    deadline = time.monotonic() + 60
    while time.monotonic() < deadline:
        running = [ts for ts in list(worker.state.executing) if "cqsa-quorum" in str(ts.key)]  # type: ignore[union-attr]
        if running and list(store.rglob("*.tmp")):
            fired.append(running[0].key)
            os.kill(os.getpid(), signal.SIGINT)
            return
        time.sleep(0.01)


@pytest.fixture
def python_sigint() -> Iterator[None]:
    """Python's own SIGINT handler (KeyboardInterrupt), whatever an earlier import installed
    (dask_jobqueue's runner module sets one that exits)."""
    previous = signal.signal(signal.SIGINT, signal.default_int_handler)
    yield
    signal.signal(signal.SIGINT, previous)


@pytest.mark.integration
@pytest.mark.usefixtures("python_sigint")
def test_ctrl_c_stops_a_threaded_workers_running_task_at_its_next_piece(
        tmp_path: Path, caplog: pytest.LogCaptureFixture, monkeypatch: pytest.MonkeyPatch) -> None:
    """One task per head, each in 64 query pieces of 128, every piece held 50 ms longer (so that
    a task lasts seconds on any machine), its clean-up held 0.5 s: Ctrl-C while the first runs
    stops it at a piece, and run() returns once its open row is gone; it never sets its marker (without the stop, the worker would run it to its end before the
    cluster could close), and nothing is logged as a failed task.  A resume on the same store
    completes the job, exact against float64."""
    real, real_abort = _QuorumRun.compute, TaskIO.abort

    def slower(self: _QuorumRun, *args: Any) -> Any:
        time.sleep(0.05)
        return real(self, *args)

    def slow_abort(self: TaskIO) -> None:
        time.sleep(0.5)  # the stopped task's clean-up outlasts run()'s own way out
        real_abort(self)

    monkeypatch.setattr(_QuorumRun, "compute", slower)
    monkeypatch.setattr(TaskIO, "abort", slow_abort)
    inp = draw_inputs(1, 2, 2, 8192, 64, torch.float32)
    print(f"inputs: {inp.ctx}")
    store = tmp_path / "job.zarr"
    inp.store(store, chunk_tokens=2048)
    fired: list[Any] = []
    with dask.config.set({"cqsa.query-piece": 128}), \
            LocalCluster(n_workers=1, threads_per_worker=1, processes=False, resources={"device_mem": 2e9},
                         dashboard_address=None) as cluster, Client(cluster) as c:
        (worker,) = cluster.workers.values()
        threading.Thread(target=_interrupt_once_running, args=(cluster, fired, store), daemon=True).start()
        with caplog.at_level(logging.ERROR, logger="distributed"), pytest.raises(KeyboardInterrupt):
            cqsa_dask.run(store, client=c, memory_budget="1GB")
        assert fired, "the job ended before a task was interrupted"
        # run() returned only once the task stopped writing: its half-written row is gone
        assert not list(store.rglob("*.tmp")), "the interrupted task's row was still open when run() returned"
        deadline = time.monotonic() + 30
        while worker.state.executing and time.monotonic() < deadline:  # type: ignore[union-attr]
            time.sleep(0.05)
        assert not worker.state.executing, "the interrupted task still runs"  # type: ignore[union-attr]
        st = status(store)
        assert st.plan["groups"] == 1 and st.tasks_total == 2, st.plan
        _, task, batch, block = fired[0]
        done = read_markers(array(engine(open_store(store, mode="r")), "task_done"))
        assert not done[task, batch, block], "the running task ran to its end instead of stopping at a piece"
        assert not [r for r in caplog.records if "Compute Failed" in r.getMessage()], caplog.text
        monkeypatch.undo()
        res = cqsa_dask.run(store, client=c, memory_budget="1GB")
    assert res.resumed
    out, lse = (torch.from_numpy(zarr.open_group(store, mode="r")[n][...]) for n in ("out", "lse"))
    check_exact(inp.q, inp.k, inp.v, out, lse, causal=False, scale=None, context=inp.ctx)
