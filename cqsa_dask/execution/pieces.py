"""A quorum task's steps: its slots, a row it computes alone cut into query pieces.

::

    work   [(slot, a, [b1, b2, ...]), ...]                  (Plan.work: one entry per slot)
    steps  [Step(slot, a, keys, part=0:P), Step(.., P:2P), ...]   a direct row of more than
                                                             ``query_piece`` tokens: in pieces
           [Step(slot, a, keys, part=None), ...]             a shared row, or a short one: whole
    together  [[0, 1], [2], [3], ...]                         the steps computed at once: one by one,
                                                             or (``cqsa.first-pieces`` 2) the first
                                                             two pieces of a non-causal W = 1 row

A direct row (``Plan.direct``: the task is its only producer, always so at
W = 1) is the task's final result, so it can be computed, copied back and
written piece by piece: the next piece's q is read and the previous piece's
result written while a piece's kernels run, and only the first piece's read
and the last piece's write are outside the kernels.  The keys stay whole
(every piece attends to all of them); on the causal diagonal a piece
[r0, r1) attends to keys [0, r0) without a mask and to [r0, r1) with the
triangular one, and skips the keys after r1.

``RowPieces`` puts the pieces of one row together in the store: out straight
into its chunk's file in token runs where the store allows it
(``stream_block``), else into a host buffer written whole; lse in a host
buffer (4 bytes a token); the row's marker only after both are in.
"""

from __future__ import annotations

import threading
from dataclasses import dataclass

import torch

from cqsa_dask.core.plan import Plan
from cqsa_dask.execution.partials import Cell
from cqsa_dask.store.layout import TORCH_DTYPES, stored, stream_block, write_block

__all__ = ["RowPieces", "Step", "steps", "together"]


@dataclass(frozen=True)
class Step:
    """One kernel step of a task: query group ``group`` of ``slot`` against key groups ``keys``;
    ``part``: the piece's tokens relative to the group's first (None: the whole row), ``size``
    the row's piece size (every piece but the last has it); ``first``/``last``: whether it starts
    / ends its row."""

    slot: int
    group: int
    keys: tuple[int, ...]
    part: slice | None = None
    size: int = 0
    first: bool = True
    last: bool = True

    def key_blocks(self) -> list[tuple[int, int, bool]]:
        """The causal diagonal of a piece [r0, r1), as (k0, k1, masked) blocks of keys relative to
        the group's first: the earlier pieces' tokens whole, one block per piece, then [r0, r1)
        under the triangular mask.  Blocks the size of a piece keep the kernel's shapes to at most
        four a row, each built once (cuDNN builds a plan per shape: about 0.08 s each on an H200)."""
        assert self.part is not None
        r0, r1 = self.part.start, self.part.stop
        return [(k0, k0 + self.size, False) for k0 in range(0, r0, self.size)] + [(r0, r1, True)]


def steps(plan: Plan, work: list[tuple[int, int, list[int]]], query_piece: int) -> list[Step]:
    """The steps of a task's ``work``: a direct row of more than ``query_piece`` tokens (> 0) in
    pieces of equal size (the last one shorter), every other row whole."""
    out: list[Step] = []
    for slot, a, bs in work:
        lo, hi = plan.group_bounds(a)
        n = hi - lo
        if query_piece <= 0 or n <= query_piece or not plan.direct(a):
            out.append(Step(slot, a, tuple(bs)))
            continue
        count = -(-n // query_piece)
        size = -(-n // count)
        starts = list(range(0, n, size))
        for i, r0 in enumerate(starts):
            out.append(Step(slot, a, tuple(bs), slice(r0, min(n, r0 + size)), size, i == 0, i == len(starts) - 1))
    return out


def together(plan: Plan, steps: list[Step], first_pieces: int) -> list[list[int]]:
    """The order a task computes its ``steps`` in, as lists of step indices computed at once: one
    step each, except, with ``first_pieces`` 2, the first two pieces of a non-causal W = 1 row
    whose k and v are resident, which attend each key block together as it lands.

    The first piece alone outruns the blocks' reads (a 131,072 x 131,072 kernel takes about as
    long as reading its 64 MB block at H = 1); two pieces give the reads twice the kernels to
    hide under.  A causal piece reads one block more than the piece before it and a streamed
    block is copied per piece: those keep one step at a time."""
    units = [[n] for n in range(len(steps))]
    if (first_pieces == 2 and plan.groups == 1 and not plan.causal and not plan.stream_keys
            and len(steps) >= 2 and steps[0].part is not None and steps[0].first and not steps[0].last
            and (steps[1].slot, steps[1].group) == (steps[0].slot, steps[0].group)):
        units[:2] = [[0, 1]]
    return units


class RowPieces:
    """The pieces of one direct row ``group`` of ``cell``, put together in the store.

    ``put`` (from any thread, each piece once) writes a piece's out (hq, T, D) and keeps its lse
    (hq, T); the ``put`` that completes the row writes lse, publishes out and sets the row's
    merge marker, in that order, and returns True.  ``abort`` drops what a failed task wrote.
    """

    def __init__(self, cell: Cell, group: int):
        self.cell, self.group = cell, group
        plan = cell.job.plan
        self.index = cell.block_of(group)
        lo, hi = plan.group_bounds(group)
        heads = cell.q_heads.stop - cell.q_heads.start
        self.tokens, self.dtype = hi - lo, TORCH_DTYPES[plan.dtype]
        self.lse = torch.empty((heads, self.tokens), dtype=torch.float32)
        self.stream = stream_block(cell.job.out, self.index)
        self.out = None if self.stream is not None else torch.empty((heads, self.tokens, plan.head_dim),
                                                                     dtype=self.dtype)
        self._left = self.tokens
        self._lock = threading.Lock()

    def put(self, part: slice, out: torch.Tensor, lse: torch.Tensor) -> bool:
        """Write piece ``part`` (tokens relative to the row's first): out (hq, T, D), lse (hq, T)
        float32; True when it completed (and published) the row."""
        out = out.to(self.dtype)
        if self.stream is not None:
            self.stream.put(part, stored(out))
        else:
            assert self.out is not None
            self.out[:, part] = out
        self.lse[:, part] = lse
        with self._lock:
            self._left -= part.stop - part.start
            if self._left:
                return False
        job = self.cell.job
        write_block(job.lse, self.index, self.lse)
        if self.stream is not None:
            self.stream.commit()
        elif self.out is not None:
            write_block(job.out, self.index, self.out)
        job.merge_done[self.group, self.cell.batch, self.cell.block] = 1
        return True

    def abort(self) -> None:
        """Remove a half-written chunk (the task failed): the store is as before the row."""
        if self.stream is not None:
            self.stream.abort()
