"""What a worker process sets up for its tasks: the CUDA allocator's segments."""

from __future__ import annotations

import os

import pytest

from cqsa_dask import tasks


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
