"""The fold of bounded partials: each producer's result into its row as it arrives.

In a bounded job (``bounded.py``) a quorum task does not store its per-slot
result (out (hq, L, D) float32, lse (hq, L)) as a partial: it folds it into
the row's running result under the row's lock (``WorkerRuntime.row_lock``),
so the partials never exist on disk and what the store holds beyond the
output is one *fold state* per open row:

- the high part of the running output lives in ``out`` itself (the job
  dtype, rounded to nearest);
- the low part, ``acc - hi`` in units of 2^-8 ulp(hi), is an int8 in the fold
  state (none for float32 jobs, whose ``out`` holds the float32 running value);
- the running float32 lse and a mask of the producers already folded.

hi + lo carries 16 significant bits for bfloat16 (19 for float16), so
folding |D| results in any order adds far less than the final rounding to
the output dtype.  A bfloat16 row's state is G hq (D + 4) bytes against its
output's G hq (2 D + 4): at most about half the output, the bound of issue 6.

Crash safety (every chunk write on a local store, zarr's and
``chunkio.write_chunk``'s, is atomic: temporary file, then rename).  One
fold of producer p into row a, under the row lock::

    if a journal chunk exists: the previous fold died; if the state still has the
        mask the journal saved, restore out from it; delete the journal
    if merge_done[a] or p is in the state's mask: nothing to do (idempotent)
    journal := the mask seen and the old out chunk (if any), then its head (the journal is valid)
    out := hi(new);  state := (lo, lse, mask + p)     <- the commit
    delete the journal (head first)
    if the mask is full: lse := state.lse, merge_done[a] := 1, delete the state

Without a journal, ``out``'s chunk exists exactly when the state does, so a
lost state (or a lost out chunk) is detected: the row is reset, the markers
of its producers are cleared and the job fails with a :class:`StoreError`
asking for a resume, which recomputes that row (the producers' other rows
skip them by their masks).  Folding in completion order makes bounded jobs
exact but not bitwise reproducible from run to run; ``partials="all"`` is.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch

from cqsa_dask.core.errors import StoreError
from cqsa_dask.core.plan import Plan
from cqsa_dask.execution.partials.bounded import LO_BYTES, journal_bytes, mask_bytes, state_bytes
from cqsa_dask.kernels.attention import merge
from cqsa_dask.store.layout import TORCH_DTYPES, Job, chunk_exists, delete_chunk, read_block, write_block, write_raw

__all__ = ["FoldState", "damaged_row", "finish_row", "fold", "join", "split"]

_MAGIC = 0x43515346  # "CQSF": a fold state chunk
_PRECISION = {"bfloat16": 8, "float16": 11}  # significand bits of hi
_MIN_EXP = {"bfloat16": -125, "float16": -13}  # frexp exponent of the smallest normal hi
_LO_BITS = 8  # lo counts units of 2^-8 ulp(hi)
_BLOCK = 1 << 18  # elements per block of the hi/lo codec: its scratch (1 MB each) stays in cache


# -- hi/lo codec ----------------------------------------------------------------
def split(acc: torch.Tensor, dtype: str) -> tuple[torch.Tensor, torch.Tensor | None]:
    """(hi in ``dtype``, lo int8) of a float32 ``acc`` (any shape); lo None for float32.

    lo = round((acc - hi) / unit), unit = 2^-8 ulp(hi) (:func:`_unit`), all in float32
    and exact: acc - hi is exact (hi is acc rounded), and dividing by a power of two is.
    Block by block (:data:`_BLOCK` elements) through two small scratch tensors: the fold
    runs on the host, where whole-tensor temporaries (16M elements and more) cost more in
    page faults and memory traffic than the arithmetic on them.
    """
    if dtype == "float32":
        return acc.to(torch.float32), None
    hi, lo = torch.empty(acc.shape, dtype=TORCH_DTYPES[dtype]), torch.empty(acc.shape, dtype=torch.int8)
    src, h, dst = acc.reshape(-1), hi.view(-1), lo.view(-1)
    x, unit = torch.empty(min(_BLOCK, src.numel())), torch.empty(min(_BLOCK, src.numel()))
    for s in range(0, src.numel(), _BLOCK):
        n = min(_BLOCK, src.numel() - s)
        a, xb, ub = src[s:s + n], x[:n], unit[:n]
        xb.copy_(h[s:s + n].copy_(a))  # hi: acc rounded to nearest
        _unit(xb, dtype, out=ub)
        dst[s:s + n].copy_(torch.sub(a, xb, out=xb).div_(ub).round_().clamp_(-127, 127))
    return hi, lo


def join(hi: torch.Tensor, lo: torch.Tensor | None, dtype: str) -> torch.Tensor:
    """The float32 value hi + lo * unit (inverse of :func:`split`, to 2^-17 relative for
    bfloat16).  Exact in float32: lo * unit is, and the sum spans at most p + 9 <= 20
    significant bits.  A new tensor also for float32 hi: the fold merges into it in place,
    and hi (the old out chunk) is what its journal saves.  Block by block, as :func:`split`."""
    if lo is None:
        return hi.to(torch.float32, copy=True)
    x = torch.empty(hi.shape)
    flat, high, low = x.view(-1), hi.reshape(-1), lo.reshape(-1)
    lof, unit = torch.empty(min(_BLOCK, flat.numel())), torch.empty(min(_BLOCK, flat.numel()))
    for s in range(0, flat.numel(), _BLOCK):
        n = min(_BLOCK, flat.numel() - s)
        xb = flat[s:s + n].copy_(high[s:s + n])
        xb.addcmul_(lof[:n].copy_(low[s:s + n]), _unit(xb, dtype, out=unit[:n]))
    return x


def _unit(x: torch.Tensor, dtype: str, *, out: torch.Tensor) -> torch.Tensor:
    """2^-8 ulp of each hi value (``x`` = hi as float32), float32: 2^(clamp(frexp(hi).exponent)
    - p - 8), zero and subnormal hi counted as the smallest normal.

    From the exponent bits of hi as float32 (bfloat16 and float16 values are float32
    values): masking the sign and significand leaves 2^E, hi's binade (0 for zero and
    float32 subnormals, Inf for Inf and NaN), clamped to [smallest normal hi, 2^127], then
    times 2^-(p + 7), exactly (the smallest, 2^-141, is a float32 subnormal).  Inf and NaN
    hi get a finite unit: their lo and hi + lo are Inf / NaN whatever it is.  Written
    into ``out`` (float32, x's shape), which is returned.
    """
    binade = torch.bitwise_and(x.view(torch.int32), 0x7F800000, out=out.view(torch.int32)).view(torch.float32)
    return binade.clamp_(2.0 ** (_MIN_EXP[dtype] - 1), 2.0**127).mul_(2.0 ** -(_PRECISION[dtype] + _LO_BITS - 1))


# -- fold state and journal (one uint8 chunk each per (row, batch, head block)) --
@dataclass
class FoldState:
    """Running result of one row: mask (m,) uint8, lo (hq, L, D) int8 or None, lse (hq, L) float32."""

    mask: np.ndarray
    lo: torch.Tensor | None
    lse: torch.Tensor


def _pack_state(plan: Plan, st: FoldState) -> np.ndarray:
    buf = np.zeros(state_bytes(plan), np.uint8)
    buf[:16] = np.array([_MAGIC, 1], np.int64).view(np.uint8)
    m = mask_bytes(plan)
    buf[16:16 + len(st.mask)] = st.mask
    pos = 16 + m
    if st.lo is not None:
        lo = _bytes(st.lo)
        buf[pos:pos + lo.size] = lo
        pos += lo.size
    lse = _bytes(st.lse)
    buf[pos:pos + lse.size] = lse
    return buf


def _unpack_state(plan: Plan, buf: np.ndarray, rows: int, producers: int) -> FoldState | None:
    if int(buf[:8].view(np.int64)[0]) != _MAGIC:
        return None
    hq, d = plan.q_heads_per_task, plan.head_dim
    pos = 16 + mask_bytes(plan)
    mask = buf[16:16 + producers].copy()
    lo = None
    if LO_BYTES[plan.dtype]:
        n = hq * rows * d
        lo = torch.from_numpy(buf[pos:pos + n].copy()).view(torch.int8).reshape(hq, rows, d)
        pos += n
    lse = torch.from_numpy(buf[pos:pos + hq * rows * 4].copy().view(np.float32)).reshape(hq, rows)
    return FoldState(mask, lo, lse)


# -- the fold -----------------------------------------------------------------------
class _Row:
    """Store access for one (row, batch, head block) of a bounded job."""

    def __init__(self, job: Job, group: int, batch: int, block: int):
        p = job.plan
        self.job, self.group, self.batch, self.block = job, group, batch, block
        hq = p.q_heads_per_task
        self.q_h = slice(block * hq, (block + 1) * hq)
        start, stop = p.group_bounds(group)
        self.rows, self.n = slice(start, stop), stop - start
        self.producers = sorted(p.producers(group))
        self.cell = (group, batch, block)
        self.out_chunk = (batch, block, group, 0)
        arrays = job.partials
        self.state_arr, self.journal_arr, self.journal_head = (
            arrays["fold_state"], arrays["fold_journal"], arrays["fold_journal_head"])

    def state(self) -> FoldState | None:
        if not chunk_exists(self.state_arr, (*self.cell, 0)):
            return None
        try:
            buf = np.asarray(self.state_arr[self.cell])
            st = _unpack_state(self.job.plan, buf, self.n, len(self.producers))
        except Exception:  # noqa: BLE001  (a truncated chunk fails to decode in many ways)
            st = None
        if st is None:
            raise self.damaged("fold state (unreadable)")
        return st

    def hi(self) -> torch.Tensor:
        return read_block(self.job.out, (self.batch, self.q_h, self.rows), self.job.plan.dtype)

    def out_exists(self) -> bool:
        return chunk_exists(self.job.out, self.out_chunk)

    def recover(self) -> None:
        """Undo a fold that died between its journal and its commit.

        The state is replaced only by the commit (an atomic chunk write), so
        the journal needs just the mask it saw and the out chunk it replaced.
        """
        head_idx = (*self.cell, 0)
        if not chunk_exists(self.journal_head, head_idx):
            return
        plan = self.job.plan
        had_state = bool(np.asarray(self.journal_head[self.cell])[0])
        now = self.state()
        if not had_state:
            same = now is None
        else:
            buf = np.asarray(self.journal_arr[self.cell])
            saved_mask = buf[:len(self.producers)]
            same = now is not None and bool(np.array_equal(saved_mask, now.mask))
        if same:  # not committed: put back the out chunk the journal saved
            if not had_state:
                delete_chunk(self.job.out, self.out_chunk)
            else:
                m = mask_bytes(plan)
                n = plan.q_heads_per_task * self.n * plan.head_dim * plan.itemsize
                raw = torch.from_numpy(buf[m:m + n].copy())
                hi = raw.view(TORCH_DTYPES[plan.dtype]).reshape(plan.q_heads_per_task, self.n, plan.head_dim)
                write_block(self.job.out, (self.batch, self.q_h, self.rows), hi)
        delete_chunk(self.journal_head, head_idx)
        delete_chunk(self.journal_arr, head_idx)

    def journal(self, st: FoldState | None, hi: torch.Tensor | None) -> int:
        """Save the mask seen and the out chunk a fold is about to replace; returns bytes written."""
        plan = self.job.plan
        n = 16
        if st is not None and hi is not None:
            buf = np.zeros(journal_bytes(plan), np.uint8)
            m = mask_bytes(plan)
            buf[:len(st.mask)] = st.mask
            flat = _bytes(hi)
            buf[m:m + flat.size] = flat
            write_raw(self.journal_arr, self.cell, buf)
            n += buf.size
        write_raw(self.journal_head, self.cell, np.array([int(st is not None), 1], np.int64))
        return n

    def end_journal(self) -> None:
        delete_chunk(self.journal_head, (*self.cell, 0))
        delete_chunk(self.journal_arr, (*self.cell, 0))

    def damaged(self, what: str) -> StoreError:
        """Reset the row, clear its producers' markers; the error to raise."""
        delete_chunk(self.job.out, self.out_chunk)
        delete_chunk(self.state_arr, (*self.cell, 0))
        for t, _ in self.producers:
            self.job.task_done[t, self.batch, self.block] = 0
        return StoreError(
            f"query group {self.group} (batch {self.batch}, head block {self.block}) lost its {what}; "
            "the row was reset and its producers' markers cleared: run `cqsa resume` to recompute it")


def _bytes(t: torch.Tensor) -> np.ndarray:
    """The raw bytes of a CPU tensor, flat uint8.

    Flattened first: torch counts a tensor whose last dimension has size 1 as
    contiguous whatever that dimension's stride, so ``contiguous()`` keeps such
    a view (the lse (hq, 1) of a one-token group, as a kernel returns it) and
    the byte view refuses its stride.  A flat view of a dense tensor is free; only
    a flat tensor of one element can still carry another stride, and is copied."""
    flat = t.reshape(-1)
    if flat.numel() and flat.stride(0) != 1:
        flat = torch.empty_like(flat, memory_format=torch.contiguous_format).copy_(flat)
    return flat.contiguous().view(torch.uint8).numpy()


def damaged_row(job: Job, group: int, batch: int, block: int) -> StoreError:
    """For a row whose producers are all done but whose mask is not full: reset it."""
    return _Row(job, group, batch, block).damaged("fold state (not every producer is in it)")


def finish_row(job: Job, group: int, batch: int, block: int) -> bool:
    """Write lse and the merge marker of a row whose mask is full; True when the row is done.

    Idempotent (call under the row's lock): a crash inside is finished by the next caller.
    """
    if job.merge_done[group, batch, block]:
        return True
    row = _Row(job, group, batch, block)
    row.recover()
    st = row.state()
    if st is None or not bool(st.mask.all()):
        return False
    write_block(job.lse, (batch, row.q_h, row.rows), st.lse)
    job.merge_done[group, batch, block] = 1
    delete_chunk(row.state_arr, (*row.cell, 0))
    return True


def fold(job: Job, group: int, batch: int, block: int, task: int,
         out: torch.Tensor, lse: torch.Tensor) -> int:
    """Fold task ``task``'s result for row ``group`` (out (hq, L, D) float32, lse (hq, L)).

    Call under the row's lock (``WorkerRuntime.row_lock(token, group)``).  Returns the bytes written.
    """
    plan = job.plan
    if job.merge_done[group, batch, block]:
        return 0
    row = _Row(job, group, batch, block)
    row.recover()
    index = [t for t, _ in row.producers].index(task)
    st = row.state()
    has_out = row.out_exists()
    if st is None and has_out:
        raise row.damaged("fold state")
    if st is not None and not has_out:
        raise row.damaged("running output (the out chunk)")
    if st is not None and st.mask[index]:
        finish_row(job, group, batch, block)
        return 0
    if st is None:
        acc = (out.float(), lse.float())
        mask = np.zeros(len(row.producers), np.uint8)
        hi_old = None
    else:
        hi_old = row.hi()
        acc = merge((join(hi_old, st.lo, plan.dtype), st.lse), (out, lse))
        mask = st.mask.copy()
    mask[index] = 1
    hi, lo = split(acc[0], plan.dtype)
    written = row.journal(st, hi_old)
    write_block(job.out, (batch, row.q_h, row.rows), hi)
    write_raw(row.state_arr, row.cell, _pack_state(plan, FoldState(mask, lo, acc[1])))  # the commit
    row.end_journal()
    written += hi.nbytes + state_bytes(plan)
    if bool(mask.all()) and finish_row(job, group, batch, block):
        written += acc[1].nbytes  # lse
    return written
