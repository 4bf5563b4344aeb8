"""Billion-token plans through Dask: what a 2**30-token job sends over the wire fits it."""

from __future__ import annotations

import numpy as np

from cqsa_dask.dashboard_events import JOB_TOPIC, announce_job
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
