"""The live /cqsa page: a bokeh document served by the scheduler's dashboard.

Layout (refreshed every ``REFRESH_MS``)::

    ┌ header: jobs on this scheduler, legend ───────────────────────────────┐
    │ job panel × MAX_JOBS (running first, then most recent):               │
    │   summary  tasks 12/31 · merges 3/31 · tokens/s · TFLOP/s · ETA       │
    │   grid     x = quorum task i (merges: query group a), one row per     │
    │            (batch b, head block j); quorum rows, then merge rows      │
    ├ workers: device memory reserved / measured against the budget (bars) │
    │          and a table with read/write throughput                       │
    └───────────────────────────────────────────────────────────────────────┘

Cells are coloured waiting / running / done / failed.  More than
``MAX_COLUMNS`` tasks per row are binned; a bin shows its most urgent state
(failed > running > waiting > done).  Every text a test or a reader needs is
in named ``Div`` models (``cqsa-header``, ``cqsa-job-<k>``, ``cqsa-workers``)
and the cells in ``cqsa-cells-<k>`` sources, so a browser can read them with
``Bokeh.documents[0].get_model_by_name(...)``.
"""

from __future__ import annotations

import html
import math
from typing import Any

import numpy as np
from bokeh.document import Document
from bokeh.layouts import column
from bokeh.models import ColumnDataSource, FixedTicker, HoverTool
from bokeh.models.ranges import FactorRange, Range1d
from bokeh.models.widgets import Div
from bokeh.plotting import figure

from cqsa_dask.core.units import format_bytes

from ._format import byte_unit, fmt_rate, fmt_seconds
from .plugin import CQSAPlugin, plugin_of
from .state import DONE, FAILED, NONE, RUNNING, STATE_NAMES, WAITING

__all__ = ["COLORS", "cqsa_doc"]

MAX_JOBS = 3
MAX_COLUMNS = 400
REFRESH_MS = 500
COLORS = {WAITING: "#d9d9d9", RUNNING: "#f0ad4e", DONE: "#5cb85c", FAILED: "#d9534f", NONE: "#ffffff"}
_RANK = np.array([2, 3, 1, 4, 0])  # rank of waiting, running, done, failed, none in a bin
_BY_RANK = np.array([NONE, DONE, WAITING, RUNNING, FAILED])


def _binned(grid: np.ndarray, f: int) -> np.ndarray:
    """(W, R) states -> (ceil(W / f), R): each bin's most urgent state."""
    w, r = grid.shape
    pad = np.full(((-w) % f, r), NONE, np.uint8)
    ranks = _RANK[np.concatenate([grid, pad])].reshape(-1, f, r).max(axis=1)
    return _BY_RANK[ranks]


def _cells(quorum: np.ndarray, merge: np.ndarray) -> tuple[dict[str, list[Any]], int, int]:
    """Rectangles of both grids: quorum rows 0..R-1, merge rows R+1..2R."""
    w, r = quorum.shape
    f = max(1, math.ceil(w / MAX_COLUMNS))
    data: dict[str, list[Any]] = {k: [] for k in ("x", "y", "w", "color", "state", "what")}
    for grid, y0, name in ((quorum, 0, "quorum task"), (merge, r + 1, "merge of group")):
        g = _binned(grid, f) if f > 1 else grid
        xs, ys = np.nonzero(g != NONE)
        for x, y in zip(xs.tolist(), ys.tolist()):
            s = int(g[x, y])
            lo, hi = x * f, min(w, (x + 1) * f) - 1
            data["x"].append((lo + hi) / 2)
            data["y"].append(y0 + y)
            data["w"].append(0.9 * (hi - lo + 1))
            data["color"].append(COLORS[s])
            data["state"].append(STATE_NAMES[s])
            data["what"].append(f"{name} {lo}" + (f"..{hi}" if hi > lo else "") + f", row {y}")
    return data, w, r


class _JobPanel:
    """Summary line and state grid of one job (hidden when unused)."""

    def __init__(self, k: int):
        self.summary = Div(name=f"cqsa-job-{k}", text="", sizing_mode="stretch_width")
        self.source = ColumnDataSource({c: [] for c in ("x", "y", "w", "color", "state", "what")},
                                       name=f"cqsa-cells-{k}")
        self.x_range, self.y_range = Range1d(start=-1, end=1), Range1d(start=1, end=-1)
        self.fig = figure(name=f"cqsa-grid-{k}", height=200, sizing_mode="stretch_width", toolbar_location=None,
                          tools="", x_axis_label="quorum task i  /  query group a",
                          x_range=self.x_range, y_range=self.y_range)
        self.fig.rect(x="x", y="y", width="w", height=0.85, fill_color="color", line_color=None, source=self.source)
        self.fig.add_tools(HoverTool(tooltips=[("", "@what"), ("state", "@state")]))
        self.fig.grid.visible = False
        self.root = column(self.summary, self.fig, sizing_mode="stretch_width", visible=False)

    def update(self, plugin: CQSAPlugin, job: dict[str, Any] | None) -> None:
        self.root.visible = job is not None
        if job is None:
            return
        self.summary.text = _job_html(job)
        mon = plugin.monitor
        data, w, r = _cells(mon.grid(job["token"], "quorum"), mon.grid(job["token"], "merge"))
        self.source.data = data
        self.fig.height = int(min(420, 90 + 2 * r * 14 + 14))
        self.x_range.start, self.x_range.end = -1, w
        self.y_range.start, self.y_range.end = 2 * r + 1, -1  # first row on top
        self.fig.yaxis.ticker = FixedTicker(ticks=[(r - 1) / 2, r + 1 + (r - 1) / 2])
        self.fig.yaxis.major_label_overrides = {(r - 1) / 2: "quorum", r + 1 + (r - 1) / 2: "merges"}


def _job_html(j: dict[str, Any]) -> str:
    q, m, p = j["tasks"], j["merges"], j["plan"]
    status_color = {"running": "#f0ad4e", "done": "#5cb85c"}.get(j["status"], "#d9534f")
    head = (f"<b>job {html.escape(j['token'])}</b> <span style='color:{status_color}'>{j['status']}</span>"
            f" &nbsp; <code>{html.escape(str(j['store'] or ''))}</code>")
    counts = (f"<b>tasks {q['done']}/{q['total']}</b> ({q['running']} running, {q['failed']} failed) &middot; "
              f"<b>merges {m['done']}/{m['total']}</b> &middot; {j['tokens_per_s']:,.0f} tokens/s &middot; "
              f"{j['tflops']:.3g} TFLOP/s &middot; elapsed {fmt_seconds(j['elapsed_s'])} &middot; "
              f"ETA {fmt_seconds(j['eta_s'])}")
    plan = ""
    if p:
        plan = (f"N={p['seq_len']:,} B={p['batch']} Hq={p['heads_q']} Hkv={p['heads_kv']} D={p['head_dim']} "
                f"{p['dtype']}{' causal' if p['causal'] else ''} &middot; W={p['groups']} groups, "
                f"|D|={p['quorum_size']} &middot; task memory {format_bytes(p['task_memory_bytes'])} of budget "
                f"{format_bytes(p['budget_bytes'])} &middot; read {format_bytes(j['bytes_read'])}, "
                f"written {format_bytes(j['bytes_written'])}")
        if j["resumed_tasks"] or j["resumed_merges"]:
            plan += f" &middot; resumed ({j['resumed_tasks']} tasks, {j['resumed_merges']} merges done before)"
    return f"<div style='font-size:13px'>{head}<br>{counts}<br><span style='color:#555'>{plan}</span></div>"


class _WorkerPanel:
    """Device memory against the budget per worker, and a throughput table."""

    def __init__(self) -> None:
        self.source = ColumnDataSource({k: [] for k in ("worker", "budget", "reserved", "peak", "measured")})
        self.workers = FactorRange(factors=[])
        self.fig = figure(name="cqsa-memory", height=160, sizing_mode="stretch_width", toolbar_location=None,
                          tools="", y_range=self.workers, x_axis_label="device memory",
                          title="Device memory per worker: reserved by running tasks (orange), measured (blue), "
                                "budget (grey)")
        self.fig.hbar(y="worker", right="budget", height=0.8, color="#e8e8e8", source=self.source)
        self.fig.hbar(y="worker", right="reserved", height=0.5, color="#f0ad4e", source=self.source)
        self.fig.hbar(y="worker", right="measured", height=0.2, color="#337ab7", source=self.source)
        self.fig.scatter(x="peak", y="worker", marker="dash", size=22, angle=math.pi / 2, color="#333",
                         source=self.source)
        self.fig.add_tools(HoverTool(tooltips=[("worker", "@worker"), ("budget", "@budget"), ("reserved", "@reserved"),
                                               ("peak reserved", "@peak"), ("measured", "@measured")]))
        self.table = Div(name="cqsa-workers", text="", sizing_mode="stretch_width")
        self.root = column(self.fig, self.table, sizing_mode="stretch_width")

    def update(self, workers: list[dict[str, Any]]) -> None:
        names = [w["address"] for w in workers]
        scale, unit = byte_unit(max([w["budget"] for w in workers], default=0.0))
        self.workers.factors = names
        self.fig.height = 90 + 36 * max(1, len(names))
        self.fig.xaxis.axis_label = f"device memory ({unit})"
        self.source.data = {
            "worker": names, **{k: [(w[f] or 0) / scale for w in workers] for k, f in (
                ("budget", "budget"), ("reserved", "reserved"), ("peak", "peak_reserved"),
                ("measured", "device_in_use"))},
        }
        self.table.text = _workers_html(workers)


def _workers_html(workers: list[dict[str, Any]]) -> str:
    head = ("<tr><th>worker</th><th>device memory reserved</th><th>budget</th><th>peak reserved</th>"
            "<th>measured in use / peak</th><th>read</th><th>write</th><th>read total</th><th>written total</th></tr>")
    rows = "".join(
        f"<tr><td>{html.escape(w['address'])}</td><td>{format_bytes(w['reserved'])}</td><td>{format_bytes(w['budget'])}</td>"
        f"<td>{format_bytes(w['peak_reserved'])}</td>"
        f"<td>{format_bytes(w['device_in_use'])} / {format_bytes(w['device_peak'])}</td>"
        f"<td>{fmt_rate(w['read_bytes_per_s'])}</td><td>{fmt_rate(w['write_bytes_per_s'])}</td>"
        f"<td>{format_bytes(w['bytes_read'])}</td><td>{format_bytes(w['bytes_written'])}</td></tr>"
        for w in workers
    )
    style = "<style>td,th{padding:2px 10px;text-align:right;font-size:12px}</style>"
    return f"{style}<table>{head}{rows}</table>"


def _legend() -> str:
    swatch = "".join(f"<span style='background:{COLORS[s]};padding:0 8px;margin:0 4px 0 12px'>&nbsp;</span>"
                     f"{STATE_NAMES[s]}" for s in (WAITING, RUNNING, DONE, FAILED))
    return f"<span style='font-size:12px'>{swatch}</span>"


def cqsa_doc(scheduler: Any, extra: dict[str, Any], doc: Document) -> None:
    """Bokeh application function: ``applications["/cqsa"]`` in distributed.dashboard."""
    from distributed.dashboard.components.scheduler import BOKEH_THEME, env

    header = Div(name="cqsa-header", text="", sizing_mode="stretch_width")
    panels = [_JobPanel(k) for k in range(MAX_JOBS)]
    workers = _WorkerPanel()

    def update() -> None:
        plugin = plugin_of(scheduler)
        if plugin is None:
            header.text = ("<h2>CQSA</h2><p>The cqsa plugin is not running on this scheduler: start it with "
                           "<code>dask scheduler --preload cqsa_dask.dashboard</code>.</p>")
            return
        snap = plugin.snapshot()
        jobs = snap["jobs"]
        running = sum(j["status"] == "running" for j in jobs)
        header.text = (f"<h2 style='margin:4px 0'>CQSA jobs</h2><p>{len(jobs)} job(s), {running} running"
                       f"{'' if jobs else ' (no cqsa job seen yet)'} &middot; {len(snap['workers'])} worker(s), "
                       f"resource <code>{html.escape(snap['resource'])}</code> {_legend()}</p>")
        for k, panel in enumerate(panels):
            panel.update(plugin, jobs[k] if k < len(jobs) else None)
        workers.update(snap["workers"])

    update()
    doc.add_periodic_callback(update, REFRESH_MS)
    doc.add_root(column(header, *(p.root for p in panels), workers.root, sizing_mode="stretch_width"))
    doc.title = "Dask: CQSA"
    doc.template = env.get_template("simple.html")
    doc.template_variables.update(extra)
    doc.theme = BOKEH_THEME
