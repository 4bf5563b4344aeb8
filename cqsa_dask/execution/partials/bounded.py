"""Partials "bounded": each producer folds its result into the row as it arrives.

No partial is stored: a quorum task folds its float32 result for a shared
row into the row's running result under the row's lock (``fold.py``: the
hi/lo codec, the fold state, the journal and its crash safety), so what the
store holds beyond the output is one fold state per open row.  The last
fold of a row writes its lse and marker; the row's merge only checks the
row (and finishes one whose last fold died after its commit).

::

    producer (task i) ──fold under lock(row a), at most tasks_in_flight at once per worker──>
        out[a] (hi), fold_state[a] (lo, lse, mask); journal while it runs
    merge a ──under lock(row a): finish_row (mask full: lse, merge_done[a]) or reset the row

Quorum tasks run in index order (``quorum_priority``), so rows fill up, and
their fold states go away, early.

Sizes (bytes; hq query heads per task, G tokens per group, |D| producers):

    mask      |D| rounded up to 8
    state     16 (header) + mask + hq G (D lo_bytes + 4)    lo_bytes: 1 for float16 and
                                                            bfloat16, 0 for float32
    journal   mask + hq G D e (the out chunk a fold replaces)

Import pure (``base.py``): the fold machinery is imported where it runs.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any, ClassVar

from cqsa_dask.execution.partials.all import create_partial_arrays
from cqsa_dask.execution.partials.base import Cell, Merged, PartialsPolicy, Producer

if TYPE_CHECKING:
    import torch
    import zarr

    from cqsa_dask.core.plan import Plan
    from cqsa_dask.execution.runtime import WorkerRuntime

__all__ = ["LO_BYTES", "BoundedPartials", "journal_bytes", "mask_bytes", "state_bytes"]

#: Bytes of the fold state per element of ``out`` (the int8 low part) by dtype.
LO_BYTES: dict[str, int] = {"float32": 0, "float16": 1, "bfloat16": 1}
NAMES = ("fold_state", "fold_journal", "fold_journal_head")


def mask_bytes(plan: Plan) -> int:
    """Bytes of a row's producer mask in fold states and journals: |D| rounded up to 8."""
    return -(-plan.quorum_size // 8) * 8


def state_bytes(plan: Plan) -> int:
    """Bytes of one fold state chunk: header, producer mask, lo (hq, G, D) int8 (none for
    float32), lse (hq, G) float32."""
    hq, g, d = plan.q_heads_per_task, plan.group_size, plan.head_dim
    return 16 + mask_bytes(plan) + hq * g * (d * LO_BYTES[plan.dtype] + 4)


def journal_bytes(plan: Plan) -> int:
    """Bytes of one fold journal chunk: the producer mask seen and the out chunk (hq, G, D) replaced."""
    return mask_bytes(plan) + plan.q_heads_per_task * plan.group_size * plan.head_dim * plan.itemsize


def _index_order(key: Any) -> int:
    """Quorum tasks by index: the lower first (key = (prefix, task, batch, block))."""
    return -int(key[1])


class _Folding(Producer):
    """Folds each result into its row (``fold.fold``) under the row's lock, in one of the
    worker's fold slots."""

    float32: ClassVar[bool] = True  # the fold adds the float32 accumulator

    def __init__(self, cell: Cell, task: int, groups: list[int], rt: WorkerRuntime):
        self.cell, self.task = cell, task
        self.slots = rt.fold_slots(cell.job.plan.tasks_in_flight)
        # created here, in the task's thread: a distributed lock needs its worker context
        self.locks = {a: rt.row_lock(cell.token, a) for a in groups}

    def emit(self, slot: int, group: int, out: torch.Tensor, lse: torch.Tensor) -> int:
        from cqsa_dask.execution.partials.fold import fold

        c = self.cell
        with self.slots, self.locks[group]:
            return fold(c.job, group, c.batch, c.block, self.task, out, lse)


class BoundedPartials(PartialsPolicy):
    """Fold every result into its row on arrival (module docstring)."""

    name: ClassVar[str] = "bounded"
    quorum_priority: ClassVar[Any] = staticmethod(_index_order)  # a plain function of the key

    def folds(self, plan: Plan) -> int:
        """One per (producer, shared row, batch, head block); an upper bound for causal plans."""
        return plan.shared_rows[2] * plan.batch * plan.head_blocks

    def partial_bytes(self, plan: Plan) -> int:
        """A fold state per shared row plus, for each of the ``tasks_in_flight`` folds a
        worker runs at once, its journal (the mask and the replaced out chunk) and the new
        state being written (a temporary file, renamed over the old one).  Per worker: add
        that last term once per further worker.  Rows with a single producer need nothing."""
        rows = plan.shared_rows[0] * plan.batch * plan.head_blocks
        in_flight = journal_bytes(plan) + 16 + state_bytes(plan) if rows else 0
        return rows * state_bytes(plan) + plan.tasks_in_flight * in_flight

    def bytes_written(self, plan: Plan) -> int:
        """A row with one producer writes out and lse once; each fold into a shared row writes
        the running out chunk (hq, G, D), the fold state and a 16-byte journal head, every fold
        after the row's first also its journal (the out chunk replaced), the last one lse
        (hq, G) float32: about 2.5 x the partials of "all" for bfloat16.  An upper bound for
        causal plans."""
        rows, tokens, folds, fold_tokens = plan.shared_rows
        hq, row = plan.q_heads_per_task, plan.head_dim * plan.itemsize
        shared = (hq * (row * fold_tokens + 4 * tokens) + folds * (16 + state_bytes(plan))
                  + (folds - rows) * journal_bytes(plan))
        return (shared + hq * (plan.computed_tokens - tokens) * (row + 4)) * plan.batch * plan.head_blocks

    def create_arrays(self, eng: zarr.Group, plan: Plan) -> None:
        """The fold arrays (one chunk per row, batch element and head block), after the partial
        arrays, which stay in the store format though nothing writes them."""
        from cqsa_dask.store.layout import create_array

        create_partial_arrays(eng, plan)
        grid = (plan.groups, plan.batch, plan.head_blocks)
        sb, jb = state_bytes(plan), journal_bytes(plan)
        create_array(eng, "fold_state", (*grid, sb), (1, 1, 1, sb), "uint8")
        create_array(eng, "fold_journal", (*grid, jb), (1, 1, 1, jb), "uint8")
        create_array(eng, "fold_journal_head", (*grid, 2), (1, 1, 1, 2), "int64")

    def open_arrays(self, eng: zarr.Group) -> dict[str, zarr.Array]:
        from cqsa_dask.store.layout import array

        return {n: array(eng, n) for n in NAMES}

    def producer(self, cell: Cell, task: int, groups: list[int], rt: WorkerRuntime) -> Producer:
        return _Folding(cell, task, groups, rt)

    def finish(self, cell: Cell, group: int, rt: WorkerRuntime, check_finite: bool) -> Merged | None:
        """The producers folded the row: finish a row whose last fold died after its commit,
        or reset one whose mask is not full (``fold.damaged_row``)."""
        from cqsa_dask.execution.partials.fold import damaged_row, finish_row

        with rt.row_lock(cell.token, group):
            if not finish_row(cell.job, group, cell.batch, cell.block):
                raise damaged_row(cell.job, group, cell.batch, cell.block)
        return None
