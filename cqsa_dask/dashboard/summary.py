"""Static report of a finished (or stopped) job: one self-contained HTML file.

Reads the per-task records every task writes into the store before its
marker (``_cqsa/task_stats`` and ``merge_stats``, fields
``layout.STAT_FIELDS``) and draws, with bokeh resources inlined so the file
opens offline and can be attached to a report::

    summary   plan, wall time, achieved TFLOP/s, time split compute / I-O / other
    timeline  one bar per task from its start to its end, a lane per worker thread
    per task  stacked seconds: compute, I/O, other (quorum tasks), merges
    memory    planned bytes of the quorum tasks running at each moment, per
              worker, against the budget; measured CUDA peaks when recorded

Tasks without a record (not run yet, or run by an engine that kept none)
are left out and counted in the summary.
"""

from __future__ import annotations

import html
import os
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import zarr

from cqsa_dask.core.errors import StoreError
from cqsa_dask.core.plan import Plan
from cqsa_dask.core.units import format_bytes
from cqsa_dask.store.layout import ENGINE, STAT_FIELDS
from cqsa_dask.store.location import parse_store

from ._format import byte_unit, fmt_seconds

__all__ = ["Records", "load_records", "write_report"]

_F = {name: k for k, name in enumerate(STAT_FIELDS)}


@dataclass(frozen=True)
class Records:
    """Per-task figures of one store.  ``quorum``/``merge``: (n, F) rows, ``*_index``: (n, 3) (i|a, b, j)."""

    store: str
    token: str
    plan: Plan
    quorum: np.ndarray
    quorum_index: np.ndarray
    merge: np.ndarray
    merge_index: np.ndarray

    def field(self, kind: str, name: str) -> np.ndarray:
        return (self.quorum if kind == "quorum" else self.merge)[:, _F[name]]


def load_records(store: Any, storage_options: Mapping[str, Any] | None = None) -> Records:
    """Read the task and merge records of ``store`` (a path, a URL with ``storage_options``, a zarr
    Store or a ``StoreLocation``); raise StoreError when it has none."""
    location = parse_store(store, storage_options)
    group = location.open_group("r")
    if ENGINE not in group:
        raise StoreError(f"store {location.describe()} holds no cqsa job: run one with `cqsa run` first")
    eng = group[ENGINE]
    assert isinstance(eng, zarr.Group)
    if "task_stats" not in eng:
        raise StoreError("this store's job was run by an engine that kept no per-task records; "
                         "rerun it with `cqsa run --restart` to get a report")
    plan = Plan.from_dict(dict(eng.attrs["plan"]))  # type: ignore[arg-type]
    out = {}
    for kind in ("task", "merge"):
        arr = eng[f"{kind}_stats"]
        assert isinstance(arr, zarr.Array)
        a = np.asarray(arr[...], dtype=np.float64)  # (W, B, J, F)
        have = np.isfinite(a[..., _F["start"]])
        out[kind] = (a[have], np.argwhere(have))
    if not len(out["task"][0]):
        raise StoreError("no task of this job has finished yet: nothing to report")
    return Records(location.describe(), str(eng.attrs["token"]), plan, *out["task"], *out["merge"])


def _lanes(start: np.ndarray, end: np.ndarray, worker: np.ndarray) -> tuple[np.ndarray, list[str]]:
    """A lane per concurrently busy thread of each worker; returns (lane of each task, lane names)."""
    workers = {w: k for k, w in enumerate(dict.fromkeys(worker.tolist()))}
    lane = np.zeros(len(start), np.int64)
    names: list[str] = []
    for w, k in workers.items():
        free: list[float] = []  # end time of each lane of this worker
        base = len(names)
        for t in sorted(np.nonzero(worker == w)[0], key=lambda t: start[t]):
            slot = next((s for s, e in enumerate(free) if e <= start[t] + 1e-6), len(free))
            if slot == len(free):
                free.append(0.0)
                names.append(f"worker {k + 1} / {slot + 1}")
            free[slot] = end[t]
            lane[t] = base + slot
    return lane, names


def _memory_curve(start: np.ndarray, end: np.ndarray, size: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Step curve (t, bytes) of the summed ``size`` of the intervals open at each moment."""
    t = np.concatenate([start, end])
    d = np.concatenate([size, -size])
    order = np.lexsort((d, t))  # at equal times, ends before starts
    return t[order], np.cumsum(d[order])


def _table(r: Records) -> dict[str, np.ndarray]:
    """Quorum tasks then merges as columns; times in seconds since the first start."""
    rows = np.concatenate([r.quorum, r.merge])  # (n, F)
    start = rows[:, _F["start"]]
    t0 = float(start.min())
    col = {name: rows[:, k] for name, k in _F.items()}
    return {
        "kind": np.array(["quorum"] * len(r.quorum) + ["merge"] * len(r.merge)),
        "index": np.concatenate([r.quorum_index, r.merge_index]).astype(np.int64),
        "start": start - t0, "end": start - t0 + col["seconds"], "seconds": col["seconds"],
        "compute": np.nan_to_num(col["compute_seconds"]), "io": np.nan_to_num(col["io_seconds"]),
        "read": np.nan_to_num(col["bytes_read"]), "written": np.nan_to_num(col["bytes_written"]),
        "peak": col["peak_device_bytes"], "worker": np.nan_to_num(col["worker"]),
    }


def _timeline(t: dict[str, np.ndarray]) -> Any:
    from bokeh.models import ColumnDataSource, HoverTool
    from bokeh.models.ranges import FactorRange
    from bokeh.plotting import figure

    lane, names = _lanes(t["start"], t["end"], t["worker"])
    src = ColumnDataSource({
        "left": t["start"], "right": t["end"], "y": [names[k] for k in lane],
        "color": np.where(t["kind"] == "quorum", "#5cb85c", "#337ab7").tolist(),
        "what": [f"{k} {tuple(i.tolist())}" for k, i in zip(t["kind"], t["index"])],
        **{k: t[k] for k in ("seconds", "compute", "io", "read", "written")},
    })
    fig = figure(title="Timeline: quorum tasks (green) and merges (blue) per worker thread",
                 y_range=FactorRange(factors=names[::-1]),
                 height=120 + 22 * len(names), sizing_mode="stretch_width",
                 x_axis_label="seconds since the first task started", tools="xpan,xwheel_zoom,reset,save")
    fig.hbar(y="y", left="left", right="right", height=0.8, color="color", source=src)
    fig.add_tools(HoverTool(tooltips=[("", "@what"), ("seconds", "@seconds{0.000}"), ("compute s", "@compute{0.000}"),
                                      ("I/O s", "@io{0.000}"), ("read", "@read{0.00 b}"),
                                      ("written", "@written{0.00 b}")]))
    return fig


def _per_task(t: dict[str, np.ndarray]) -> Any:
    from bokeh.models import ColumnDataSource
    from bokeh.models.ranges import FactorRange
    from bokeh.plotting import figure

    q = t["kind"] == "quorum"
    order = np.lexsort(t["index"][q].T[::-1])
    x = [f"{i}:{b}:{j}" for i, b, j in t["index"][q][order].tolist()]
    comp, io = t["compute"][q][order], t["io"][q][order]
    src = ColumnDataSource({"x": x, "compute": comp, "io": io,
                            "other": np.maximum(0.0, t["seconds"][q][order] - comp - io)})
    fig = figure(title="Where the time went per quorum task (i:b:j)", x_range=FactorRange(factors=x), height=300,
                 sizing_mode="stretch_width", y_axis_label="seconds", tools="save")
    fig.vbar_stack(["compute", "io", "other"], x="x", width=0.8, color=["#5cb85c", "#f0ad4e", "#bbbbbb"],
                   source=src, legend_label=["compute", "I/O", "other"])
    fig.add_layout(fig.legend[0], "right")
    fig.xaxis.major_label_orientation = 1.2
    if len(x) > 80:
        fig.xaxis.major_label_text_font_size = "0pt"
    return fig


def _memory(t: dict[str, np.ndarray], plan: Plan) -> Any:
    from bokeh.models.ranges import Range1d
    from bokeh.palettes import Category10
    from bokeh.plotting import figure

    budget = float(plan.budget_bytes)
    scale, unit = byte_unit(budget)
    fig = figure(title="Device memory: planned bytes of the quorum tasks running on each worker, against the budget",
                 height=300, sizing_mode="stretch_width", x_axis_label="seconds since the first task started",
                 y_axis_label=unit, tools="xpan,xwheel_zoom,reset,save")
    fig.line([0, float(t["end"].max())], [budget / scale] * 2, color="#d9534f", line_dash="dashed",
             legend_label="budget")
    q = t["kind"] == "quorum"
    top = budget
    for k, w in enumerate(dict.fromkeys(t["worker"][q].tolist())):
        on = q & (t["worker"] == w)
        curves = [("planned", "solid", np.full(int(on.sum()), float(plan.task_memory_bytes)))]
        if np.isfinite(t["peak"][on]).any():
            curves.append(("measured peak", "dotted", np.nan_to_num(t["peak"][on])))
        for what, dash, size in curves:
            x, y = _memory_curve(t["start"][on], t["end"][on], size)
            fig.step(np.r_[0.0, x], np.r_[0.0, y] / scale, mode="after", color=Category10[10][k % 10],
                     line_dash=dash, legend_label=f"worker {k + 1} {what}")
            top = max(top, float(y.max()))
    fig.y_range = Range1d(start=0, end=top * 1.15 / scale)
    fig.add_layout(fig.legend[0], "right")
    return fig


def _summary_html(r: Records, t: dict[str, np.ndarray]) -> str:
    p = r.plan
    q = t["kind"] == "quorum"
    wall = float(t["end"].max())  # first start to last end
    total = float(t["seconds"].sum())
    comp, io = float(t["compute"][q].sum()), float(t["io"][q].sum())
    other, merges = float(t["seconds"][q].sum()) - comp - io, float(t["seconds"][~q].sum())
    peaks = t["peak"][q]
    peak = format_bytes(float(np.nanmax(peaks))) if np.isfinite(peaks).any() else "n/a (no device counter: CPU run)"
    missing = "" if (len(r.quorum), len(r.merge)) == (p.tasks, p.merges) else \
        " (the job is unfinished, or parts ran without records)"
    flops = p.flops * len(r.quorum) / max(1, p.tasks)

    def pct(x: float) -> str:
        return f"{100 * x / max(total, 1e-12):.0f}%"

    return (
        f"<h2>cqsa job {html.escape(r.token)}</h2><p><code>{html.escape(r.store)}</code></p>"
        f"<p>N={p.seq_len:,} B={p.batch} Hq={p.heads_q} Hkv={p.heads_kv} D={p.head_dim} {p.dtype}"
        f"{' causal' if p.causal else ''} &middot; W={p.groups} groups, |D|={p.quorum_size} &middot; "
        f"task memory {format_bytes(p.task_memory_bytes)} of budget {format_bytes(p.budget_bytes)}</p>"
        f"<p><b>{len(r.quorum)}/{p.tasks} quorum tasks, {len(r.merge)}/{p.merges} merges recorded</b>{missing}"
        f" &middot; wall {fmt_seconds(wall)} &middot; {flops / max(wall, 1e-9) / 1e12:.3g} TFLOP/s &middot; "
        f"device peak {peak}</p>"
        f"<p>task time {fmt_seconds(total)}: compute {pct(comp)}, quorum I/O {pct(io)}, quorum other {pct(other)}, "
        f"merges {pct(merges)} &middot; read {format_bytes(float(t['read'].sum()))}, "
        f"written {format_bytes(float(t['written'].sum()))}</p>"
    )


def write_report(store: Any, out: str | os.PathLike[str], storage_options: Mapping[str, Any] | None = None) -> Path:
    """Write the HTML report of ``store`` (as :func:`load_records` takes it) to ``out``; return its path."""
    from bokeh.io import save
    from bokeh.layouts import column
    from bokeh.models.widgets import Div
    from bokeh.resources import INLINE

    r = load_records(store, storage_options)
    t = _table(r)
    layout = column(Div(text=_summary_html(r, t), sizing_mode="stretch_width", name="cqsa-summary"), _timeline(t), _per_task(t),
                    _memory(t, r.plan), sizing_mode="stretch_width")
    path = Path(out)
    save(layout, filename=path, resources=INLINE, title=f"cqsa job {r.token}")
    return path
