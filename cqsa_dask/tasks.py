"""The functions Dask runs: one quorum task, one merge.

Both take only small arguments (store path, job token, indices) and return a
small dict of metadata; all tensors move through the Zarr store.

Quorum task (task i, batch b, head block j)::

    tell the scheduler the task runs  (dashboard_events, best effort)
    load k, v of every key group the task owns pairs for   (resident)
    for each slot s with query group a and key groups [b1, b2, ...]:
        read q of group a
        (out, lse) = merge over bk of attend(q_a, k_bk, v_bk)   (float32 acc)
        write partial_out[s, b, heads_j, a], partial_lse[...]
    write task_stats[i, b, j]  (timings, bytes, device peak)
    write task_done[i, b, j] = 1                       (after all data)
    report the figures to the scheduler (dashboard_events, best effort)

Merge (group a, batch b, head block j)::

    for each producer (task i, slot s) of row a:  acc = merge(acc, partial)
    write out[b, heads_j, a], lse[...], merge_stats[...];  then merge_done[a, b, j] = 1
"""

from __future__ import annotations

import os
import time
from typing import Any

import torch
import zarr

from . import config
from .dashboard_events import report_task, task_started, worker_address
from .errors import InvalidInputError, StoreError
from .kernels import attend, merge, resolve_device, select_kernel
from .layout import Job, open_job, read_block, write_block, write_stats

__all__ = ["merge_task", "quorum_task", "worker_options"]

_TORCH = {"float32": torch.float32, "float16": torch.float16, "bfloat16": torch.bfloat16}
_initialised = False


def _init_process(opt: dict[str, Any]) -> None:
    """Once per worker process: torch threads and zarr concurrency."""
    global _initialised
    if _initialised:
        return
    zarr.config.set({"async.concurrency": int(opt["zarr-concurrency"])})
    n = opt["torch-threads"] or os.cpu_count() or 1
    torch.set_num_threads(int(n))
    _initialised = True


def _heads(job: Job, block: int) -> tuple[slice, slice]:
    p = job.plan
    hk, hq = p.heads_per_task, p.q_heads_per_task
    return slice(block * hk, (block + 1) * hk), slice(block * hq, (block + 1) * hq)


def _tokens(job: Job, g: int) -> slice:
    return slice(*job.plan.group_bounds(g))


def _device_peak(device: torch.device) -> int | None:
    if device.type == "cuda":
        return int(torch.cuda.max_memory_allocated(device))
    return None


def _device_in_use(device: torch.device) -> int | None:
    if device.type == "cuda":
        return int(torch.cuda.memory_allocated(device))
    return None


def _record(stats: zarr.Array | None, index: tuple[int, int, int], rec: dict[str, Any], start: float) -> None:
    """Keep a finished task's figures in the store (before its marker) for ``cqsa dashboard``."""
    if stats is not None:
        write_stats(stats, index, {**rec, "start": start, "worker": worker_address()})


def worker_options() -> dict[str, Any]:
    """The client-side settings tasks need, passed with each task.

    dask.config set on the client does not reach running workers, so the
    graph carries these explicitly.
    """
    return {k: config.get(k) for k in ("device", "kernel", "check-finite", "torch-threads", "zarr-concurrency")}


def _checked(x: torch.Tensor, name: str, group: int, idx: tuple[Any, ...], check: bool) -> torch.Tensor:
    """Raise InvalidInputError when block ``x`` of input ``name`` holds NaN or Inf."""
    if check and not bool(torch.isfinite(x).all()):
        b, h, t = idx
        raise InvalidInputError(
            f"input {name} holds NaN or Inf in group {group} (tokens {t.start}..{t.stop - 1}, batch {b}, "
            f"heads {h.start}..{h.stop - 1}); clean the input or set cqsa.check-finite to false"
        )
    return x


def quorum_task(store: str, token: str, task: int, batch: int, block: int,
                options: dict[str, Any] | None = None) -> dict[str, Any]:
    """Compute every pair quorum ``task`` owns for one batch element and head block.

    Reads k, v (1, hk, G, D) of the quorum's key groups and q (1, hq, G, D)
    of its query groups; writes partial_out (hq, G, D) and partial_lse (hq, G)
    per slot, then the task's marker.  Returns timings and byte counts.
    """
    opt = options or worker_options()
    _init_process(opt)
    t0, start = time.perf_counter(), task_started(token, "quorum", (task, batch, block))
    job = open_job(store, token)
    plan = job.plan
    dev = resolve_device(opt["device"])
    if dev.type == "cuda":  # per-task peaks (shared by tasks running at once on one device)
        torch.cuda.reset_peak_memory_stats(dev)
    dtype = _TORCH[plan.dtype]
    name = select_kernel(dev, dtype, plan.head_dim, opt["kernel"])
    check = bool(opt["check-finite"])
    kv_h, q_h = _heads(job, block)
    work = plan.work(task)
    nread = nwritten = 0
    kv: dict[int, tuple[torch.Tensor, torch.Tensor]] = {}
    for g in sorted({b for _, _, bs in work for b in bs}):
        idx = (batch, kv_h, _tokens(job, g))
        k = _checked(read_block(job.k, idx, plan.dtype), "k", g, idx, check)
        v = _checked(read_block(job.v, idx, plan.dtype), "v", g, idx, check)
        kv[g] = (k.to(dev)[None], v.to(dev)[None])  # (1, hk, G, D)
        nread += k.nbytes + v.nbytes
    t_io = time.perf_counter() - t0
    t_compute = 0.0
    for slot, a, bs in work:
        ta = time.perf_counter()
        qidx = (batch, q_h, _tokens(job, a))
        q = _checked(read_block(job.q, qidx, plan.dtype), "q", a, qidx, check)
        nread += q.nbytes
        q = q.to(dev)[None].contiguous()  # (1, hq, G, D)
        tb = time.perf_counter()
        acc = None
        for b in bs:
            part = attend(q, *kv[b], scale=plan.scale, diagonal_causal=plan.causal and a == b, kernel=name)
            acc = merge(acc, part)
        assert acc is not None
        out, lse = acc[0].to(dtype)[0].cpu(), acc[1][0].cpu()  # (hq, G, D), (hq, G)
        tc = time.perf_counter()
        write_block(job.partial_out, (slot, batch, q_h, _tokens(job, a)), out)
        write_block(job.partial_lse, (slot, batch, q_h, _tokens(job, a)), lse)
        nwritten += out.nbytes + lse.nbytes
        t_compute += tc - tb
        t_io += (tb - ta) + (time.perf_counter() - tc)
    rec = {
        "kind": "quorum", "task": task, "batch": batch, "block": block,
        "pairs": sum(len(bs) for _, _, bs in work), "kernel": name, "device": str(dev),
        "seconds": time.perf_counter() - t0, "compute_seconds": t_compute, "io_seconds": t_io,
        "bytes_read": nread, "bytes_written": nwritten, "peak_device_bytes": _device_peak(dev),
        "device_in_use": _device_in_use(dev),
    }
    _record(job.task_stats, (task, batch, block), rec, start)
    job.task_done[task, batch, block] = 1
    report_task(token, (task, batch, block), rec, start)
    return rec


def _read_partial(job: Job, task: int, slot: int, batch: int, block: int, q_h: slice, rows: slice
                  ) -> tuple[torch.Tensor, torch.Tensor]:
    """Partial (out (hq, G, D), lse (hq, G)) of a producer, checked.

    A producer without its marker, or whose chunks are missing (they read as
    NaN) or unreadable, is damaged: its marker is cleared so that a resume
    recomputes it, and :class:`StoreError` fails this merge.
    """
    where = f"quorum task {task} (batch {batch}, head block {block}, slot {slot})"
    if not job.task_done[task, batch, block]:
        raise StoreError(f"{where} has no completion marker; run `cqsa resume` to compute it")
    try:
        out = read_block(job.partial_out, (slot, batch, q_h, rows), job.plan.dtype)
        lse = read_block(job.partial_lse, (slot, batch, q_h, rows), "float32")
        ok = bool(torch.isfinite(lse).all()) and bool(torch.isfinite(out).all())
        reason = "missing or non-finite values"
    except Exception as e:  # a truncated or corrupt chunk fails to decode
        ok, reason = False, f"{type(e).__name__}: {e}"
    if not ok:
        job.task_done[task, batch, block] = 0
        raise StoreError(f"partial result of {where} is damaged ({reason}); its marker was cleared, "
                         "run `cqsa resume` to recompute it")
    return out, lse


def merge_task(store: str, token: str, group: int, batch: int, block: int, options: dict[str, Any] | None,
               *deps: Any) -> dict[str, Any]:
    """Merge the partial results of query ``group`` into out and lse.

    ``deps`` are the producers' results (only there so Dask orders the
    merge after them).  Streams one partial (hq, G, D) at a time into a
    float32 accumulator; writes out (hq, G, D) in the job dtype and lse
    (hq, G) float32, then the merge marker.
    """
    _init_process(options or worker_options())
    t0, start = time.perf_counter(), task_started(token, "merge", (group, batch, block))
    job = open_job(store, token)
    plan = job.plan
    _, q_h = _heads(job, block)
    rows = _tokens(job, group)
    acc = None
    nread = 0
    for task, slot in plan.producers(group):
        out, lse = _read_partial(job, task, slot, batch, block, q_h, rows)
        nread += out.nbytes + lse.nbytes
        acc = merge(acc, (out, lse))
    assert acc is not None, f"group {group} has no producers"
    out = acc[0].to(_TORCH[plan.dtype])
    write_block(job.out, (batch, q_h, rows), out)
    write_block(job.lse, (batch, q_h, rows), acc[1])
    rec = {
        "kind": "merge", "group": group, "batch": batch, "block": block,
        "seconds": time.perf_counter() - t0, "bytes_read": nread,
        "bytes_written": out.nbytes + acc[1].nbytes,
    }
    _record(job.merge_stats, (group, batch, block), rec, start)
    job.merge_done[group, batch, block] = 1
    report_task(token, (group, batch, block), rec, start)
    return rec
