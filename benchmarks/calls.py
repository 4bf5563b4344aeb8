"""How cqsa is called and timed: run() on a warm cluster, run() cold, attention() with a client.

Each call returns one dict of figures: ``seconds`` (wall time of the call),
the plan's figures, bytes read and written, peak device memory (torch's
allocated and reserved, as the quorum tasks report them; NVML's per-process
peak with nvidia-ml-py), the kernels, and where the figure exists the
per-task profile (summed quorum compute / IO seconds, merges) and the
timeline of every task from the store's ``_cqsa`` records.

Before a warm call the workers' peak statistics and task records are reset
and the previous job's outputs are deleted (untimed), so each run is fresh.
A time-boxed warm call that outlives its box is stopped by closing its
cluster; its figures are then those of the quorum tasks that finished.
"""

from __future__ import annotations

import contextlib
import os
import shutil
import statistics
import threading
import time
from typing import Any

from benchmarks.cases import Case
from benchmarks.cluster import Cluster, NvmlPeak, collect_tasks, reset_workers
from benchmarks.gputrace import GpuTrace
from benchmarks.sampler import Sampler

__all__ = ["attention_call", "clear_job", "cold_run", "summarize_tasks", "warm_run"]

_PLAN_KEYS = ("groups", "quorum_size", "heads_per_task", "task_memory_bytes", "group_size", "tasks", "merges",
              "flops", "bytes_read", "bytes_written", "budget_bytes")


def clear_job(store: str) -> None:
    """Delete the previous run's outputs and engine state (untimed)."""
    for name in ("out", "lse", "_cqsa"):
        shutil.rmtree(os.path.join(store, name), ignore_errors=True)


def _job_figures(res: Any, seconds: float) -> dict[str, Any]:
    p = res.plan
    return {
        "seconds": seconds, "execute_seconds": res.seconds, "tflops": p.flops / seconds / 1e12,
        "tokens_per_s": p.batch * p.seq_len / seconds, "peak_device_bytes": res.peak_device_bytes,
        "bytes_read": res.bytes_read, "bytes_written": res.bytes_written, "kernels": list(res.kernels),
        "quorum_tasks_run": res.quorum_tasks_run, "merges_run": res.merges_run, "partials": p.partials,
        "phases": getattr(res, "phases", None),
        "plan": {k: v for k, v in p.to_dict().items() if k in _PLAN_KEYS},
    }


def warm_run(cl: Cluster, store: str, case: Case, budget: int) -> dict[str, Any]:
    """cqsa_dask.run(store, client=cl.client, restart=True) on a warmed cluster."""
    import cqsa_dask

    warm = cl.warm(case.dtype, case.d)
    reset_workers(cl.client)
    clear_job(store)
    box: dict[str, Any] = {}

    def go() -> None:
        try:
            box["res"] = cqsa_dask.run(store, causal=case.causal, memory_budget=budget, client=cl.client,
                                       groups=case.groups, restart=True)
        except BaseException as e:  # noqa: BLE001  (re-raised below, or the time box's consequence)
            box["error"] = e

    sampler = Sampler() if os.environ.get("CQSA_BENCH_SAMPLE") == "1" else contextlib.nullcontext()
    tracer = GpuTrace() if os.environ.get("CQSA_BENCH_GPU_TRACE") == "1" else contextlib.nullcontext()
    with NvmlPeak() as nv, sampler, tracer:
        t, t_unix = time.perf_counter(), time.time()
        th = threading.Thread(target=go, name="bench-cqsa-run", daemon=True)
        th.start()
        th.join(case.time_box)
        if th.is_alive():  # the time box: stop by closing the cluster, keep what finished
            done = collect_tasks(cl.client)
            cl.close()
            th.join(120)
            return {"stopped_after": time.perf_counter() - t, **_finished_so_far(store), "nvml": nv.result(),
                    "peak_device_reserved_bytes": _max_reserved(done), "timeline": timeline(store, t_unix),
                    "worker": warm}
        seconds = time.perf_counter() - t
    if "error" in box:
        raise box["error"]
    tasks = collect_tasks(cl.client)
    return {**_job_figures(box["res"], seconds), "peak_device_reserved_bytes": _max_reserved(tasks),
            "profile": summarize_tasks(tasks), "nvml": nv.result(), "timeline": timeline(store, t_unix),
            "worker": warm, **({"sample": sampler.summary()} if isinstance(sampler, Sampler) else {}),
            **({"gpu_trace": tracer.summary()} if isinstance(tracer, GpuTrace) else {})}


def cold_run(store: str, case: Case, budget: int) -> dict[str, Any]:
    """cqsa_dask.run(store, memory_budget=budget) with no client: cluster start-up is in the time."""
    import cqsa_dask

    clear_job(store)
    with NvmlPeak() as nv:
        t, t_unix = time.perf_counter(), time.time()
        res = cqsa_dask.run(store, causal=case.causal, memory_budget=budget, groups=case.groups, restart=True)
        seconds = time.perf_counter() - t
    return {**_job_figures(res, seconds), "nvml": nv.result(), "timeline": timeline(store, t_unix),
            "startup_seconds": seconds - res.seconds}


def attention_call(cl: Cluster, q: Any, k: Any, v: Any, case: Case, budget: int) -> tuple[dict[str, Any], Any, Any]:
    """cqsa_dask.attention(q, k, v, client=cl.client, return_lse=True): figures, out (B, Hq, N, D), lse (B, Hq, N).

    The call writes the tensors into a temporary store, runs the job and reads
    the output back: all of it is in the time, as a user waits for it.
    """
    import cqsa_dask
    from benchmarks.sdpa import attention_flops

    cl.warm(case.dtype, case.d)
    reset_workers(cl.client)
    t = time.perf_counter()
    out, lse = cqsa_dask.attention(q, k, v, causal=case.causal, memory_budget=budget, return_lse=True,
                                   client=cl.client, groups=case.groups)
    seconds = time.perf_counter() - t
    tasks = collect_tasks(cl.client)
    b, h, n, d = q.shape
    peaks = [r.get("peak_device_bytes") for r in tasks if r.get("peak_device_bytes") is not None]
    fig = {"seconds": seconds, "tflops": attention_flops(b, h, n, d, case.causal) / seconds / 1e12,
           "tokens_per_s": b * n / seconds, "peak_device_bytes": max(peaks) if peaks else None,
           "peak_device_reserved_bytes": _max_reserved(tasks), "profile": summarize_tasks(tasks),
           "kernels": sorted({r["kernel"] for r in tasks if r.get("kernel")})}
    return fig, out, lse


def _max_reserved(tasks: list[dict[str, Any]]) -> int | None:
    """The largest reserved peak the quorum task records report (None on the CPU)."""
    return max((r["peak_device_reserved_bytes"] for r in tasks if r.get("peak_device_reserved_bytes") is not None),
               default=None)


def _finished_so_far(store: str) -> dict[str, Any]:
    """The plan, and the quorum tasks finished (count, largest device peak) of a stopped job."""
    import numpy as np
    import zarr

    from cqsa_dask.store.layout import STAT_FIELDS

    eng = zarr.open_group(store, mode="r")["_cqsa"]
    plan = dict(eng.attrs["plan"])  # type: ignore[arg-type]
    stats = np.asarray(eng["task_stats"][...])  # type: ignore[index]
    done = np.isfinite(stats[..., 0])
    peaks = stats[..., STAT_FIELDS.index("peak_device_bytes")][done]
    peaks = peaks[np.isfinite(peaks)]
    return {"quorum_tasks_done": int(done.sum()), "peak_device_bytes": int(peaks.max()) if peaks.size else None,
            "plan": {k: v for k, v in plan.items() if k in _PLAN_KEYS}}


def timeline(store: str, t0: float) -> dict[str, Any]:
    """Per-task records of the last run from ``_cqsa/task_stats`` and ``merge_stats``: rows
    [i, b, j, start - t0, seconds, compute s, io s, bytes read, bytes written]."""
    import numpy as np
    import zarr

    out: dict[str, Any] = {"fields": ["i", "b", "j", "start", "seconds", "compute_s", "io_s", "read", "written"]}
    for kind, name in (("quorum", "task_stats"), ("merge", "merge_stats")):
        try:
            a = np.asarray(zarr.open_group(store, mode="r")["_cqsa"][name][...])  # type: ignore[index]
        except (KeyError, FileNotFoundError):
            continue
        rows = []
        for idx in zip(*np.nonzero(np.isfinite(a[..., 0]))):
            r = a[idx]
            rows.append([int(x) for x in idx] + [round(float(r[0]) - t0, 4)]
                        + [None if not np.isfinite(x) else round(float(x), 4) for x in r[1:6]])
        out[kind] = sorted(rows, key=lambda row: row[3])
    return out


def summarize_tasks(tasks: list[dict[str, Any]]) -> dict[str, Any] | None:
    """Summed task-side seconds and bytes (sums over concurrent threads can exceed the wall time)."""
    q = [t for t in tasks if t["kind"] == "quorum"]
    m = [t for t in tasks if t["kind"] == "merge"]
    if not q and not m:
        return None
    return {
        "quorum_count": len(q), "merge_count": len(m),
        "quorum_seconds": sum(t["seconds"] for t in q),
        "quorum_compute_seconds": sum(t.get("compute_seconds", 0.0) for t in q),
        "quorum_io_seconds": sum(t.get("io_seconds", 0.0) for t in q),
        "merge_seconds": sum(t["seconds"] for t in m),
        "quorum_bytes_read": sum(t.get("bytes_read", 0) for t in q),
        "quorum_bytes_written": sum(t.get("bytes_written", 0) for t in q),
        "merge_bytes_written": sum(t.get("bytes_written", 0) for t in m),
        # per quorum task, by its start: seconds until its IO was set up, until its first step's inputs were in
        "quorum_setup_seconds": [round(t.get("setup_seconds", 0.0), 4) for t in q],
        "quorum_first_step_seconds": [round(t.get("first_step_seconds", 0.0), 4) for t in q],
    }


def median_of(runs: list[dict[str, Any]]) -> dict[str, Any]:
    """The last run's figures with ``seconds`` the median over ``runs`` and the rates scaled to it."""
    secs = [r["seconds"] for r in runs]
    sec = statistics.median(secs)
    last = runs[-1]
    scale = last["seconds"] / sec
    return dict(last, seconds=sec, seconds_all=secs, tflops=last["tflops"] * scale,
                tokens_per_s=last["tokens_per_s"] * scale)
