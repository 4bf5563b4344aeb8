"""The functions Dask runs: one quorum task, one merge.

Both take only small arguments (the store's ``StoreLocation``, job token, indices, the
:class:`RunOptions`) and return a small dict of metadata; all tensors move
through the Zarr store.  What a worker keeps between tasks (host cache, IO
pool, streams, locks) is its runtime's (``runtime.py``); what depends on the
partials policy is the policy's (``partials/``).

Quorum task (task i, batch b, head block j)::

    task_done[i, b, j] set: return at once  (a rerun of a durable task after its worker died)
    tell the scheduler the task runs                      (telemetry, best effort)
    prefetch   k, v of every key group the task owns pairs for (resident; W = 1: in key blocks,
               resident or streamed from host memory: keyblocks.py), q ahead
    for each step (a slot with query group a and key groups [b1, b2, ...], or a query
    piece of a row the task computes alone: pieces.py; cqsa.first-pieces 2: a row's first
    two pieces at once, on each key block as it lands), a row's steps on one turn:
        stop     if the job was interrupted in this process (a threaded worker: stop.py)
        compute  (out, lse) = merge over bk of attend(q_a, k_bk, v_bk)   (float32 acc;
                 on CUDA queued from the device's compute thread: devicethread.py)
        write    behind: a single-producer row to out/lse (and its marker; a row in
                 pieces: after its last piece), a shared row to the partials policy (emit)
    write task_stats[i, b, j]  (timings, bytes, device peak, runs: the count of computations)
    write task_done[i, b, j] = 1                       (after all data)
    report the figures to the scheduler                (telemetry, best effort)

Merge (group a, batch b, head block j)::

    a single-producer row: check its marker; done
    merged = policy.finish(a)       (None: the row is written already)
    write out[b, heads_j, a], lse[...], merge_stats[...];  then merge_done[a, b, j] = 1
    policy.release(a)               (drop what the row no longer needs)
"""

from __future__ import annotations

import contextlib
import time
from collections.abc import Iterator, Sequence
from functools import partial
from typing import Any

import torch

from cqsa_dask.core.errors import InvalidInputError, StoreError
from cqsa_dask.core.plan import Plan
from cqsa_dask.execution.devicethread import on_device
from cqsa_dask.execution.iopool import Lane
from cqsa_dask.execution.keyblocks import KeyBlocks
from cqsa_dask.execution.options import RunOptions
from cqsa_dask.execution.partials import Cell, Merged, Producer
from cqsa_dask.execution.pieces import Step, steps
from cqsa_dask.execution.pieces import together as pieces_together
from cqsa_dask.execution.retry import attempts
from cqsa_dask.execution.runtime import WorkerRuntime, runtime
from cqsa_dask.execution.stop import check as check_stopped
from cqsa_dask.execution.stop import running
from cqsa_dask.execution.taskio import ReadAhead, Result, TaskIO, Timer, WriteBehind
from cqsa_dask.execution.telemetry import report_task, task_started, worker_address
from cqsa_dask.kernels.attention import attend, merge, resolve_device, select_kernel
from cqsa_dask.kernels.transfer import done_event
from cqsa_dask.store.layout import TORCH_DTYPES, open_job, write_block, write_stats
from cqsa_dask.store.location import StoreLike

__all__ = ["merge_task", "quorum_task"]


def quorum_task(store: StoreLike, token: str, task: int, batch: int, block: int,
                options: RunOptions | None = None) -> dict[str, Any]:
    """Compute every pair quorum ``task`` owns for one batch element and head block.

    Reads k, v (1, hk, G, D) of the quorum's key groups and q (1, hq, G, D)
    of its query groups; writes (hq, G, D) and (hq, G) results per slot,
    then the task's marker.  Reads run ahead and writes behind on the IO
    pool (``taskio.py``), so IO overlaps the kernels; on CUDA a slot's result
    is copied back while the next slot's kernels run.  Returns timings and
    byte counts.

    A task whose marker is set computes nothing (``"skipped": True``): Dask runs a
    finished task again when the worker holding its result died before every merge
    that needs it ran, and what the marker vouches for is in the store already.
    """
    opt = options or RunOptions.from_config()
    job = open_job(store, token)
    if job.task_done[task, batch, block]:  # durable already: Dask reran it after its worker died
        return _skipped(task, batch, block)
    rt = runtime(opt)
    rt.bind_thread()
    start = task_started(token, "quorum", (task, batch, block))
    cell = Cell(job, token, batch, block)
    lane = rt.pool.lane()  # the task's place in the IO queue, kept by its attempts
    with running(token):  # a stopped job's client waits for it (stop.py)
        rec = attempts(opt.retries, lambda: _QuorumRun(cell, task, opt, rt, lane).run(), f"quorum task {task}")
        _record(cell.job.task_stats, (task, batch, block), rec, start)
        cell.job.task_done[task, batch, block] = 1
    report_task(token, (task, batch, block), rec, start)
    return rec


class _QuorumRun:
    """One quorum task: prefetch (``ReadAhead``), compute (``compute``), write (``WriteBehind``)."""

    def __init__(self, cell: Cell, task: int, opt: RunOptions, rt: WorkerRuntime, lane: Lane):
        plan = cell.job.plan
        self.cell, self.task, self.plan, self.rt, self.lane = cell, task, plan, rt, lane
        self.t0 = time.perf_counter()
        self.dev = resolve_device(opt.device)
        check_device_kind(plan, self.dev)
        if self.dev.type == "cuda":  # per-task peaks (shared by tasks running at once on one device)
            torch.cuda.reset_peak_memory_stats(self.dev)
        self.dtype = TORCH_DTYPES[plan.dtype]
        self.kernel = select_kernel(self.dev, self.dtype, plan.head_dim, opt.kernel)
        self.work = plan.work(task)
        self.steps = steps(plan, self.work, plan.query_piece)
        shared = [a for _, a, _ in self.work if not plan.direct(a)]
        self.producer: Producer = plan.policy.producer(cell, task, shared, rt)
        self.io = TaskIO(cell, opt, rt.cache, self.producer)
        self.timer = Timer()
        self.turn, self.first_pieces = opt.cuda_turn, opt.first_pieces
        self.setup_s = self.first_step_s = 0.0  # since t0: IO set up; the first step's inputs in

    def run(self) -> dict[str, Any]:
        """Every step of the task, reads ahead and writes behind; the task's record.

        A row's steps run under one turn of the device (``WorkerRuntime.turn``), taken once the
        first step's inputs are in; on CUDA a step's result is copied back while the next step's
        kernels run, and with ``cuda_turn="kernels"`` the row's kernels are done before the turn
        is given up.  With ``first_pieces`` 2 the first two pieces of a W = 1 row attend the key
        blocks together as they land (``pieces.together``)."""
        on_cuda = self.dev.type == "cuda"
        exclusive = on_cuda and self.turn == "kernels"  # the turn covers the kernels themselves
        units = pieces_together(self.plan, self.steps, self.first_pieces)
        reads = ReadAhead(self.io, self.lane, self.steps, self.dev, ahead=1 if on_cuda else 2,
                          streamed=self.plan.stream_keys, first=len(units[0]) if units else 1)
        writes = WriteBehind(self.io.write, self.lane, self.timer)
        try:
            with self.rt.task_stream(self.dev), contextlib.ExitStack() as held:
                waiting: list[Result] = []  # CUDA: results of the previous unit, not yet copied back
                self.setup_s = time.perf_counter() - self.t0
                for unit in units:
                    check_stopped(self.cell.token)  # the job was interrupted in this process (stop.py)
                    first, last = self.steps[unit[0]], self.steps[unit[-1]]
                    t = time.perf_counter()
                    qs = [reads.q(n, read_ahead=len(unit) == 1) for n in unit]
                    kv = reads.keys(first)
                    if first.first:
                        held.enter_context(self.rt.turn(self.dev.type, self.turn))
                    t = self.timer.waited(t)
                    if unit[0] == 0:
                        self.first_step_s = t - self.t0
                    if len(unit) == 1:
                        results = [self.compute(first, qs[0], kv)]
                    else:  # pieces together: the next q read once their kernels are queued
                        assert isinstance(kv, KeyBlocks)
                        results = self.compute_together([self.steps[n] for n in unit], qs, kv)
                        reads.read_ahead(unit[-1])
                    del qs, kv
                    if last.last and exclusive and results[-1].done is not None:
                        results[-1].done.synchronize()
                    self.timer.computed(t)
                    if last.last:
                        held.close()  # the row is done: the next row takes its turn again
                    for w in waiting:  # copied back while this unit's kernels ran
                        writes.put(w)
                    waiting = []
                    if len(unit) > 1 and results[-1].done is not None:
                        # wait for these kernels before the next step: its q (read ahead) and these
                        # results then take no more of the device than a step of one piece does
                        t = time.perf_counter()
                        results[-1].done.synchronize()
                        self.timer.computed(t)
                    for result in results:
                        if result.done is None or (last.last and exclusive):  # computed already
                            writes.put(result)
                        else:
                            waiting.append(result)
                for w in waiting:
                    writes.put(w)
            writes.drain()
        except BaseException:
            reads.cancel()  # leave no IO running for a failed task,
            writes.cancel()
            self.io.abort()  # and no half-written row behind it
            raise
        return self.record()

    def compute(self, step: Step, q: torch.Tensor, kv: list[tuple[torch.Tensor, torch.Tensor]] | KeyBlocks
                ) -> Result:
        """Attend q (1, hq, T, D) of ``step`` (its group, or a piece of it) to k, v (1, hk, G, D) of
        its key groups (or to the task's key blocks, W = 1), merged in float32; the result
        (out (hq, T, D), lse (hq, T), its done event).  A shared row of a policy that takes float32
        keeps the accumulator's dtype.  On CUDA the kernels are queued from the device's compute
        thread (``devicethread.py``); waits for key blocks stay on the task's thread."""
        if isinstance(kv, KeyBlocks):
            return self.compute_together([step], [q], kv)[0]
        return on_device(self.dev, lambda: self._compute(step, q, kv))

    def compute_together(self, steps: list[Step], qs: list[torch.Tensor], blocks: KeyBlocks) -> list[Result]:
        """Pieces ``steps`` of a W = 1 row, q (1, hq, T_i, D) each, attending to the task's key
        blocks (``_block_calls`` of the first: several steps are the row's first pieces, which
        take every block in turn as it lands), each piece merged in its own float32 accumulator;
        their results, in order (one done event after all their kernels)."""
        accs: Sequence[tuple[torch.Tensor, torch.Tensor] | None] = [None] * len(steps)
        for j, masked in self._block_calls(steps[0], blocks):
            k, v = blocks.device(j) if j is not None else blocks.whole()
            accs = on_device(self.dev, partial(self._attend_merge_all, accs, qs, k, v, masked))
            del k, v

        def finish() -> list[Result]:
            results = []
            for s, a in zip(steps, accs, strict=True):
                assert a is not None  # every piece attended to at least one block
                results.append(self._result(s, a))
            return [Result(r.step, r.out, r.lse, results[-1].done) for r in results]

        return on_device(self.dev, finish)

    def _attend_merge_all(self, accs: Sequence[tuple[torch.Tensor, torch.Tensor] | None], qs: list[torch.Tensor],
                          k: torch.Tensor, v: torch.Tensor, masked: bool) -> list[tuple[torch.Tensor, torch.Tensor]]:
        """Each accumulator of ``accs`` merged with its q of ``qs`` (1, hq, T_i, D) attending to one
        key block k, v (1, hk, S, D)."""
        return [merge(acc, attend(q, k, v, scale=self.plan.scale, diagonal_causal=masked, kernel=self.kernel))
                for acc, q in zip(accs, qs, strict=True)]

    def _compute(self, step: Step, q: torch.Tensor, kv: list[tuple[torch.Tensor, torch.Tensor]]) -> Result:
        acc = None
        for b, (k, v) in zip(step.keys, kv):
            for part in self._pair(step, b, q, k, v):
                acc = merge(acc, part)
        assert acc is not None
        return self._result(step, acc)

    def _result(self, step: Step, acc: tuple[torch.Tensor, torch.Tensor]) -> Result:
        """The step's result from its float32 accumulator (1, hq, T, D), (1, hq, T)."""
        keep = self.producer.float32 and not self.plan.direct(step.group)
        return Result(step, (acc[0] if keep else acc[0].to(self.dtype))[0], acc[1][0], done_event(self.dev))

    def _block_calls(self, step: Step, blocks: KeyBlocks) -> list[tuple[int | None, bool]]:
        """The kernel calls of a piece of a W = 1 row on the task's key blocks, as (block, masked);
        block None: all the keys at once (resident, once the first piece has waited for each
        block).  Causal: the earlier blocks whole, its own under the mask (``Step.key_blocks``)."""
        assert step.part is not None
        if self.plan.causal:
            return [(k0 // step.size, masked) for k0, _, masked in step.key_blocks()]
        if blocks.streamed or step.first:
            return [(j, False) for j in range(len(blocks))]
        return [(None, False)]

    def _pair(self, step: Step, b: int, q: torch.Tensor, k: torch.Tensor,
              v: torch.Tensor) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
        """The kernel calls of ``step``'s queries against key group ``b``: one, except for a piece
        of the causal diagonal, which sees the earlier pieces' keys whole and its own under the
        mask (``Step.key_blocks``)."""
        plan = self.plan
        diagonal = plan.causal and step.group == b
        if not diagonal or step.part is None:
            yield attend(q, k, v, scale=plan.scale, diagonal_causal=diagonal, kernel=self.kernel)
            return
        for k0, k1, masked in step.key_blocks():
            yield attend(q, k[:, :, k0:k1], v[:, :, k0:k1], scale=plan.scale, diagonal_causal=masked,
                         kernel=self.kernel)

    def record(self) -> dict[str, Any]:
        """The task's figures: timings (s; ``setup_seconds``: until its IO was set up,
        ``first_step_seconds``: until its first step's inputs were in), bytes, device peaks."""
        dev, c = self.dev, self.cell
        return {
            "kind": "quorum", "task": self.task, "batch": c.batch, "block": c.block,
            "pairs": sum(len(bs) for _, _, bs in self.work), "kernel": self.kernel, "device": str(dev),
            "seconds": time.perf_counter() - self.t0, "compute_seconds": self.timer.compute,
            "io_seconds": self.timer.wait, "bytes_read": self.io.read, "bytes_written": self.io.written,
            "setup_seconds": self.setup_s, "first_step_seconds": self.first_step_s,
            **_device_figures(dev),
        }


def check_device_kind(plan: Plan, dev: torch.device) -> None:
    """Refuse a task on a worker of another device kind than the one ``plan`` was sized for (a CUDA
    plan stages through host memory and holds two tasks at once; a CPU plan does neither): a
    worker that joined a job's scheduler with another kind fails the job with one line."""
    planned = "cuda" if plan.host_staging else "cpu"
    if dev.type != planned:
        raise InvalidInputError(
            f"worker {worker_address() or 'in this process'} computes on {dev.type}, but this job was planned for "
            f"{planned} workers (memory per task, tasks in flight): give its scheduler workers of one kind, "
            "or set cqsa.device on them")


def _skipped(task: int, batch: int, block: int) -> dict[str, Any]:
    """The record of a task found done: nothing read, written or computed."""
    return {"kind": "quorum", "task": task, "batch": batch, "block": block, "skipped": True, "pairs": 0,
            "kernel": None, "device": None, "seconds": 0.0, "compute_seconds": 0.0, "io_seconds": 0.0,
            "bytes_read": 0, "bytes_written": 0, "peak_device_bytes": None, "peak_device_reserved_bytes": None,
            "device_in_use": None}


def _device_figures(dev: torch.device) -> dict[str, int | None]:
    """Peak allocated and reserved bytes since the task's reset, and bytes in use (None on the CPU)."""
    if dev.type != "cuda":
        return {"peak_device_bytes": None, "peak_device_reserved_bytes": None, "device_in_use": None}
    return {"peak_device_bytes": int(torch.cuda.max_memory_allocated(dev)),
            "peak_device_reserved_bytes": int(torch.cuda.max_memory_reserved(dev)),
            "device_in_use": int(torch.cuda.memory_allocated(dev))}


def _record(stats: Any, index: tuple[int, int, int], rec: dict[str, Any], start: float) -> None:
    """Keep a finished task's figures in the store (before its marker) for ``cqsa dashboard``."""
    if stats is not None:
        write_stats(stats, index, {**rec, "start": start, "worker": worker_address()})


def merge_task(store: StoreLike, token: str, group: int, batch: int, block: int, options: RunOptions | None,
               *deps: Any) -> dict[str, Any]:
    """Merge the producers' results of query ``group`` into out and lse (``_merge``), tried
    again only after a transient failure.  ``deps`` are the producers' results (only there
    so Dask orders the merge after them)."""
    opt = options or RunOptions.from_config()
    with running(token):  # a stopped job's client waits for it (stop.py)
        return attempts(opt.retries, lambda: _merge(store, token, group, batch, block, opt),
                        f"merge of group {group}")


def _merge(store: StoreLike, token: str, group: int, batch: int, block: int, opt: RunOptions) -> dict[str, Any]:
    """One attempt of the merge of query ``group``.  The partials policy makes the row's float32 result
    (``finish``); this writes out (hq, G, D) in the job dtype and lse
    (hq, G) float32, then the merge marker, then lets the policy release
    what the row no longer needs.
    """
    rt = runtime(opt)
    rt.bind_thread()
    t0, start = time.perf_counter(), task_started(token, "merge", (group, batch, block))
    cell = Cell(open_job(store, token), token, batch, block)
    plan = cell.job.plan
    if plan.direct(group):
        _check_direct(cell, group)  # its only producer wrote the row
        merged = None
    else:
        merged = plan.policy.finish(cell, group, rt, opt.check_finite)
    moved = _write_row(cell, group, merged) if merged is not None else {"bytes_read": 0, "bytes_written": 0}
    rec = {"kind": "merge", "group": group, "batch": batch, "block": block,
           "seconds": time.perf_counter() - t0, **moved}
    if merged is not None:  # the row's figures, its marker (after its data), then the cleanup;
        _record(cell.job.merge_stats, (group, batch, block), rec, start)  # a merge with nothing
        cell.job.merge_done[group, batch, block] = 1  # to merge is reported, not stored
        plan.policy.release(cell, group)
    report_task(token, (group, batch, block), rec, start)
    return rec


def _check_direct(cell: Cell, group: int) -> None:
    """A row with one producer: that producer wrote out, lse and the marker, or the job needs a resume."""
    if not cell.job.merge_done[group, cell.batch, cell.block]:
        task = cell.job.plan.producers(group)[0][0]
        raise StoreError(f"query group {group} (batch {cell.batch}, head block {cell.block}) was not written by "
                         f"its only producer, quorum task {task}; run `cqsa resume`")


def _write_row(cell: Cell, group: int, merged: Merged) -> dict[str, int]:
    """Write a merged row: out (hq, G, D) in the job dtype, lse (hq, G) float32; the bytes moved."""
    out = merged.out.to(TORCH_DTYPES[cell.job.plan.dtype])
    index = cell.block_of(group)
    write_block(cell.job.out, index, out)
    write_block(cell.job.lse, index, merged.lse)
    return {"bytes_read": merged.bytes_read, "bytes_written": out.nbytes + merged.lse.nbytes}
