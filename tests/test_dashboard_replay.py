"""benchmarks/dashboard_replay.py: record a real job's /cqsa inputs, replay them into a page.

::

    local cluster + DashboardRecorder ── a small job, then a real job (13 groups) ── record (JSON
        round trip) ── only(the second job's token): its inputs alone
    a second local cluster ── install(record, the moment half the tasks were done)
        snapshot: counts and bytes against the record, summed here independently
        chromium opens /cqsa ── the frozen page shows those counts ── screenshot
"""

from __future__ import annotations

import json
import shutil
import sys
from pathlib import Path

import dask.config
import pytest

from cqsa_dask.client.api import run
from cqsa_dask.client.cluster import connect
from cqsa_dask.execution.telemetry import TASK_TOPIC
from cqsa_dask.store.random_inputs import write_random_inputs

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "benchmarks"))
import dashboard_replay as replay

pytestmark = pytest.mark.integration

JOB = {"seq_len": 4096, "heads": 2, "kv_heads": 2, "head_dim": 32, "dtype": "float32"}
GROUPS, BUDGET = 13, "10MB"


def test_recorded_job_replays_into_the_page(tmp_path: Path) -> None:
    store, before = tmp_path / "job.zarr", tmp_path / "before.zarr"
    write_random_inputs(store, **JOB, seed=11)  # type: ignore[arg-type]
    write_random_inputs(before, **{**JOB, "seq_len": 1024}, seed=12)  # type: ignore[arg-type]
    page = {"cqsa.local-cluster.dashboard-address": "127.0.0.1:0"}
    with dask.config.set(page), connect(budget_bytes=10**7, resource="device_mem") as c:
        c.register_plugin(replay.DashboardRecorder(), name=replay.DashboardRecorder.name)
        run(before, client=c, memory_budget=BUDGET, groups=7)
        result = run(store, client=c, memory_budget=BUDGET, groups=GROUPS)
        whole = json.loads(json.dumps(replay.fetch(c)))  # as the file carries it
    plan = result.plan
    tasks = sorted(j["plan"]["tasks"] for j in replay.jobs(whole))
    assert tasks == sorted([7, plan.tasks])
    token = next(j["token"] for j in replay.jobs(whole) if j["plan"]["tasks"] == plan.tasks)
    record = replay.only(whole, token)
    assert 0 < len(record["inputs"]) < len(whole["inputs"])
    assert {replay.token_of(i) for i in record["inputs"]} == {token}
    (job,) = replay.jobs(record)
    assert job["plan"]["tasks"] == plan.tasks and len(job["quorum_done"]) == plan.tasks
    until = replay.moment(job, 0.5)
    # what the page must show at that moment, counted here from the raw record
    done = sum(t <= until for t in job["quorum_done"])
    assert done == round(0.5 * plan.tasks)
    ends = [m for t, topic, *rest in record["inputs"] if topic == TASK_TOPIC and t <= until
            for m in rest if m.get("action") == "end"]
    read, written = sum(m.get("bytes_read", 0) for m in ends), sum(m.get("bytes_written", 0) for m in ends)
    assert read > 0 and written > 0

    with dask.config.set(page), connect(budget_bytes=10**7, resource="device_mem") as c:
        snap = replay.install(c, record, until)
        (shown,) = snap["jobs"]
        assert shown["token"] == job["token"] and shown["status"] == "running"
        assert (shown["tasks"]["done"], shown["tasks"]["total"]) == (done, plan.tasks)
        assert (shown["bytes_read"], shown["bytes_written"]) == (read, written)
        assert abs(shown["elapsed_s"] - (until - job["start"])) < 1e-3  # rounded to ms
        (worker,) = snap["workers"]
        assert worker["budget"] == 10**7 and worker["bytes_read"] == read
        if shutil.which("chromium") and shutil.which("chromedriver"):  # .ci/run installs both
            png = tmp_path / "replay.png"
            text = replay.screenshot(c, png, f"tasks {done}/{plan.tasks}", caption="replay of a recorded run")
            assert f"merges {shown['merges']['done']}/{plan.merges}" in text
            assert png.stat().st_size > 10_000
        else:
            pytest.fail("chromium and chromium-driver are needed (apt-get install chromium chromium-driver)")
