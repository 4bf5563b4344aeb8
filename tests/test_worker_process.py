"""What a worker process sets up for its tasks: the CUDA allocator's segments."""

from __future__ import annotations

import os

import pytest

from cqsa_dask.execution import tasks


def test_expandable_segments_are_set_unless_the_environment_chose(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv("PYTORCH_CUDA_ALLOC_CONF", raising=False)
    monkeypatch.delenv("PYTORCH_ALLOC_CONF", raising=False)
    tasks._expandable_segments()
    assert os.environ["PYTORCH_CUDA_ALLOC_CONF"] == "expandable_segments:True"
    for var in ("PYTORCH_CUDA_ALLOC_CONF", "PYTORCH_ALLOC_CONF"):  # either variable is the user's choice
        monkeypatch.delenv("PYTORCH_CUDA_ALLOC_CONF", raising=False)
        monkeypatch.setenv(var, "max_split_size_mb:64")
        tasks._expandable_segments()
        assert os.environ[var] == "max_split_size_mb:64"
        assert var == "PYTORCH_CUDA_ALLOC_CONF" or "PYTORCH_CUDA_ALLOC_CONF" not in os.environ
        monkeypatch.delenv(var)


def test_the_option_travels_with_each_task() -> None:
    assert tasks.worker_options()["expandable-segments"] is True


@pytest.mark.parametrize("budget", [10**5, 10**7, 10**8, 10**9, 2 * 10**9, 4 * 10**9, 16 * 10**9, 80 * 10**9])
def test_the_allocator_cap_sits_just_under_the_budget(budget: int) -> None:
    """From 1 GB up, below the budget by more than the 3.5 MB the reserve passed the cap on
    the H200 and by no more than 1 % or 32 MiB (the engine keeps its budget); any budget
    keeps at least 90 % of itself."""
    cap = tasks._capped_bytes(budget)
    assert 0.9 * budget <= cap < budget
    if budget >= 10**9:
        assert budget - 32 * 2**20 >= cap >= min(0.99 * budget, budget - 32 * 2**20)
