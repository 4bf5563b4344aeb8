"""When the GPU works during a call, and where it idles: a device trace (``CQSA_BENCH_GPU_TRACE=1``).

torch's profiler records every kernel and copy the process runs on the GPU (CUPTI sees
all threads, so the threaded worker's task, IO and compute threads too).  A short marker
kernel (``torch.cuda._sleep``) on an idle GPU opens and closes the window, so the trace's
clock needs no mapping to the host's::

    with GpuTrace() as g:
        cqsa_dask.run(...)
    g.summary()  # busy, idle before the first kernel, after the last, the longest gaps, top kernels

Busy time is the union of the kernels' intervals (over every stream); the copies are summed
apart.  The profiler adds a few microseconds per kernel: a traced run is a diagnosis, not
a figure (the report leaves it out of the current table).
"""

from __future__ import annotations

import json
import os
import tempfile
from collections import Counter
from types import TracebackType
from typing import Any, Self

__all__ = ["GpuTrace", "busy_and_gaps"]

_MARK = 20_000  # cycles of the marker kernels (about 10 us)


def busy_and_gaps(spans: list[tuple[float, float]], lo: float, hi: float) -> tuple[float, list[tuple[float, float]]]:
    """The union length of ``spans`` (start, end) clipped to [lo, hi], and the idle gaps of that
    window as (start relative to lo, length), longest first."""
    busy, gaps, at = 0.0, [], lo
    for s, e in sorted((max(s, lo), min(e, hi)) for s, e in spans if e > lo and s < hi):
        if s > at:
            gaps.append((at - lo, s - at))
        if e > at:
            busy += e - max(s, at)
            at = e
    if hi > at:
        gaps.append((at - lo, hi - at))
    return busy, sorted(gaps, key=lambda g: -g[1])


class GpuTrace:
    """Traces the GPU's kernels and copies while the ``with`` block runs."""

    def __init__(self) -> None:
        self._prof: Any = None
        self._summary: dict[str, Any] = {}

    def __enter__(self) -> Self:
        import torch
        from torch.profiler import ProfilerActivity, profile

        self._prof = profile(activities=[ProfilerActivity.CUDA])
        self._prof.__enter__()
        torch.cuda.synchronize()
        torch.cuda._sleep(_MARK)  # opens the window
        return self

    def __exit__(self, t: type[BaseException] | None, e: BaseException | None, tb: TracebackType | None) -> None:
        import torch

        torch.cuda.synchronize()
        torch.cuda._sleep(_MARK)  # closes it
        torch.cuda.synchronize()
        self._prof.__exit__(t, e, tb)
        with tempfile.TemporaryDirectory() as d:
            path = os.path.join(d, "trace.json")
            self._prof.export_chrome_trace(path)
            with open(path) as f:
                events = json.load(f).get("traceEvents", [])
        self._summary = _summarize(events)

    def summary(self) -> dict[str, Any]:
        """Seconds: window, busy (kernels' union), idle before the first kernel and after the last,
        copies; the 8 longest gaps (start in the window, length); the top kernels by time."""
        return self._summary


def _is_mark(name: str) -> bool:
    """torch.cuda._sleep's kernel (``spin_kernel`` in ATen's cuda/Sleep.cu)."""
    return "spin_kernel" in name or "sleep" in name.lower()


def _summarize(events: list[dict[str, Any]]) -> dict[str, Any]:
    kernels = [e for e in events if e.get("cat") == "kernel" and "dur" in e]
    marks = sorted((e for e in kernels if _is_mark(e.get("name", ""))), key=lambda e: e["ts"])
    if len(marks) < 2:
        names = Counter(e.get("name", "?")[:60] for e in kernels)
        return {"error": f"{len(marks)} marker kernels in the trace", "kernels": len(kernels),
                "names": names.most_common(5)}
    lo, hi = marks[0]["ts"] + marks[0]["dur"], marks[-1]["ts"]
    work = [e for e in kernels if e not in (marks[0], marks[-1]) and lo <= e["ts"] <= hi]
    spans = [(e["ts"], e["ts"] + e["dur"]) for e in work]
    busy, gaps = busy_and_gaps(spans, lo, hi)
    copies = [e for e in events if e.get("cat") in ("gpu_memcpy", "gpu_memset") and lo <= e.get("ts", -1) <= hi]
    by_name: Counter[str] = Counter()
    for e in work:
        by_name[e.get("name", "?")[:80]] += e["dur"]
    us = 1e-6
    return {
        "window_s": (hi - lo) * us, "busy_s": busy * us, "kernels": len(work),
        "streams": len({e.get("tid") for e in work}),
        "idle_before_first_s": (min(s for s, _ in spans) - lo) * us if spans else None,
        "idle_after_last_s": (hi - max(e for _, e in spans)) * us if spans else None,
        "copy_s": sum(e["dur"] for e in copies) * us,
        "gaps": [[round(s * us, 4), round(g * us, 4)] for s, g in gaps[:8]],
        "top_kernels": [[n, round(d * us, 4)] for n, d in by_name.most_common(6)],
    }
