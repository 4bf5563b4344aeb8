"""What billion-token jobs stress: messages with huge figures, tasks with many slots."""

from __future__ import annotations

import gc
import weakref
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import torch
import zarr
from conftest import draw_inputs

from cqsa_dask import tasks
from cqsa_dask.dashboard_events import JOB_TOPIC, announce_job
from cqsa_dask.layout import create_outputs, write_tensor
from cqsa_dask.plan import make_plan


def test_billion_token_plan_announcement_reaches_the_scheduler(client) -> None:  # type: ignore[no-untyped-def]
    """Its FLOPs (5.9e20) exceed 64 bits: msgpack cannot carry such an int, and a message that
    fails to serialise broke the client's connection (a 2**30 run hung before its first task)."""
    plan = make_plan(seq_len=2**30, heads=1, head_dim=128, budget="12GB", tasks_in_flight=2, host_staging=True)
    assert plan.flops > 2**64
    grid = (plan.groups, 1, 1)
    token = "scale-test"
    announce_job(client, token, plan, store="/nowhere", resource="device_mem",
                 task_done=np.zeros(grid, np.uint8), merge_done=np.zeros(grid, np.uint8))
    assert client.submit(sum, [1, 2], pure=False).result(timeout=30) == 3, "the client's stream still works"
    got = [m for _, m in client.get_events(JOB_TOPIC) if m.get("token") == token]
    assert got and got[0]["plan"]["flops"] == float(plan.flops) and got[0]["plan"]["groups"] == plan.groups


def test_a_task_holds_at_most_three_query_groups(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """A quorum task streams q: the group in use and two read ahead, never all |D| of them.

    At N = 2**30 a task has 108 slots; keeping every consumed q alive held 2.6 GB more per
    task on the GPU (generated inputs live there), 15.7 GB for two tasks under a 12 GB budget.
    """
    inp = draw_inputs(1, 2, 2, 900, 16, torch.float32)
    path = tmp_path / "job.zarr"
    g = zarr.open_group(str(path), mode="w", zarr_format=3)
    for name, t in (("q", inp.q), ("k", inp.k), ("v", inp.v)):
        write_tensor(g, name, t, (1, 2, 300, 16))
    plan = make_plan(seq_len=900, heads=2, head_dim=16, dtype="float32", groups=57, budget="1GB")
    create_outputs(g, plan, "tok")
    assert len(plan.work(0)) == plan.quorum_size == 8
    live: weakref.WeakSet[torch.Tensor] = weakref.WeakSet()
    most = [0]
    read_q, attend = tasks._TaskIO.q, tasks.attend

    def tracked_q(self: Any, a: int, device: Any = None) -> torch.Tensor:
        t = read_q(self, a, device)
        live.add(t)
        return t

    def counting_attend(*args: Any, **kw: Any) -> Any:
        gc.collect()
        most[0] = max(most[0], len(live))
        return attend(*args, **kw)

    monkeypatch.setattr(tasks._TaskIO, "q", tracked_q)
    monkeypatch.setattr(tasks, "attend", counting_attend)
    opts = {**tasks.worker_options(), "host-cache": 0, "device": "cpu"}
    rec = tasks.quorum_task(str(path), "tok", 0, 0, 0, opts)
    assert rec["pairs"] > 8 and 1 <= most[0] <= 3, f"{most[0]} query groups alive at once"
