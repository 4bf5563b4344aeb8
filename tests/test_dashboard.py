"""Monitoring: the /cqsa page in a real browser, Prometheus metrics, Dask's pages, the report.

One real job, watched from start to end (module fixture ``watched``)::

    connect()  (the local cluster `cqsa run` starts; dashboard on a free port)
      │  chromium (headless, selenium) opens /cqsa  ── page renders, no job yet
      ├─ run(N=8192, W=31) in a thread
      │     poll the page (Bokeh models, read through JS) until it shows the
      │     job running: "tasks d/T" with 0 < d < T, grid cells agreeing with
      │     the counts, worker panel: reserved = the plan's task memory, budget
      │     ── screenshot (tmp_path; with CQSA_DOCS_SCREENSHOT=1 also one mid-job
      │        into docs/monitoring-cpu.png)
      ├─ after the job: "tasks T/T", "merges M/M", done
      ├─ GET /metrics (cqsa_*), /cqsa/status.json
      └─ the scheduler's task prefixes, spans and fine performance metrics

The browser checks skip when chromium, chromedriver or selenium are missing
(.ci/run installs Debian's chromium and chromium-driver).  Other tests: the
Monitor's state machine (pure), ``dask scheduler --preload
cqsa_dask.dashboard`` as a user starts it, and ``cqsa dashboard STORE``.
"""

from __future__ import annotations

import json
import os
import re
import shutil
import subprocess
import sys
import threading
import time
import urllib.request
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import dask.config
import numpy as np
import pytest

from cqsa_dask.client.api import JobResult, run
from cqsa_dask.client.cluster import connect
from cqsa_dask.client.policy import plan_options
from cqsa_dask.core.plan import Plan, make_plan
from cqsa_dask.core.units import format_bytes
from cqsa_dask.dashboard.state import DONE, RUNNING, WAITING, Monitor
from cqsa_dask.store.random_inputs import write_random_inputs

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "benchmarks"))
from dashboard_replay import browser  # headless chromium, shared with the replay tool

pytestmark = pytest.mark.integration

RESOURCE = "device_mem"
JOB = {"seq_len": 8192, "heads": 4, "kv_heads": 2, "head_dim": 64, "dtype": "float32"}
GROUPS = 31  # ~10 s on 2 CPU cores: long enough to watch it run
BUDGET = "10MB"
CHROMIUM, CHROMEDRIVER = shutil.which("chromium"), shutil.which("chromedriver")
DOCS_SHOT = Path(__file__).resolve().parents[1] / "docs" / "monitoring-cpu.png"

# Reads the page's state from BokehJS: the texts of the named Divs and the
# states of job 0's grid cells.  null until the document is rendered.
READ_PAGE = """
const d = window.Bokeh && Bokeh.documents && Bokeh.documents[0];
if (!d) return null;
const text = n => { const m = d.get_model_by_name(n); return m ? m.text : null; };
const cells = d.get_model_by_name('cqsa-cells-0');
const data = cells ? cells.data : null;
const states = data ? Array.from(data instanceof Map ? data.get('state') : data.state) : null;
const views = Bokeh.index ? Object.keys(Bokeh.index).length : 0;
return {header: text('cqsa-header'), job: text('cqsa-job-0'), workers: text('cqsa-workers'),
        states: states, views: views};
"""


def _plain(html: str | None) -> str:
    return re.sub(r"\s+", " ", re.sub(r"<[^>]+>", " ", html or "").replace("&middot;", "·")).strip()


@dataclass
class PageView:
    """What the page showed at one moment (texts without markup)."""

    job: str
    workers: str
    states: list[str]

    def count(self, what: str) -> tuple[int, int] | None:
        m = re.search(rf"{what} (\d+)/(\d+)", self.job)
        return (int(m.group(1)), int(m.group(2))) if m else None


@dataclass
class Watched:
    plan: Plan
    result: JobResult
    store: Path
    base: str
    metrics: str
    status: dict[str, Any]
    scheduler: dict[str, Any]
    status_page: str = ""
    running: PageView | None = None
    final: PageView | None = None
    screenshot: Path | None = None
    browser_skip: str | None = None
    log: list[str] = field(default_factory=list)


def _read(driver: Any) -> PageView | None:
    r = driver.execute_script(READ_PAGE)
    if not r or not r.get("header") or not r.get("views"):
        return None
    return PageView(_plain(r["job"]), _plain(r["workers"]), list(r["states"] or []))


def _poll(driver: Any, ok: Any, until: float) -> PageView | None:
    """The first page view satisfying ``ok`` before ``until`` (monotonic seconds)."""
    while time.monotonic() < until:
        view = _read(driver)
        if view is not None and ok(view):
            return view
        time.sleep(0.2)
    return None


def _running_ok(plan: Plan) -> Any:
    reserved, budget = format_bytes(plan.task_memory_bytes), format_bytes(plan.budget_bytes)

    def ok(v: PageView) -> bool:  # the grid, a separate bokeh model, must have caught up with the summary too
        tasks = v.count("tasks")
        return (tasks is not None and 0 < tasks[0] < tasks[1] and "running" in v.job
                and f" {reserved} {budget} " in f" {v.workers} "
                and v.states[: plan.tasks].count("done") == tasks[0])
    return ok


def _final_ok(plan: Plan) -> Any:
    # The summary text and the grid are separate bokeh models, updated by one refresh but rendered
    # one after the other: wait for both, so a view between the two is not taken for the final one.
    def ok(v: PageView) -> bool:
        return (v.count("tasks") == (plan.tasks, plan.tasks) and v.count("merges") == (plan.merges, plan.merges)
                and set(v.states) == {"done"})
    return ok


def _get(url: str) -> str:
    with urllib.request.urlopen(url, timeout=10) as r:
        return str(r.read().decode())


def _scheduler_facts(dask_scheduler: Any) -> dict[str, Any]:
    spans = dask_scheduler.extensions["spans"].spans
    named = [s for s in spans.values() if s.name and s.name[0].startswith("cqsa-")]
    metrics = {k for s in named for k in s.cumulative_worker_metrics}
    return {"prefixes": sorted(dask_scheduler.task_prefixes), "spans": [list(s.name) for s in named],
            "span_metrics": [list(k) for k in sorted({(k[1], k[2]) for k in metrics
                                                      if isinstance(k, tuple) and len(k) >= 3})]}


@pytest.fixture(scope="module")
def watched(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Watched]:
    tmp = tmp_path_factory.mktemp("dash")
    store = tmp / "job.zarr"
    write_random_inputs(store, **JOB, seed=3)
    plan = make_plan(seq_len=JOB["seq_len"], heads=JOB["heads"], kv_heads=JOB["kv_heads"],
                     head_dim=JOB["head_dim"], dtype=JOB["dtype"], budget=BUDGET, groups=GROUPS,
                     **plan_options())
    skip = None
    if not (CHROMIUM and CHROMEDRIVER):
        skip = "chromium and chromium-driver are not installed (apt-get install chromium chromium-driver)"
    else:
        try:
            import selenium  # noqa: F401
        except ImportError:
            skip = "selenium is not installed (pip install -e '.[test]')"
    with dask.config.set({"cqsa.local-cluster.dashboard-address": "127.0.0.1:0"}), \
            connect(budget_bytes=plan.budget_bytes, resource=RESOURCE) as c:
        base = c.dashboard_link.rsplit("/", 1)[0]
        driver = browser(tmp / "chromium", size="1400,900") if skip is None else None
        try:
            if driver is not None:
                driver.get(base + "/cqsa")
                assert _poll(driver, lambda v: True, time.monotonic() + 30), "the /cqsa page did not render in 30 s"
            box: dict[str, Any] = {}
            job = threading.Thread(target=lambda: box.update(r=run(store, client=c, memory_budget=BUDGET,
                                                                   groups=GROUPS)), daemon=True)
            job.start()
            w = Watched(plan=plan, result=None, store=store, base=base, metrics="", status={},  # type: ignore[arg-type]
                        scheduler={}, browser_skip=skip)
            if driver is not None:
                w.running = _poll(driver, _running_ok(plan), time.monotonic() + 120)
                if w.running is not None:
                    w.screenshot = tmp / "monitoring-cpu.png"
                    driver.save_screenshot(str(w.screenshot))
                if os.environ.get("CQSA_DOCS_SCREENSHOT"):  # refresh the picture in docs/, mid-job
                    half = _poll(driver, lambda v: "running" in v.job and v.count("tasks") is not None
                                 and v.count("tasks")[0] >= plan.tasks // 2, time.monotonic() + 120)  # type: ignore[index]
                    if half is not None:
                        driver.save_screenshot(str(DOCS_SHOT))
            job.join(timeout=300)
            assert "r" in box, "the job did not finish"
            w.result = box["r"]
            if driver is not None:
                w.final = _poll(driver, _final_ok(plan), time.monotonic() + 20)
            w.metrics = _get(base + "/metrics")
            w.status = json.loads(_get(base + "/cqsa/status.json"))
            w.scheduler = c.run_on_scheduler(_scheduler_facts)
            w.status_page = _get(base + "/status")
        finally:
            if driver is not None:
                driver.quit()
    yield w


def _need_browser(w: Watched) -> None:
    if w.browser_skip:
        if os.environ.get("CI"):  # CI installs the browser: a missing one is a failure there, not a skip
            pytest.fail(w.browser_skip)
        pytest.skip(w.browser_skip)


def test_page_shows_the_running_job(watched: Watched) -> None:
    _need_browser(watched)
    p, v = watched.plan, watched.running
    assert v is not None, "the page never showed the job running with its memory figures"
    done, total = v.count("tasks")  # type: ignore[misc]
    assert total == p.tasks and 0 < done < total, v.job
    assert v.count("merges") is not None and v.count("merges")[1] == p.merges, v.job  # type: ignore[index]
    assert re.search(r"[\d,]+ tokens/s", v.job) and "TFLOP/s" in v.job and re.search(r"ETA \d", v.job), v.job
    # grid: one cell per quorum task and per merge (W*B*J each), coloured like the counts say
    assert len(v.states) == p.tasks + p.merges, (len(v.states), v.job)
    assert v.states[: p.tasks].count("done") == done, v.job
    assert v.states[: p.tasks].count("running") >= 1, v.states[: p.tasks]
    # memory panel: this job's task memory reserved on the worker, against its budget
    assert f"{format_bytes(p.task_memory_bytes)} {format_bytes(p.budget_bytes)}" in v.workers, v.workers
    assert watched.screenshot is not None and watched.screenshot.stat().st_size > 10_000


def test_page_shows_the_totals_after_the_job(watched: Watched) -> None:
    _need_browser(watched)
    v = watched.final
    assert v is not None, "the page did not show the finished job's totals"
    assert "done" in v.job and set(v.states) == {"done"}, v.job
    assert f"read {format_bytes(watched.result.bytes_read)}" in v.job, v.job
    assert f"written {format_bytes(watched.result.bytes_written)}" in v.job, v.job


def _metric(text: str, name: str, **labels: str) -> float:
    """Sum of the samples of ``name`` whose labels include ``labels``."""
    total, found = 0.0, False
    for line in text.splitlines():
        m = re.fullmatch(rf"{name}(?:\{{(.*)\}})? (\S+)", line)
        if not m:
            continue
        have = dict(re.findall(r'(\w+)="([^"]*)"', m.group(1) or ""))
        if all(have.get(k) == v for k, v in labels.items()):
            total, found = total + float(m.group(2)), True
    assert found, f"no sample of {name}{labels} on /metrics"
    return total


def test_prometheus_metrics_match_the_job(watched: Watched) -> None:
    p, r, m = watched.plan, watched.result, watched.metrics
    assert r.plan == p and r.quorum_tasks_run == p.tasks and r.merges_run == p.merges
    job = watched.status["jobs"][0]["token"]
    assert _metric(m, "cqsa_job_tasks", job=job, kind="quorum", state="done") == p.tasks
    assert _metric(m, "cqsa_job_tasks", job=job, kind="merge", state="done") == p.merges
    for kind, n in (("quorum", p.tasks), ("merge", p.merges)):
        assert _metric(m, "cqsa_job_tasks_planned", job=job, kind=kind) == n
        assert _metric(m, "cqsa_job_tasks_completed_total", job=job, kind=kind) == n
        for state in ("waiting", "running", "failed"):
            assert _metric(m, "cqsa_job_tasks", job=job, kind=kind, state=state) == 0
    assert _metric(m, "cqsa_job_bytes_read_total", job=job) == r.bytes_read
    assert _metric(m, "cqsa_job_bytes_written_total", job=job) == r.bytes_written
    assert _metric(m, "cqsa_worker_device_memory_budget_bytes") == p.budget_bytes
    assert _metric(m, "cqsa_worker_device_memory_reserved_bytes") == 0  # nothing runs any more
    assert _metric(m, "cqsa_job_tflops", job=job) > 0


def test_status_json_and_dask_pages_name_the_work(watched: Watched) -> None:
    s, facts = watched.status, watched.scheduler
    j = s["jobs"][0]
    assert s["enabled"] and j["status"] == "done" and j["store"] == str(watched.store)
    assert j["tasks"]["done"] == watched.plan.tasks and j["merges"]["done"] == watched.plan.merges
    assert {"cqsa-quorum", "cqsa-merge"} <= set(facts["prefixes"]), facts["prefixes"]
    assert [f"cqsa-{j['token']}"] in facts["spans"], facts["spans"]
    for prefix, label in (("cqsa-quorum", "cqsa-compute"), ("cqsa-quorum", "cqsa-io"), ("cqsa-merge", "cqsa-merge")):
        assert [prefix, label] in facts["span_metrics"], facts["span_metrics"]
    assert watched.status_page.count('href="cqsa"') == 1  # linked from Dask's own pages


def test_static_report_of_the_finished_job(watched: Watched, tmp_path: Path) -> None:
    from cqsa_dask.tools.cli import main

    out = tmp_path / "report.html"
    assert main(["dashboard", str(watched.store), "--out", str(out)]) == 0
    page = out.read_text()
    p = watched.plan
    assert f"{p.tasks}/{p.tasks} quorum tasks, {p.merges}/{p.merges} merges recorded" in page
    assert "Timeline" in page and "Where the time went" in page and "Device memory" in page
    assert "cdn.bokeh.org" not in page  # resources inlined: opens offline


def test_preload_on_a_users_dask_scheduler(tmp_path: Path) -> None:
    """`dask scheduler --preload cqsa_dask.dashboard`, as docs/monitoring.md says."""
    exe = shutil.which("dask", path=os.path.dirname(sys.executable)) or shutil.which("dask")
    assert exe is not None, "the `dask` command is not installed (it comes with distributed)"
    sfile = tmp_path / "scheduler.json"
    proc = subprocess.Popen([exe, "scheduler", "--host", "127.0.0.1", "--port", "0", "--dashboard-address",
                             "127.0.0.1:0", "--scheduler-file", str(sfile), "--preload", "cqsa_dask.dashboard"],
                            stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
    try:
        deadline = time.monotonic() + 60
        while not sfile.exists() and time.monotonic() < deadline and proc.poll() is None:
            time.sleep(0.2)
        assert sfile.exists(), f"the scheduler did not start: {proc.stderr.read().decode() if proc.stderr else ''}"
        time.sleep(0.5)
        port = json.loads(sfile.read_text())["services"]["dashboard"]
        status = json.loads(_get(f"http://127.0.0.1:{port}/cqsa/status.json"))
        assert status["enabled"] and status["jobs"] == []
        assert "Bokeh" in _get(f"http://127.0.0.1:{port}/cqsa")
        assert "cqsa_worker_device_memory_budget_bytes" in _get(f"http://127.0.0.1:{port}/metrics")
    finally:
        proc.terminate()
        proc.wait(timeout=30)


def test_monitor_follows_transitions_and_events() -> None:
    """Pure state machine: resumed bitmaps, start events, transitions, release after done."""
    mon = Monitor()
    token = "4711"
    plan = {"groups": 3, "batch": 1, "heads_kv": 2, "heads_per_task": 1, "tasks": 6, "merges": 6, "seq_len": 30,
            "flops": 10**12, "task_memory_bytes": 100, "budget_bytes": 250}
    done = np.zeros((3, 1, 2), np.uint8)
    done[2, 0, 1] = 1
    bits = {"shape": [3, 1, 2], "bits": np.packbits(done.ravel()).tobytes()}
    mon.on_job_event({"action": "start", "token": token, "plan": plan, "task_done": bits,
                      "merge_done": {"shape": [3, 1, 2], "bits": b"\0"}, "time": 0.0}, now=0.0)
    q = (f"cqsa-quorum-{token}", 0, 0, 1)
    mon.on_transition(q, "processing", now=1.0)
    assert mon.jobs[token].quorum[(0, 0, 1)] == WAITING  # held back by the worker until it starts
    mon.on_task_event({"action": "start", "token": token, "kind": "quorum", "index": [0, 0, 1], "worker": "w1"})
    assert mon.jobs[token].quorum[(0, 0, 1)] == RUNNING and mon.reserved() == {"w1": 100}
    mon.on_task_event({"action": "end", "token": token, "kind": "quorum", "index": [0, 0, 1], "worker": "w1",
                       "bytes_read": 7, "bytes_written": 5, "seconds": 1.0, "end": 2.0})
    mon.on_transition(q, "memory", now=2.0)
    mon.on_transition(q, "released", now=3.0)
    mon.on_transition(q, "forgotten", now=3.0)
    s = mon.job_summary(mon.jobs[token], now=4.0)
    assert s["tasks"] == {"waiting": 4, "running": 0, "done": 2, "failed": 0, "total": 6}
    assert s["resumed_tasks"] == 1 and s["bytes_read"] == 7 and mon.reserved() == {}
    assert s["tflops"] == pytest.approx(1 / 6 / 4.0)  # one of six tasks ran in this run, in 4 s
    grid = mon.grid(token, "quorum")
    assert grid.shape == (3, 2) and grid[0, 1] == DONE and grid[2, 1] == DONE and (grid == DONE).sum() == 2
    assert mon.workers["w1"].peak_reserved == 100


def test_grid_of_a_job_restricted_to_some_rows() -> None:
    """With query_groups only their producers and merges have cells; the rest is not part of the job."""
    from cqsa_dask.core.plan import make_plan

    plan = make_plan(seq_len=3000, heads=2, kv_heads=1, head_dim=64, groups=31, budget="1GB", query_groups=[0, -1])
    mon = Monitor()
    empty = {"shape": [31, 1, 1], "bits": np.packbits(np.zeros(31, np.uint8)).tobytes()}
    mon.on_job_event({"action": "start", "token": "77", "plan": plan.to_dict(), "task_done": empty,
                      "merge_done": empty, "time": 0.0}, now=0.0)
    quorum, merge = mon.grid("77", "quorum"), mon.grid("77", "merge")
    assert sorted(np.nonzero(quorum[:, 0] == WAITING)[0].tolist()) == plan.task_ids and len(plan.task_ids) < 31
    assert np.nonzero(merge[:, 0] == WAITING)[0].tolist() == [0, 30]
    assert mon.job_summary(mon.jobs["77"], now=1.0)["tasks"]["total"] == plan.tasks == len(plan.task_ids)
