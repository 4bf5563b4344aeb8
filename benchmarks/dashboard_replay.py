"""Record what the /cqsa page is fed during a run; replay it later into a real page for a screenshot.

The GPU machine has no browser and no network, so the page cannot be
photographed there.  Instead::

    GPU machine (bench.py --record-dashboard REC.json)
      scheduler ── DashboardRecorder: every cqsa transition and cqsa-job / cqsa-task
                   event, with its time, and the workers' budget and RSS once a second
    here (python benchmarks/dashboard_replay.py REC.json --png docs/monitoring-gpu.png)
      cqsa's local cluster, /cqsa page ── its plugin's Monitor fed the recorded inputs up to the
                   moment AT, the page's clock and worker figures frozen there ── chromium screenshot

The page, its plugin and its Monitor are the package's own; only the inputs
and the clock come from the record, so the picture is the page as it stood
at that moment of the recorded run (label it as a replay).
"""

from __future__ import annotations

import argparse
import base64
import json
import shutil
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

from distributed.diagnostics.plugin import SchedulerPlugin

from cqsa_dask.dashboard.plugin import plugin_of
from cqsa_dask.dashboard.state import Monitor, parse_key
from cqsa_dask.execution.telemetry import JOB_TOPIC, TASK_TOPIC

__all__ = ["DashboardRecorder", "browser", "fetch", "install", "jobs", "main", "moment"]

FIGURES_EVERY_S = 1.0


def _jsonable(obj: Any) -> Any:
    """Event messages as JSON: bytes (the job's done bitmaps) as {"b64": ...}, tuples as lists."""
    if isinstance(obj, dict):
        return {k: _jsonable(v) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return [_jsonable(v) for v in obj]
    if isinstance(obj, (bytes, bytearray)):
        return {"b64": base64.b64encode(bytes(obj)).decode()}
    return obj


def _unjson(obj: Any) -> Any:
    if isinstance(obj, dict):
        return base64.b64decode(obj["b64"]) if set(obj) == {"b64"} else {k: _unjson(v) for k, v in obj.items()}
    if isinstance(obj, list):
        return [_unjson(v) for v in obj]
    return obj


class DashboardRecorder(SchedulerPlugin):
    """Keeps, in order, the inputs the CQSA plugin gets: [time, "transition", key, finish] and
    [time, topic, message]; and [time, {worker: {"budget", "rss"}}] at most once a second."""

    name = "cqsa-dashboard-recorder"

    def __init__(self) -> None:
        self.inputs: list[list[Any]] = []
        self.figures: list[list[Any]] = []
        self.scheduler: Any = None
        self.resource = "device_mem"  # the budget's resource, from the jobs' start events
        self._last = 0.0

    async def start(self, scheduler: Any) -> None:
        self.scheduler = scheduler

    def _sample(self, now: float) -> None:
        """The workers' figures as ``CQSAPlugin.worker_figures`` gives them (that plugin may be absent)."""
        if self.scheduler is not None and now - self._last >= FIGURES_EVERY_S:
            self._last = now
            self.figures.append([now, {ws.address: {"budget": float(ws.resources.get(self.resource, 0.0)),
                                                    "rss": float(ws.memory.process)}
                                       for ws in self.scheduler.workers.values()}])

    def transition(self, key: Any, start: str, finish: str, *args: Any, **kwargs: Any) -> None:
        if parse_key(key) is not None:
            now = time.time()
            self.inputs.append([now, "transition", list(key), finish])
            self._sample(now)

    def log_event(self, topic: str, msg: Any) -> None:
        if topic in (JOB_TOPIC, TASK_TOPIC) and isinstance(msg, dict):
            now = time.time()
            if topic == JOB_TOPIC and msg.get("resource"):
                self.resource = str(msg["resource"])
            self.inputs.append([now, topic, _jsonable(msg)])
            self._sample(now)


def _recorded(dask_scheduler: Any = None) -> dict[str, Any]:
    rec = dask_scheduler.plugins.get(DashboardRecorder.name)
    return {"inputs": list(rec.inputs), "figures": list(rec.figures)} if rec is not None else {"inputs": [], "figures": []}


def fetch(client: Any) -> dict[str, Any]:
    """The recorder's data on ``client``'s scheduler (empty lists when it was not registered)."""
    return dict(client.run_on_scheduler(_recorded))


def jobs(record: dict[str, Any]) -> list[dict[str, Any]]:
    """The recorded jobs: token, start time, plan, and the times their quorum tasks finished."""
    found: dict[str, dict[str, Any]] = {}
    for item in record["inputs"]:
        if item[1] == JOB_TOPIC and item[2].get("action") == "start":
            found[str(item[2]["token"])] = {"token": str(item[2]["token"]), "start": item[2].get("time", item[0]),
                                            "plan": item[2].get("plan") or {}, "quorum_done": []}
        elif item[1] == "transition" and item[3] == "memory":
            parsed = parse_key(tuple(item[2]))
            if parsed is not None and parsed[0] == "quorum" and parsed[1] in found:
                found[parsed[1]]["quorum_done"].append(item[0])
    return list(found.values())


def moment(job: dict[str, Any], at: float) -> float:
    """The time when the fraction ``at`` (0 < at < 1) of the job's quorum tasks had finished."""
    done = sorted(job["quorum_done"])
    total = int(job["plan"].get("tasks") or len(done))
    need = max(1, min(len(done), round(at * total)))
    if not done:
        raise ValueError(f"job {job['token']} has no finished quorum task in the record")
    return float(done[need - 1]) + 1e-3


def token_of(item: list[Any]) -> str | None:
    """The job token of one recorded input (None for a transition of a key that is no cqsa task)."""
    if item[1] == "transition":
        parsed = parse_key(tuple(item[2]))
        return None if parsed is None else str(parsed[1])
    return str(item[2].get("token"))


def only(record: dict[str, Any], token: str) -> dict[str, Any]:
    """``record`` with the inputs of the job ``token`` alone (worker figures kept)."""
    return {"inputs": [i for i in record["inputs"] if token_of(i) == token], "figures": record["figures"]}


def _install(record: dict[str, Any], until: float, dask_scheduler: Any = None) -> dict[str, Any]:
    """On the scheduler: a fresh Monitor fed the recorded inputs up to ``until``; the plugin's
    clock and worker figures frozen there; live inputs no longer reach it."""
    plugin = plugin_of(dask_scheduler)
    if plugin is None:
        raise RuntimeError("this scheduler runs without the cqsa dashboard plugin")
    mon = Monitor(max_jobs=plugin.monitor.max_jobs, rate_window=plugin.monitor.rate_window)
    for item in record["inputs"]:
        t = float(item[0])
        if t > until:
            break
        if item[1] == "transition":
            mon.on_transition(tuple(item[2]), item[3], now=t)
        elif item[1] == JOB_TOPIC:
            mon.on_job_event(_unjson(item[2]), now=t)
        else:
            mon.on_task_event(_unjson(item[2]), now=t)
    figures = [f for t, f in record["figures"] if t <= until]
    frozen = {str(a): {k: float(v) for k, v in f.items()} for a, f in (figures[-1] if figures else {}).items()}
    plugin.monitor = mon
    plugin.transition = lambda *a, **k: None  # type: ignore[method-assign]
    plugin.log_event = lambda *a, **k: None  # type: ignore[method-assign]
    plugin.worker_figures = lambda: frozen  # type: ignore[method-assign]
    plugin.snapshot = lambda: mon.snapshot(frozen, now=until)  # type: ignore[method-assign]
    return plugin.snapshot()


def install(client: Any, record: dict[str, Any], until: float) -> dict[str, Any]:
    """Freeze ``client``'s scheduler's /cqsa page at ``until`` of ``record``; return its snapshot."""
    return dict(client.run_on_scheduler(_install, record, until))


def browser(profile: Path, size: str = "1400,1000") -> Any:
    """Headless chromium through selenium (Debian's chromium and chromium-driver)."""
    from selenium import webdriver
    from selenium.webdriver.chrome.service import Service

    chromium, driver = shutil.which("chromium"), shutil.which("chromedriver")
    if not (chromium and driver):
        raise RuntimeError("chromium and chromium-driver are needed (apt-get install chromium chromium-driver)")
    opts = webdriver.ChromeOptions()
    opts.binary_location = chromium
    for flag in ("--headless", "--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run",
                 "--disable-background-networking", "--disable-component-update", "--disable-sync",
                 "--disable-dev-shm-usage", f"--window-size={size}", f"--user-data-dir={profile}"):
        opts.add_argument(flag)
    return webdriver.Chrome(service=Service(driver), options=opts)


# The job summary of the page's first panel once BokehJS rendered it (null before).
_READ_JOB = """
const d = window.Bokeh && Bokeh.documents && Bokeh.documents[0];
const m = d && d.get_model_by_name('cqsa-job-0');
return m && m.text ? m.text : null;
"""


# A banner above the page, so that a replayed picture says what it is.
_CAPTION = """
const el = document.createElement('div');
el.textContent = arguments[0];
el.style.cssText = 'background:#fcf8e3;color:#8a6d3b;border-bottom:1px solid #faebcc;padding:6px 12px;' +
                   'font:13px sans-serif';
document.body.insertBefore(el, document.body.firstChild);
"""


def screenshot(client: Any, png: Path, expect: str, caption: str | None = None, timeout: float = 60.0,
               size: str = "1400,1000") -> str:
    """Open /cqsa on ``client``'s dashboard, wait until the first job's summary contains
    ``expect``, put ``caption`` above the page, save a screenshot to ``png``; return that
    summary's HTML."""
    base = client.dashboard_link.rsplit("/", 1)[0]
    with tempfile.TemporaryDirectory(prefix="cqsa-replay-") as tmp:
        driver = browser(Path(tmp), size)
        try:
            driver.get(base + "/cqsa")
            end = time.monotonic() + timeout
            while time.monotonic() < end:
                text = driver.execute_script(_READ_JOB)
                if text and expect in text:
                    time.sleep(1.0)  # the grid and worker panels render after the summary
                    if caption:
                        driver.execute_script(_CAPTION, caption)
                    png.parent.mkdir(parents=True, exist_ok=True)
                    driver.save_screenshot(str(png))
                    return str(text)
                time.sleep(0.2)
            raise TimeoutError(f"the /cqsa page did not show {expect!r} in {timeout:.0f} s")
        finally:
            driver.quit()


def main(argv: list[str] | None = None) -> int:
    import dask

    from cqsa_dask.client.cluster import connect

    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("record", type=Path, help="JSON written by bench.py --record-dashboard")
    ap.add_argument("--png", type=Path, required=True, help="where to save the screenshot")
    ap.add_argument("--token", help="the job to show (default: the one with the most FLOPs)")
    ap.add_argument("--at", type=float, default=0.5, help="fraction of its quorum tasks finished (default 0.5)")
    ap.add_argument("--caption", default="Replay of a recorded run (benchmarks/dashboard_replay.py)",
                    help="banner above the page in the screenshot")
    ap.add_argument("--only", action="store_true", help="replay the shown job alone (not the jobs before it)")
    ap.add_argument("--size", default="1400,1000", help="browser window WIDTH,HEIGHT in pixels")
    args = ap.parse_args(argv)
    record = json.loads(args.record.read_text())
    found = jobs(record)
    if not found:
        print(f"dashboard_replay: no cqsa job in {args.record}", file=sys.stderr)
        return 2
    for j in found:
        p = j["plan"]
        print(f"job {j['token']}: N={p.get('seq_len')} causal={p.get('causal')} W={p.get('groups')} "
              f"budget={p.get('budget_bytes')} quorum tasks done {len(j['quorum_done'])}/{p.get('tasks')}")
    job = next((j for j in found if j["token"] == args.token), None) if args.token else \
        max(found, key=lambda j: float(j["plan"].get("flops") or 0))
    if job is None:
        print(f"dashboard_replay: no job {args.token} in {args.record}", file=sys.stderr)
        return 2
    until = moment(job, args.at)
    if args.only:
        record = only(record, job["token"])
    with dask.config.set({"cqsa.local-cluster.dashboard-address": "127.0.0.1:0"}), \
            connect(budget_bytes=int(job["plan"].get("budget_bytes") or 1), resource="device_mem") as c:
        snap = install(c, record, until)
        mine = next(j for j in snap["jobs"] if j["token"] == job["token"])
        expect = f"tasks {mine['tasks']['done']}/{mine['tasks']['total']}"
        screenshot(c, args.png, expect, caption=args.caption, size=args.size)
    print(f"{args.png}: job {job['token']} at {until - job['start']:.1f} s after its start, {expect}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
