"""k and v of a one-group task (W = 1), read in key blocks: resident on the device, or streamed.

At W = 1 a task's only key group is the whole sequence: N tokens of its hk
kv heads.  Its k and v are read in blocks of the row's piece size P
(``Step.size``), in token order, on the IO pool, so that the first query
piece's kernels start once the first block is in, not once all of k and v
(0.5 GB a head at N = 1M, 2 GB at 4M) are (an input whose store decodes only whole
chunks, compressed or remote, of more tokens than a block is read once whole and cut)::

    resident  (Plan.stream_keys False)  each block is copied, as it lands, into its tokens of one
              (1, hk, N, D) device tensor per input; a piece's kernels wait (on the GPU) only
              for the blocks they read, and once the first piece is done a piece attends to
              all the keys in one call
    streamed  (Plan.stream_keys True)   the blocks stay in host memory (pinned on CUDA) for the
              task's life; every piece copies each block it attends to onto the device on the
              upload stream, the next block copying while one block's kernels run, at most two
              on the device (the planner's memory model counts 4 P hk D e for k and v)

Block j holds tokens [j P, min(N, (j + 1) P)), the tokens of query piece j,
so a causal piece j attends to blocks 0..j-1 unmasked and to block j under
the triangular mask (``Step.key_blocks``).  A piece's partial results are
merged in float32 (``kernels.attention.merge``), exactly as a row's
producers are.

Host waits (for a block's read, or, streamed, for the kernels two blocks
back) happen on the task's thread, never on the device's compute thread
(``devicethread.py``).  On the CPU the device is host memory: resident
blocks are copied into one host tensor, streamed ones used where they are.
"""

from __future__ import annotations

from collections import deque
from concurrent.futures import Future
from typing import TYPE_CHECKING, Any

import torch

from cqsa_dask.kernels.transfer import Staged, done_event, upload, upload_buffer, upload_into, use
from cqsa_dask.store.layout import TORCH_DTYPES

if TYPE_CHECKING:
    from cqsa_dask.execution.iopool import Lane
    from cqsa_dask.execution.taskio import TaskIO

__all__ = ["KeyBlocks"]

_NAMES = ("k", "v")


class KeyBlocks:
    """k, v (1, hk, N, D) of key ``group`` of a task, read in blocks of ``size`` tokens on ``pool``
    (see the module docstring); ``streamed``: kept in host memory and copied per use."""

    def __init__(self, io: TaskIO, pool: Lane, group: int, size: int, dev: torch.device,
                 streamed: bool):
        plan = io.job.plan
        lo, hi = plan.group_bounds(group)
        self.io, self.group, self.size, self.dev, self.streamed = io, group, size, dev, streamed
        self.bounds = [(k0, min(hi - lo, k0 + size)) for k0 in range(0, hi - lo, size)]
        self._whole: dict[str, torch.Tensor] = {}
        if not streamed:
            shape = (1, io.kv_h.stop - io.kv_h.start, hi - lo, plan.head_dim)
            self._whole = {n: upload_buffer(shape, TORCH_DTYPES[plan.dtype], dev) for n in _NAMES}
        # a store that reads only whole chunks (compressed, remote) is read once per input, then cut
        self._cut = {n: not io.block_reads(n, size) for n in _NAMES}
        self._reads: list[dict[str, Future[Any]]] = [{} for _ in self.bounds]
        once = {n: pool.submit(self._read, n, None) for n in _NAMES if self._cut[n]}
        for j in range(len(self.bounds)):  # k and v of a block together: a piece needs both
            for n in _NAMES:
                self._reads[j][n] = once.get(n) or pool.submit(self._read, n, j)
        self._ready: set[tuple[str, int]] = set()  # resident blocks the task's stream waits for already
        self._in_use: deque[Any] = deque()  # streamed: events after the kernels of the blocks handed out
        self._handed = False

    def __len__(self) -> int:
        return len(self.bounds)

    def _read(self, name: str, j: int | None) -> Any:
        """On an IO thread: block ``j`` of ``name`` read (None: every block at once); resident:
        copied into its tokens (the copy's event), streamed: the host tensor (hk, T, D)."""
        k0, k1 = self.bounds[j] if j is not None else (0, self.bounds[-1][1])
        x = self.io.key_block(name, self.group, slice(k0, k1), self.dev, host=self.streamed)
        if self.streamed:
            return x
        return upload_into(self._whole[name][0, :, k0:k1], x)

    def _host(self, name: str, j: int) -> torch.Tensor:
        """Streamed: block ``j`` of ``name`` in host memory, (hk, T, D)."""
        x = self._reads[j][name].result()
        if not self._cut[name]:
            return x
        k0, k1 = self.bounds[j]
        return x[:, k0:k1]

    def wait(self, j: int) -> None:
        """Block until block ``j`` is read (the task's turn is taken once its first inputs are in)."""
        for f in self._reads[j].values():
            f.result()

    def device(self, j: int) -> tuple[torch.Tensor, torch.Tensor]:
        """k, v of block ``j``: (1, hk, T, D) each, usable on the calling thread's stream.

        Streamed: the kernels queued on that stream since the last call are taken to read the
        last block handed out; before a third block is copied the first one's kernels are
        waited for, so at most two blocks are on the device."""
        if not self.streamed:
            k0, k1 = self.bounds[j]
            k, v = (self._resident(n, j)[:, :, k0:k1] for n in _NAMES)
            return k, v
        if self._handed:
            self._in_use.append(done_event(self.dev))
        while len(self._in_use) >= 2:
            ev = self._in_use.popleft()
            if ev is not None:
                ev.synchronize()
        self._handed = True
        k, v = (use(upload(self._host(n, j), self.dev))[None] for n in _NAMES)
        return k, v

    def whole(self) -> tuple[torch.Tensor, torch.Tensor]:
        """Resident k, v (1, hk, N, D), every block in."""
        assert not self.streamed
        for j in range(len(self.bounds)):
            for n in _NAMES:
                self._resident(n, j)
        return self._whole["k"], self._whole["v"]

    def _resident(self, name: str, j: int) -> torch.Tensor:
        """The resident tensor of ``name``, the calling stream made to wait for block ``j``'s copy."""
        if (name, j) not in self._ready:
            use(Staged(self._whole[name], self._reads[j][name].result()))
            self._ready.add((name, j))
        return self._whole[name]

    def cancel(self) -> None:
        """Leave no read running that has not started (a failed task)."""
        for reads in self._reads:
            for f in reads.values():
                f.cancel()  # a future shared by every block (one read of a whole input): once is enough
