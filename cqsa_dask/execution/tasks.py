"""The functions Dask runs: one quorum task, one merge.

Both take only small arguments (the store's ``StoreLocation``, job token, indices) and return a
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

    if merge_done[a, b, j]: delete what is left of the row's partials; done   (a rerun)
    for each producer (task i, slot s) of row a:  acc = merge(acc, partial)
    write out[b, heads_j, a], lse[...], merge_stats[...];  then merge_done[a, b, j] = 1
    delete the row's partials
"""

from __future__ import annotations

import contextlib
import functools
import logging
import os
import threading
import time
from collections import deque
from collections.abc import Iterator
from concurrent.futures import Future
from contextlib import AbstractContextManager
from typing import Any

import torch
import zarr

from cqsa_dask import config
from cqsa_dask.core.errors import InvalidInputError, StoreError
from cqsa_dask.execution.fold import damaged_row, finish_row, fold, lock_for
from cqsa_dask.execution.hostcache import host_cache, io_pool
from cqsa_dask.execution.telemetry import report_task, task_started, worker_address
from cqsa_dask.kernels.attention import all_finite, attend, merge, resolve_device, select_kernel
from cqsa_dask.kernels.transfer import Staged, done_event, download, upload, use
from cqsa_dask.store.chunkio import read_rows
from cqsa_dask.store.layout import (
    TORCH_DTYPES,
    Job,
    chunk_exists,
    delete_chunk,
    open_job,
    read_block,
    write_block,
    write_stats,
)
from cqsa_dask.store.location import StoreLike

__all__ = ["merge_task", "quorum_task", "worker_options"]

log = logging.getLogger(__name__)

_initialised = False


@functools.cache
def _fold_slots(n: int) -> threading.BoundedSemaphore:
    """At most ``n`` folds at once in this process (n = tasks in flight): bounds the
    journals on disk (``Plan.partial_bytes``); folds of different rows run in parallel."""
    return threading.BoundedSemaphore(n)


@functools.cache
def _turn(device_type: str) -> AbstractContextManager[Any]:
    """Held while a task runs torch math on ``device_type``.  On the CPU one task computes at a
    time per process: its ops already use every core, and two at once oversubscribe them
    (1.2-1.6x slower kernels), while the other tasks in flight read and write meanwhile.
    CUDA orders work on streams: no lock."""
    return threading.Lock() if device_type == "cpu" else contextlib.nullcontext()


def _init_process(opt: dict[str, Any]) -> None:
    """Once per worker process: allocator settings, torch threads and zarr concurrency."""
    global _initialised
    if _initialised:
        return
    if opt["expandable-segments"]:
        _expandable_segments()
    zarr.config.set({"async.concurrency": int(opt["zarr-concurrency"])})
    n = opt["torch-threads"] or os.cpu_count() or 1
    torch.set_num_threads(int(n))
    _initialised = True


_SEGMENTS = "expandable_segments:True"


def _expandable_segments() -> None:
    """Let torch's CUDA caching allocator grow segments in place instead of carving
    fixed ones (``PYTORCH_CUDA_ALLOC_CONF=expandable_segments:True``), unless the
    process's environment already sets the allocator.

    Under the per-process cap (``_cap_device``) a fixed-segment allocator fails
    once free memory is split between segments: at N = 4M under 1 GB, three tasks
    of 331 MB (predicted) held 720 MiB while 217 MiB reserved was unusable, and a
    20 MiB request failed (H200, 2026-11-29).  Set before CUDA starts in this
    process, it applies from the first allocation; after (the benchmark warms
    its workers' CUDA first), through torch's setter, to the segments made from
    then on.  A threaded cluster runs tasks in the user's process: there this
    changes that process's setting too (``cqsa.expandable-segments: false``
    or an explicit ``PYTORCH_CUDA_ALLOC_CONF`` keeps it as it was).
    """
    if "PYTORCH_CUDA_ALLOC_CONF" in os.environ or "PYTORCH_ALLOC_CONF" in os.environ:
        return  # the user's choice
    os.environ["PYTORCH_CUDA_ALLOC_CONF"] = _SEGMENTS
    if torch.cuda.is_available() and torch.cuda.is_initialized():
        setter = getattr(torch._C, "_accelerator_setAllocatorSettings", None) or getattr(
            torch._C, "_cuda_cudaCachingAllocator_set_allocator_settings", None)
        if setter is not None:
            setter(_SEGMENTS)


def worker_budget(resource: str) -> float | None:
    """The amount of ``resource`` the Dask worker running the calling task advertises
    (None outside a worker, or when it advertises none)."""
    try:
        from distributed import get_worker

        amount = get_worker().state.total_resources.get(resource)
    except (ImportError, ValueError, AttributeError):
        return None
    return float(amount) if amount else None


def _capped_bytes(budget: float) -> float:
    """What the allocator cap allows under a budget of ``budget`` bytes: 1 % (at least
    32 MiB, at most 10 %) less, because with expandable segments the reserve can pass the
    cap by part of a page (8M-token job under 4 GB on the H200: 3.5 MB above it, 2026-11-29)."""
    return budget - min(max(0.01 * budget, 32 * 2**20), 0.1 * budget)


@functools.cache
def _cap_device(device: torch.device, budget: float) -> float:
    """Cap torch's caching allocator on ``device`` just under ``budget`` bytes for this
    process (``torch.cuda.set_per_process_memory_fraction``, ``_capped_bytes``); return
    the fraction set.

    The budget then bounds what the process reserves, not only what the planner
    predicts: past the cap the allocator frees its cached blocks and retries before it
    fails.  The CUDA context and library handles (about 0.8 GB per process on the
    H200 machine) are outside the allocator and come on top (docs/design.md).
    """
    index = device.index if device.index is not None else torch.cuda.current_device()  # "cuda": the current one
    fraction = min(1.0, _capped_bytes(budget) / torch.cuda.get_device_properties(index).total_memory)
    torch.cuda.set_per_process_memory_fraction(fraction, index)
    return fraction


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


def _device_reserved_peak(device: torch.device) -> int | None:
    """The caching allocator's peak reserve (what the process holds), since the last reset."""
    if device.type == "cuda":
        return int(torch.cuda.max_memory_reserved(device))
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
    keys = ("device", "kernel", "check-finite", "torch-threads", "zarr-concurrency", "host-cache", "io-threads",
            "pin-host-memory", "resource", "cap-device-memory", "expandable-segments")
    return {k: config.get(k) for k in keys}


def _pinned(opt: dict[str, Any]) -> bool:
    """Whether input blocks are read into pinned host memory: ``cqsa.pin-host-memory``
    ("auto": when tasks run on CUDA), so that their copies to the device are direct."""
    setting = opt["pin-host-memory"]
    if setting == "auto":
        return resolve_device(opt["device"]).type == "cuda"
    return bool(setting)


def _host_copy(x: torch.Tensor, pin: bool) -> torch.Tensor:
    """A compact copy of ``x`` in host memory, pinned when ``pin``."""
    return torch.empty(x.shape, dtype=x.dtype, pin_memory=pin).copy_(x)


def _checked(x: torch.Tensor, name: str, group: int, idx: tuple[Any, ...], check: bool) -> torch.Tensor:
    """Raise InvalidInputError when block ``x`` of input ``name`` holds NaN or Inf."""
    if check and not all_finite(x):
        b, h, t = idx
        raise InvalidInputError(
            f"input {name} holds NaN or Inf in group {group} (tokens {t.start}..{t.stop - 1}, batch {b}, "
            f"heads {h.start}..{h.stop - 1}); clean the input or set cqsa.check-finite to false"
        )
    return x


def _chunk_heads(arr: zarr.Array, heads: slice) -> tuple[int, int]:
    """The heads [lo, hi) of the chunks that ``heads`` of ``arr`` (B, H, N, D) touch."""
    c, h = arr.chunks[1], arr.shape[1]
    return heads.start // c * c, min(h, -(-heads.stop // c) * c)


def _bytes(arr: zarr.Array, idx: tuple[Any, ...]) -> int:
    """Bytes of one head of block ``idx`` = (b, heads, tokens) of ``arr``."""
    t = idx[2]
    return (t.stop - t.start) * arr.shape[3] * arr.dtype.itemsize


class _TaskIO:
    """Store reads and writes of one task, through the host cache and the IO pool.

    Thread-safe: its methods run on IO threads while the task computes.
    Byte counts include only what actually moved through the store.
    """

    def __init__(self, job: Job, token: str, task: int, batch: int, block: int, opt: dict[str, Any]):
        self.job, self.token, self.task, self.batch, self.block = job, token, task, batch, block
        self.locks: dict[int, AbstractContextManager[Any]] = {}
        self.kv_h, self.q_h = _heads(job, block)
        self.check = bool(opt["check-finite"])
        self.pin = _pinned(opt)
        self.cache = host_cache(opt["host-cache"])
        self.read = self.written = 0
        self._lock = threading.Lock()

    def _count(self, read: int = 0, written: int = 0) -> None:
        with self._lock:
            self.read += read
            self.written += written

    def _input(self, name: str, arr: zarr.Array | None, heads: slice, g: int,
               device: torch.device | None) -> torch.Tensor:
        idx = (self.batch, heads, _tokens(self.job, g))
        source = self.job.source
        if source is not None:  # generated where it is used (synthetic.py): nothing read, nothing cached
            x = {"q": source.q, "k": source.k, "v": source.v}[name](*idx, device)
            if x.is_cuda:  # this IO thread waits for the kernels: the task reads x on its own stream
                torch.cuda.current_stream(x.device).synchronize()
            return x
        assert arr is not None

        def key(h0: int) -> tuple[Any, ...]:
            return (self.token, name, self.batch, h0, g)

        def load() -> torch.Tensor:
            dtype = TORCH_DTYPES[self.job.plan.dtype]
            x = read_rows(arr, self.batch, heads, idx[2], dtype, pin=self.pin)  # local chunk files: these heads only
            if x is not None:
                self._count(read=x.nbytes)
                return _checked(x, name, g, idx, self.check)
            # through zarr, which decodes whole chunks: when they hold every head in lo..hi,
            # read them once and serve the other task head blocks from memory
            lo, hi = _chunk_heads(arr, heads)
            n = heads.stop - heads.start
            wide = (lo, hi) != (heads.start, heads.stop) and self.cache.capacity >= 4 * (hi - lo) * _bytes(arr, idx)
            ridx = (self.batch, slice(lo, hi), idx[2]) if wide else idx
            x = _checked(read_block(arr, ridx, self.job.plan.dtype), name, g, ridx, self.check)
            self._count(read=x.nbytes)
            if not wide:
                return _host_copy(x, True) if self.pin else x
            for h0 in range(-(-lo // n) * n, hi - n + 1, n):  # the task head blocks inside lo..hi
                if h0 != heads.start:
                    self.cache.put(key(h0), _host_copy(x[h0 - lo:h0 - lo + n], self.pin))
            return _host_copy(x[heads.start - lo:heads.stop - lo], self.pin)

        return self.cache.get_or_load(key(heads.start), load)

    def kv(self, g: int, device: torch.device) -> tuple[Staged, Staged]:
        """k, v of group ``g``: (hk, G, D) each, on ``device`` (copied there on the upload
        stream, ``transfer.py``)."""
        return (upload(self._input("k", self.job.k, self.kv_h, g, device), device),
                upload(self._input("v", self.job.v, self.kv_h, g, device), device))

    def q(self, a: int, device: torch.device) -> Staged:
        """q of group ``a``: (hq, G, D) on ``device``."""
        return upload(self._input("q", self.job.q, self.q_h, a, device), device)

    def write(self, slot: int, a: int, out: torch.Tensor, lse: torch.Tensor) -> None:
        """Write the result (hq, G, D), (hq, G) of query group ``a`` from ``slot``.

        A group with a single producer goes straight to out/lse (then its
        merge marker); in a bounded job the result (float32) is folded into
        the row (``fold.py``); otherwise it goes to the partial arrays, kept
        in the cache for the merge too.
        """
        job, rows = self.job, _tokens(self.job, a)
        if job.plan.direct(a):
            write_block(job.out, (self.batch, self.q_h, rows), out.to(TORCH_DTYPES[job.plan.dtype]))
            write_block(job.lse, (self.batch, self.q_h, rows), lse)
            job.merge_done[a, self.batch, self.block] = 1
        elif job.plan.partials == "bounded":
            with _fold_slots(job.plan.tasks_in_flight), self.locks[a]:
                self._count(written=fold(job, a, self.batch, self.block, self.task, out, lse))
            return
        elif job.merge_done[a, self.batch, self.block]:  # a rerun of a producer of a merged row
            return
        else:
            write_block(job.partial_out, (slot, self.batch, self.q_h, rows), out)
            write_block(job.partial_lse, (slot, self.batch, self.q_h, rows), lse)
            self.cache.put(_partial_key(self.token, slot, self.batch, self.block, a, "out"), out)
            self.cache.put(_partial_key(self.token, slot, self.batch, self.block, a, "lse"), lse)
        self._count(written=out.nbytes + lse.nbytes)


def _partial_key(token: str, slot: int, batch: int, block: int, group: int, what: str) -> tuple[Any, ...]:
    return (token, "partial", what, slot, batch, block, group)


_STREAMS = threading.local()


@contextlib.contextmanager
def _task_stream(dev: torch.device) -> Iterator[None]:
    """On CUDA, run the task on its own stream, so that two tasks in flight on
    one device overlap one's copies with the other's kernels.

    One stream per worker thread, kept for the thread's life: the caching
    allocator reuses a freed block only for the stream it was allocated on,
    so a new stream per task (torch hands out up to 32 in turn) left each
    task's blocks cached on its own stream, and the worker's reserved memory
    grew to tens of GB under a 4 GB budget (H200, 2026-11-28).
    """
    if dev.type != "cuda":
        yield
        return
    streams: dict[torch.device, torch.cuda.Stream] = _STREAMS.__dict__.setdefault("by_device", {})
    stream = streams.get(dev)
    if stream is None:
        stream = streams[dev] = torch.cuda.Stream(dev)
    with torch.cuda.stream(stream):
        yield
    stream.synchronize()


def quorum_task(store: StoreLike, token: str, task: int, batch: int, block: int,
                options: dict[str, Any] | None = None) -> dict[str, Any]:
    """Compute every pair quorum ``task`` owns for one batch element and head block.

    Reads k, v (1, hk, G, D) of the quorum's key groups and q (1, hq, G, D)
    of its query groups; writes (hq, G, D) and (hq, G) results per slot,
    then the task's marker.  Reads run ahead (all k, v and the next q
    groups: one on CUDA, two on the CPU; on CUDA each uploaded on a side
    stream, ``transfer.py``) and writes run behind (two in flight) on the IO
    pool, so IO overlaps the kernels; on CUDA a slot's result is copied back
    while the next slot's kernels run.  Returns timings and byte counts.
    """
    opt = options or worker_options()
    _init_process(opt)
    t0, start = time.perf_counter(), task_started(token, "quorum", (task, batch, block))
    job = open_job(store, token)
    plan = job.plan
    dev = resolve_device(opt["device"])
    if dev.type == "cuda":  # per-task peaks (shared by tasks running at once on one device)
        budget = worker_budget(str(opt["resource"])) if opt["cap-device-memory"] else None
        if budget is not None:
            _cap_device(dev, budget)
        torch.cuda.reset_peak_memory_stats(dev)
    dtype = TORCH_DTYPES[plan.dtype]
    name = select_kernel(dev, dtype, plan.head_dim, opt["kernel"])
    work = plan.work(task)
    io, pool = _TaskIO(job, token, task, batch, block, opt), io_pool(int(opt["io-threads"]))
    bounded = plan.partials == "bounded"
    if bounded:  # created here: a distributed lock needs the task thread's worker context
        io.locks = {a: lock_for(token, a) for _, a, _ in work}
    kv_futs = {g: pool.submit(io.kv, g, dev) for g in sorted({b for _, _, bs in work for b in bs})}
    # q of the next slots, read ahead (CUDA: one, on the device; CPU: two); a consumed future
    # is dropped at once (its tensor would otherwise stay alive to the end of the task)
    ahead = 1 if dev.type == "cuda" else 2
    q_futs: dict[int, Future[Staged]] = {n: pool.submit(io.q, a, dev) for n, (_, a, _) in enumerate(work[:ahead])}
    kv: dict[int, tuple[torch.Tensor, torch.Tensor]] = {}
    writes: deque[Future[None]] = deque()
    waiting: tuple[int, int, torch.Tensor, torch.Tensor, Any] | None = None  # CUDA: a result not yet copied back
    t_wait = t_compute = 0.0

    def emit(result: tuple[int, int, torch.Tensor, torch.Tensor, Any]) -> None:
        """Copy ``result`` to the host (once its kernels are done) and queue its write."""
        nonlocal t_compute, t_wait
        slot, a, o, lse_d, ev = result
        tc = time.perf_counter()
        out, lse = download(o, ev), download(lse_d, ev)
        tw = time.perf_counter()
        t_compute += tw - tc
        writes.append(pool.submit(io.write, slot, a, out, lse))
        while len(writes) > 2:
            writes.popleft().result()
        t_wait += time.perf_counter() - tw

    try:
        with _task_stream(dev):
            for n, (slot, a, bs) in enumerate(work):
                tw = time.perf_counter()
                q = use(q_futs.pop(n).result())[None].contiguous()  # (1, hq, G, D)
                if n + ahead < len(work):
                    q_futs[n + ahead] = pool.submit(io.q, work[n + ahead][1], dev)
                for b in bs:
                    if b not in kv:
                        k, v = kv_futs[b].result()
                        kv[b] = (use(k)[None], use(v)[None])  # (1, hk, G, D)
                with _turn(dev.type):
                    tc = time.perf_counter()
                    acc = None
                    for b in bs:
                        part = attend(q, *kv[b], scale=plan.scale, diagonal_causal=plan.causal and a == b,
                                      kernel=name)
                        acc = merge(acc, part)
                    assert acc is not None
                    # (hq, G, D), (hq, G); a bounded job folds the float32 result
                    keep = bounded and not plan.direct(a)
                    result = (slot, a, (acc[0] if keep else acc[0].to(dtype))[0], acc[1][0], done_event(dev))
                    del acc, part, q
                    t_compute += time.perf_counter() - tc
                t_wait += tc - tw
                if dev.type != "cuda":  # computed already: nothing to overlap
                    emit(result)
                    continue
                # the kernels of slot n are queued; copy back slot n-1's result while they run
                if waiting is not None:
                    emit(waiting)
                waiting = result
            if waiting is not None:
                emit(waiting)
                waiting = None
        tw = time.perf_counter()
        for w in writes:
            w.result()
        t_wait += time.perf_counter() - tw
    finally:  # leave no IO running for a failed task
        pending: list[Future[Any]] = [*kv_futs.values(), *q_futs.values(), *writes]
        for f in pending:
            f.cancel()
    rec = {
        "kind": "quorum", "task": task, "batch": batch, "block": block,
        "pairs": sum(len(bs) for _, _, bs in work), "kernel": name, "device": str(dev),
        "seconds": time.perf_counter() - t0, "compute_seconds": t_compute, "io_seconds": t_wait,
        "bytes_read": io.read, "bytes_written": io.written, "peak_device_bytes": _device_peak(dev),
        "peak_device_reserved_bytes": _device_reserved_peak(dev), "device_in_use": _device_in_use(dev),
    }
    _record(job.task_stats, (task, batch, block), rec, start)
    job.task_done[task, batch, block] = 1
    report_task(token, (task, batch, block), rec, start)
    return rec


def _read_partial(job: Job, task: int, slot: int, batch: int, block: int, group: int, q_h: slice, rows: slice,
                  finite_inputs: bool) -> tuple[torch.Tensor, torch.Tensor]:
    """Partial (out (hq, G, D), lse (hq, G)) of a producer, checked.

    A producer without its marker, or whose chunks are missing (lost, or
    deleted by an earlier merge of this row whose marker was then lost) or
    unreadable, or (when the inputs were checked finite, so its values must
    be) hold NaN or Inf, is damaged: its marker is cleared so that a resume
    recomputes it, and :class:`StoreError` fails this merge.
    """
    where = f"quorum task {task} (batch {batch}, head block {block}, slot {slot})"
    if not job.task_done[task, batch, block]:
        raise StoreError(f"{where} has no completion marker; run `cqsa resume` to compute it")
    try:
        if not all(chunk_exists(arr, c) for arr, c in _partial_chunks(job, slot, batch, block, group)):
            ok, reason = False, "its chunk is missing (deleted when its row was merged, or lost)"
        else:
            out = read_block(job.partial_out, (slot, batch, q_h, rows), job.plan.dtype)
            lse = read_block(job.partial_lse, (slot, batch, q_h, rows), "float32")
            ok = not finite_inputs or (all_finite(lse) and all_finite(out))
            reason = "missing or non-finite values"
    except Exception as e:  # noqa: BLE001  (a truncated or corrupt chunk fails to decode in many ways)
        ok, reason = False, f"{type(e).__name__}: {e}"
    if not ok:
        job.task_done[task, batch, block] = 0
        raise StoreError(f"partial result of {where} is damaged ({reason}); its marker was cleared, "
                         "run `cqsa resume` to recompute it")
    return out, lse


def merge_task(store: StoreLike, token: str, group: int, batch: int, block: int, options: dict[str, Any] | None,
               *deps: Any) -> dict[str, Any]:
    """Merge the partial results of query ``group`` into out and lse.

    ``deps`` are the producers' results (only there so Dask orders the
    merge after them).  Streams one partial (hq, G, D) at a time into a
    float32 accumulator; writes out (hq, G, D) in the job dtype and lse
    (hq, G) float32, then the merge marker.
    """
    opt = options or worker_options()
    _init_process(opt)
    t0, start = time.perf_counter(), task_started(token, "merge", (group, batch, block))
    job = open_job(store, token)
    plan = job.plan
    _, q_h = _heads(job, block)
    rows = _tokens(job, group)

    def nothing_merged() -> dict[str, Any]:
        """The record of a merge with nothing to merge (reported, not stored)."""
        rec = {"kind": "merge", "group": group, "batch": batch, "block": block,
               "seconds": time.perf_counter() - t0, "bytes_read": 0, "bytes_written": 0}
        report_task(token, (group, batch, block), rec, start)
        return rec

    if plan.direct(group) or plan.partials == "bounded":  # the producers wrote the row: only check it
        if not plan.direct(group):  # bounded: they folded it; finish a row whose last fold died
            with lock_for(token, group):
                if not finish_row(job, group, batch, block):
                    raise damaged_row(job, group, batch, block)
        elif not job.merge_done[group, batch, block]:  # its only producer wrote out/lse and the marker
            task = plan.producers(group)[0][0]
            raise StoreError(f"query group {group} (batch {batch}, head block {block}) was not written by its "
                             f"only producer, quorum task {task}; run `cqsa resume`")
        return nothing_merged()
    producers = plan.producers(group)
    if job.merge_done[group, batch, block]:  # a rerun of a merge that died after its marker, deleting
        _drop_partials(job, producers, group, batch, block)  # the partials: finish that, merge nothing
        return nothing_merged()
    cache = host_cache(opt["host-cache"])
    acc = None
    nread = 0
    damaged: list[str] = []  # every damaged producer is found (and its marker cleared) in one attempt
    for task, slot in producers:
        out = cache.pop(_partial_key(token, slot, batch, block, group, "out"))
        lse = cache.pop(_partial_key(token, slot, batch, block, group, "lse"))
        if out is None or lse is None or not job.task_done[task, batch, block]:
            try:
                out, lse = _read_partial(job, task, slot, batch, block, group, q_h, rows,
                                         bool(opt["check-finite"]))
            except StoreError as e:
                damaged.append(str(e))
                continue
            nread += out.nbytes + lse.nbytes
        if not damaged:
            with _turn("cpu"):  # partials are merged in host memory
                acc = merge(acc, (out, lse))
    if damaged:
        raise StoreError("; ".join(damaged))
    assert acc is not None, f"group {group} has no producers"
    out = acc[0].to(TORCH_DTYPES[plan.dtype])
    write_block(job.out, (batch, q_h, rows), out)
    write_block(job.lse, (batch, q_h, rows), acc[1])
    rec = {
        "kind": "merge", "group": group, "batch": batch, "block": block,
        "seconds": time.perf_counter() - t0, "bytes_read": nread,
        "bytes_written": out.nbytes + acc[1].nbytes,
    }
    _record(job.merge_stats, (group, batch, block), rec, start)
    job.merge_done[group, batch, block] = 1
    _drop_partials(job, producers, group, batch, block)
    report_task(token, (group, batch, block), rec, start)
    return rec


def _partial_chunks(job: Job, slot: int, batch: int, block: int, group: int) -> list[tuple[zarr.Array, tuple[int, ...]]]:
    """The chunks of one partial: partial_out (1, 1, hq, G, D) and partial_lse (1, 1, hq, G) at
    slot ``slot``, batch, head block ``block``, query group ``group``."""
    return [(job.partial_out, (slot, batch, block, group, 0)), (job.partial_lse, (slot, batch, block, group))]


def _drop_partials(job: Job, producers: list[tuple[int, int]], group: int, batch: int, block: int) -> None:
    """Delete the partials of a merged row, from its ``producers`` (task, slot) (after its marker:
    they are no longer needed), so a finished job holds no partials and a running one only those
    of its open rows.  Best effort: a chunk left behind is garbage, not an error."""
    for _, slot in producers:
        for arr, coords in _partial_chunks(job, slot, batch, block, group):
            try:
                delete_chunk(arr, coords)
            except OSError as e:
                log.warning("could not delete a merged partial chunk %s of %s: %s", coords, arr.path, e)
