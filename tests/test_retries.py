"""Which failures are tried again: transient ones inside the task, deterministic ones never.

    attempt ──ok──> result
       │ OSError, CUDA OOM, ... (transient) ──> again, up to cqsa.retries times
       └ CQSAError, ValueError, ... (the same on every attempt) ──> the job stops at once
"""

from __future__ import annotations

from collections import Counter
from pathlib import Path

import pytest
from distributed import Client, LocalCluster

import cqsa_dask
from cqsa_dask.core.errors import InvalidInputError, JobFailedError, StoreError
from cqsa_dask.execution import tasks
from cqsa_dask.execution.retry import attempts, with_attempts
from cqsa_dask.store.random_inputs import write_random_inputs


class _Flaky:
    """Fails with ``error`` the first ``times`` calls, then returns the number of calls."""

    def __init__(self, error: BaseException, times: int):
        self.error, self.times, self.calls = error, times, 0

    def __call__(self) -> int:
        self.calls += 1
        if self.calls <= self.times:
            raise self.error
        return self.calls


@pytest.mark.parametrize("retries", [0, 1, 2, 5])
def test_transient_failures_are_tried_again(retries: int) -> None:
    ok = _Flaky(OSError("connection reset"), retries)
    assert attempts(retries, ok, "t") == retries + 1
    worse = _Flaky(OSError("connection reset"), retries + 1)
    with pytest.raises(OSError, match="connection reset"):
        attempts(retries, worse, "t")
    assert worse.calls == retries + 1


def test_a_graph_task_tries_again_through_with_attempts() -> None:
    ok = _Flaky(OSError("reset"), 2)
    assert with_attempts(2, lambda: ok()) == 3
    bad = _Flaky(StoreError("damaged"), 1)
    with pytest.raises(StoreError):
        with_attempts(2, bad)
    assert bad.calls == 1


@pytest.mark.parametrize("error", [InvalidInputError("input q holds NaN"), StoreError("damaged chunk"),
                                   ValueError("dtype"), TypeError("dtype mismatch")])
def test_deterministic_failures_are_not(error: Exception) -> None:
    f = _Flaky(error, 1)
    with pytest.raises(type(error)):
        attempts(3, f, "t")
    assert f.calls == 1


def test_a_nan_input_stops_the_job_after_one_attempt(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """A real job (threaded cluster, so the count is seen here): the task that reads the NaN runs
    once, and the job fails with the line naming the input and its group."""
    store = tmp_path / "job.zarr"
    g = write_random_inputs(store, seq_len=700, heads=2, head_dim=16, dtype="float32", seed=5)
    g["q"][0, 1, 650, 3] = float("nan")
    runs: Counter[int] = Counter()
    real = tasks._QuorumRun.run

    def counted(self: tasks._QuorumRun) -> dict:  # type: ignore[type-arg]
        runs[self.task] += 1
        return real(self)

    monkeypatch.setattr(tasks._QuorumRun, "run", counted)
    with LocalCluster(n_workers=1, threads_per_worker=1, processes=False, dashboard_address=None,
                      resources={"device_mem": 1e9}) as cluster, Client(cluster) as client, \
            pytest.raises(JobFailedError, match=r"input q holds NaN or Inf in group 6 "):
        cqsa_dask.run(store, client=client, groups=7, memory_budget="1GB")
    assert runs and max(runs.values()) == 1, runs
