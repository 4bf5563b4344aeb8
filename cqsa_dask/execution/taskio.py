"""Store IO of one quorum task: reads through the host cache, read-ahead, write-behind.

::

    ReadAhead    q of the next steps (a slot, or a piece of a   (CUDA: one ahead, CPU: two)
                 direct row: ``pieces.py``)
                 k, v of every key group the task needs     (submitted at once; resident)
                 or, W = 1 in pieces, in key blocks         (``keyblocks.py``: resident or streamed)
                 each read on the runtime's IO pool, then uploaded on the upload stream
    compute      (the task's own thread: tasks.py)
    WriteBehind  a step's result copied back once its kernels are done, then written
                 on the IO pool; at most two writes in flight

``TaskIO`` does the reads and the writes themselves; its methods run on the
IO threads while the task computes (thread-safe; byte counts include only
what moved through the store).  A row with a single producer is written to
out and lse directly, with its marker; a shared row's result goes to the
partials policy's producer (``partials/``); the pieces of a direct row
go to that row's ``RowPieces``, which writes the row's marker after its last
piece.
"""

from __future__ import annotations

import contextlib
import threading
import time
from collections import deque
from collections.abc import Callable
from concurrent.futures import Future
from dataclasses import dataclass
from typing import Any

import torch
import zarr

from cqsa_dask.core.errors import InvalidInputError
from cqsa_dask.execution.hostcache import HostCache
from cqsa_dask.execution.iopool import Lane
from cqsa_dask.execution.keyblocks import KeyBlocks
from cqsa_dask.execution.options import RunOptions
from cqsa_dask.execution.partials import Cell, Producer
from cqsa_dask.execution.pieces import RowPieces, Step
from cqsa_dask.kernels.attention import all_finite, resolve_device
from cqsa_dask.kernels.transfer import Staged, download, upload, use
from cqsa_dask.store.chunkio import chunk_io, read_rows
from cqsa_dask.store.layout import TORCH_DTYPES, read_block, write_block

__all__ = ["ReadAhead", "Result", "TaskIO", "Timer", "WriteBehind"]


@dataclass(frozen=True)
class Result:
    """A step's result on the task's device: out (hq, T, D), lse (hq, T) float32, and the event
    after which both are valid (None: now, on the CPU)."""

    step: Step
    out: torch.Tensor
    lse: torch.Tensor
    done: Any = None


def pinned(options: RunOptions) -> bool:
    """Whether input blocks are read into pinned host memory: ``pin_host_memory``
    ("auto": when tasks run on CUDA), so that their copies to the device are direct."""
    if options.pin_host_memory == "auto":
        return resolve_device(options.device).type == "cuda"
    return bool(options.pin_host_memory)


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


class TaskIO:
    """Store reads and writes of one task in ``cell``, through the host cache ``cache``.

    ``producer`` takes the results of shared rows (the partials policy's); None for a
    task that only reads.
    """

    def __init__(self, cell: Cell, options: RunOptions, cache: HostCache, producer: Producer | None = None):
        self.cell, self.job, self.token, self.batch = cell, cell.job, cell.token, cell.batch
        self.kv_h, self.q_h = cell.kv_heads, cell.q_heads
        self.check, self.pin = options.check_finite, pinned(options)
        self.cache, self.producer = cache, producer
        self.read = self.written = 0
        self._lock = threading.Lock()
        self._rows: dict[int, RowPieces] = {}  # direct rows written in pieces, until their last piece

    def abort(self) -> None:
        """Drop the half-written rows of a failed task (their pieces' chunk files)."""
        with self._lock:
            rows, self._rows = list(self._rows.values()), {}
        for row in rows:
            row.abort()

    def _count(self, read: int = 0, written: int = 0) -> None:
        with self._lock:
            self.read += read
            self.written += written

    def _input(self, name: str, arr: zarr.Array | None, heads: slice, g: int,
               device: torch.device | None, part: slice | None = None, *, pin: bool | None = None,
               cache: bool = True) -> torch.Tensor:
        pin = self.pin if pin is None else pin
        rows = self.cell.rows(g)
        if part is not None:  # a piece of the group's tokens
            rows = slice(rows.start + part.start, rows.start + part.stop)
        idx = (self.batch, heads, rows)
        source = self.job.source
        if source is not None:  # generated where it is used (generated.py): nothing read, nothing cached
            x = {"q": source.q, "k": source.k, "v": source.v}[name](*idx, device)
            if x.is_cuda:  # this IO thread waits for the kernels: the task reads x on its own stream
                torch.cuda.current_stream(x.device).synchronize()
            return x
        assert arr is not None

        def key(h0: int) -> tuple[Any, ...]:
            return (self.token, name, self.batch, h0, g) + ((part.start, part.stop) if part is not None else ())

        def load() -> torch.Tensor:
            dtype = TORCH_DTYPES[self.job.plan.dtype]
            x = read_rows(arr, self.batch, heads, idx[2], dtype, pin=pin)  # local chunk files: these heads only
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
                return _host_copy(x, True) if pin else x
            for h0 in range(-(-lo // n) * n, hi - n + 1, n):  # the task head blocks inside lo..hi
                if h0 != heads.start:
                    self.cache.put(key(h0), _host_copy(x[h0 - lo:h0 - lo + n], pin))
            return _host_copy(x[heads.start - lo:heads.stop - lo], pin)

        return self.cache.get_or_load(key(heads.start), load) if cache else load()

    def kv(self, name: str, g: int, device: torch.device) -> Staged:
        """k or v (``name``) of group ``g``: (hk, G, D) on ``device`` (copied there on the upload
        stream, ``transfer.py``)."""
        return upload(self._input(name, {"k": self.job.k, "v": self.job.v}[name], self.kv_h, g, device), device)

    def block_reads(self, name: str, size: int) -> bool:
        """Whether input ``name`` is read in blocks of ``size`` tokens at about the cost of those
        tokens: generated, local plain chunk files (read in token runs), or chunks of at most
        ``size`` tokens (a store that decodes whole chunks: compressed, remote)."""
        arr = {"q": self.job.q, "k": self.job.k, "v": self.job.v}[name]
        return self.job.source is not None or (arr is not None and (arr.chunks[2] <= size
                                                                    or chunk_io(arr).partial_reads))

    def key_block(self, name: str, g: int, part: slice, device: torch.device, *, host: bool) -> torch.Tensor:
        """k or v (``name``) of tokens ``part`` of group ``g`` (relative to its first): (hk, T, D),
        read past the host cache (``keyblocks.py``: no other task reads it).  ``host``: in host
        memory, pinned when ``device`` is CUDA (a streamed block is copied to it again and again);
        else where a read lands (host memory; generated inputs: on ``device``)."""
        cuda = device.type == "cuda"
        arr = {"k": self.job.k, "v": self.job.v}[name]
        x = self._input(name, arr, self.kv_h, g, torch.device("cpu") if host else device, part,
                        pin=cuda if host else self.pin, cache=False)
        return _host_copy(x, True) if host and cuda and not x.is_pinned() else x

    def q(self, a: int, device: torch.device, part: slice | None = None) -> Staged:
        """q of group ``a``: (hq, G, D) on ``device``; only tokens ``part`` of the group (relative
        to its first) when given."""
        return upload(self._input("q", self.job.q, self.q_h, a, device, part), device)

    def write(self, step: Step, out: torch.Tensor, lse: torch.Tensor) -> None:
        """Write the result (hq, T, D), (hq, T) of ``step``: a piece to its row's ``RowPieces``
        (the last one completes the row), a row with a single producer straight to out/lse (then
        its merge marker), a shared row through the partials policy's producer."""
        job, plan = self.job, self.job.plan
        slot, a = step.slot, step.group
        if step.part is not None:
            with self._lock:
                row = self._rows.get(a)
                if row is None:
                    row = self._rows[a] = RowPieces(self.cell, a)
            if row.put(step.part, out, lse):
                with self._lock:
                    del self._rows[a]
            self._count(written=out.nbytes + lse.nbytes)
            return
        if plan.direct(a):
            index = self.cell.block_of(a)
            write_block(job.out, index, out.to(TORCH_DTYPES[plan.dtype]))
            write_block(job.lse, index, lse)
            job.merge_done[a, self.batch, self.cell.block] = 1
            self._count(written=out.nbytes + lse.nbytes)
            return
        assert self.producer is not None
        self._count(written=self.producer.emit(slot, a, out, lse))


class Timer:
    """Seconds a task spends computing (kernels, copies back) and waiting (reads, writes, its turn)."""

    def __init__(self) -> None:
        self.compute = self.wait = 0.0

    def waited(self, since: float) -> float:
        """Add now - ``since`` to the waiting time; return now."""
        now = time.perf_counter()
        self.wait += now - since
        return now

    def computed(self, since: float) -> float:
        """Add now - ``since`` to the computing time; return now."""
        now = time.perf_counter()
        self.compute += now - since
        return now


class ReadAhead:
    """The reads of one task's ``steps`` on ``pool``: q ``ahead`` steps ahead (the first ``first``
    steps' at once, before any key), k, v of every key group at once, or, for a task of one group
    in pieces (W = 1), in key blocks (``keyblocks.py``; ``streamed``: kept in host memory).  A
    consumed read is dropped at once (its tensor would otherwise stay alive to the end of the task)."""

    def __init__(self, io: TaskIO, pool: Lane, steps: list[Step], dev: torch.device, ahead: int,
                 streamed: bool = False, first: int = 1):
        self.io, self.pool, self.steps, self.dev, self.ahead = io, pool, steps, dev, ahead
        self._q_reads: dict[int, Future[Staged]] = {}
        self._queued = 0  # q reads queued so far: those of steps 0 .. _queued - 1
        self._queue_through(max(ahead, first) - 1)
        groups = sorted({b for s in steps for b in s.keys})
        self.blocks: KeyBlocks | None = None
        if io.job.plan.groups == 1 and steps and steps[0].part is not None:  # the first piece starts on the first block
            self.blocks = KeyBlocks(io, pool, groups[0], steps[0].size, dev, streamed)
            groups = []
        self._kv_reads: dict[int, tuple[Future[Staged], Future[Staged]]] = {  # k and v on two threads
            g: (pool.submit(io.kv, "k", g, dev), pool.submit(io.kv, "v", g, dev)) for g in groups}
        self._kv: dict[int, tuple[torch.Tensor, torch.Tensor]] = {}

    def _queue_through(self, n: int) -> None:
        """Queue the q reads of every step up to ``n`` not queued yet."""
        while self._queued <= min(n, len(self.steps) - 1):
            m = self._queued
            self._q_reads[m] = self.pool.submit(self.io.q, self.steps[m].group, self.dev, self.steps[m].part)
            self._queued += 1

    def q(self, n: int, *, read_ahead: bool = True) -> torch.Tensor:
        """q of step ``n``: (1, hq, T, D) on the device; queues the reads through step n + ahead
        (``read_ahead`` False: the caller does, with :meth:`read_ahead`)."""
        q = use(self._q_reads.pop(n).result())[None].contiguous()
        if read_ahead:
            self.read_ahead(n)
        return q

    def read_ahead(self, n: int) -> None:
        """Queue the q reads of the steps after step ``n``, through step n + ahead."""
        self._queue_through(n + self.ahead)

    def keys(self, step: Step) -> list[tuple[torch.Tensor, torch.Tensor]] | KeyBlocks:
        """The keys of ``step``: k, v of each of its key groups, or the task's key blocks once the
        first is in."""
        if self.blocks is not None:
            self.blocks.wait(0)
            return self.blocks
        return [self.kv(b) for b in step.keys]

    def kv(self, b: int) -> tuple[torch.Tensor, torch.Tensor]:
        """k, v of key group ``b``: (1, hk, G, D) each on the device, resident for the task."""
        if b not in self._kv:
            k, v = (f.result() for f in self._kv_reads[b])
            self._kv[b] = (use(k)[None], use(v)[None])
        return self._kv[b]

    def cancel(self) -> None:
        """Leave no read running (a failed task)."""
        pending: list[Future[Any]] = [f for kv in self._kv_reads.values() for f in kv] + [*self._q_reads.values()]
        for f in pending:
            f.cancel()
        if self.blocks is not None:
            self.blocks.cancel()


class WriteBehind:
    """Results copied back to the host once their kernels are done, then written by
    ``write`` on ``pool``, at most ``depth`` writes in flight."""

    def __init__(self, write: Callable[[Step, torch.Tensor, torch.Tensor], None], pool: Lane,
                 timer: Timer, depth: int = 2):
        self.write, self.pool, self.timer, self.depth = write, pool, timer, depth
        self._writes: deque[Future[None]] = deque()

    def put(self, result: Result) -> None:
        """Copy ``result`` to the host (once its kernels are done) and queue its write."""
        t = time.perf_counter()
        out, lse = download(result.out, result.done), download(result.lse, result.done)
        t = self.timer.computed(t)
        self._writes.append(self.pool.submit(self.write, result.step, out, lse))
        while len(self._writes) > self.depth:
            self._writes.popleft().result()
        self.timer.waited(t)

    def drain(self) -> None:
        """Wait for every queued write."""
        t = time.perf_counter()
        for w in self._writes:
            w.result()
        self.timer.waited(t)

    def cancel(self) -> None:
        """Cancel the queued writes and wait for the running ones (a failed task: nothing of it
        may still write once the caller cleans up)."""
        for f in self._writes:
            f.cancel()
        for f in self._writes:
            if not f.cancelled():
                with contextlib.suppress(BaseException):
                    f.result()
