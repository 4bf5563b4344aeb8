"""Partials "all": every producer stores its result; the row's merge combines them.

::

    producer (task i, slot s) ──> partial_out[s, b, heads_j, a], partial_lse[...]
                                  (and the worker's host cache, so a merge on the
                                   same worker reads nothing back)
    merge a: merge_done[a]?  yes: a rerun; drop what is left of the partials, done
             no:  acc = merge over producers of partial (cache, else store, checked)
                  out, lse := acc;  merge_done[a] := 1;  drop the row's partials

Partials are float32 (out and lse), whatever the job's dtype: a producer's
result is rounded once, when the merged row is written, as a fused kernel's is;
a partial rounded to bfloat16 at its own magnitude, which can exceed the
row's (the producers' values cancel), would round it twice.  Stores written
before 2026-12-05 hold partial_out in the job dtype: a job resumed there
keeps writing and reading it so (its logical dtype says which).

The store holds |D| x the output (float32) at worst (every open row's
partials), and a merged row none.  The merge reads its producers in a fixed order, so "all"
is bitwise reproducible from run to run.

Damage: a producer without its marker, or whose chunks are missing (lost, or
deleted by an earlier merge of this row whose marker was then lost) or
unreadable, or (when the inputs were checked finite) non-finite, is damaged:
its marker is cleared so that a resume recomputes it, and the merge fails
with :class:`StoreError` naming every damaged producer of the row at once.
"""

from __future__ import annotations

import logging
from typing import TYPE_CHECKING, Any, ClassVar

from cqsa_dask.core.errors import StoreError
from cqsa_dask.execution.partials.base import Cell, Merged, PartialsPolicy, Producer

if TYPE_CHECKING:
    import torch
    import zarr

    from cqsa_dask.core.plan import Plan
    from cqsa_dask.execution.hostcache import HostCache
    from cqsa_dask.execution.runtime import WorkerRuntime

__all__ = ["AllPartials", "create_partial_arrays"]

log = logging.getLogger(__name__)

NAMES = ("partial_out", "partial_lse")


def create_partial_arrays(eng: zarr.Group, plan: Plan) -> None:
    """partial_out (|D|, B, Hq, N, D) and partial_lse (|D|, B, Hq, N), float32, one chunk per
    (slot, batch, head block, group), reading NaN where unwritten."""
    from cqsa_dask.store.layout import create_array

    b, hq, n, d = plan.batch, plan.heads_q, plan.seq_len, plan.head_dim
    g, ht, s = plan.group_size, plan.q_heads_per_task, plan.quorum_size
    create_array(eng, "partial_out", (s, b, hq, n, d), (1, 1, ht, g, d), "float32", nan_fill=True)
    create_array(eng, "partial_lse", (s, b, hq, n), (1, 1, ht, g), "float32", nan_fill=True)


def _key(cell: Cell, slot: int, group: int, what: str) -> tuple[Any, ...]:
    """Host cache key of one partial's ``what`` ("out" or "lse")."""
    return (cell.token, "partial", what, slot, cell.batch, cell.block, group)


def _chunks(cell: Cell, slot: int, group: int) -> list[tuple[zarr.Array, tuple[int, ...]]]:
    """The chunks of one partial: partial_out (1, 1, hq, G, D) and partial_lse (1, 1, hq, G)."""
    arrays, b, j = cell.job.partials, cell.batch, cell.block
    return [(arrays["partial_out"], (slot, b, j, group, 0)), (arrays["partial_lse"], (slot, b, j, group))]


class _Stored(Producer):
    """Writes each result as a partial, and keeps it in the host cache for the merge."""

    float32: ClassVar[bool] = True  # partials are float32 (module docstring)

    def __init__(self, cell: Cell, cache: HostCache):
        self.cell, self.cache = cell, cache

    def emit(self, slot: int, group: int, out: torch.Tensor, lse: torch.Tensor) -> int:
        from cqsa_dask.store.layout import TORCH_DTYPES, logical_dtype, write_block

        cell = self.cell
        if cell.job.merge_done[group, cell.batch, cell.block]:  # a rerun of a producer of a merged row
            return 0
        _, heads, rows = cell.block_of(group)
        arr = cell.job.partials["partial_out"]
        out = out.to(TORCH_DTYPES[logical_dtype(arr)])  # float32 (a job started by an earlier engine: its dtype)
        write_block(arr, (slot, cell.batch, heads, rows), out)
        write_block(cell.job.partials["partial_lse"], (slot, cell.batch, heads, rows), lse)
        self.cache.put(_key(cell, slot, group, "out"), out)
        self.cache.put(_key(cell, slot, group, "lse"), lse)
        return out.nbytes + lse.nbytes


class AllPartials(PartialsPolicy):
    """Keep every producer's partial until its row is merged (module docstring)."""

    name: ClassVar[str] = "all"

    def partial_bytes(self, plan: Plan) -> int:
        """Every producer's partial (float32) of every shared row: |D| x the output (in float32) at most."""
        tokens = plan.shared_rows[1]
        return plan.quorum_size * plan.partial_token_bytes * tokens

    def bytes_written(self, plan: Plan) -> int:
        """The partials (float32 out and lse) of every producer of a shared row, then out and lse."""
        out = plan.output_bytes * plan.computed_tokens // plan.seq_len
        return plan.partial_token_bytes * plan.shared_rows[3] + out

    def create_arrays(self, eng: zarr.Group, plan: Plan) -> None:
        create_partial_arrays(eng, plan)

    def open_arrays(self, eng: zarr.Group) -> dict[str, zarr.Array]:
        from cqsa_dask.store.layout import array

        return {n: array(eng, n) for n in NAMES}

    def producer(self, cell: Cell, task: int, groups: list[int], rt: WorkerRuntime) -> Producer:
        return _Stored(cell, rt.cache)

    def finish(self, cell: Cell, group: int, rt: WorkerRuntime, check_finite: bool) -> Merged | None:
        from cqsa_dask.kernels.attention import merge

        job = cell.job
        if job.merge_done[group, cell.batch, cell.block]:  # a rerun of a merge that died after its marker,
            self.release(cell, group)  # deleting the partials: finish that, merge nothing
            return None
        acc: tuple[torch.Tensor, torch.Tensor] | None = None
        nread = 0
        damaged: list[str] = []  # every damaged producer is found (and its marker cleared) in one attempt
        for task, slot in job.plan.producers(group):
            out, lse = rt.cache.pop(_key(cell, slot, group, "out")), rt.cache.pop(_key(cell, slot, group, "lse"))
            if out is None or lse is None or not job.task_done[task, cell.batch, cell.block]:
                try:
                    out, lse = _read_partial(cell, task, slot, group, check_finite)
                except StoreError as e:
                    damaged.append(str(e))
                    continue
                nread += out.nbytes + lse.nbytes
            if not damaged:
                with rt.turn("cpu"):  # partials are merged in host memory
                    acc = merge(acc, (out, lse))
        if damaged:
            raise StoreError("; ".join(damaged))
        assert acc is not None, f"group {group} has no producers"
        return Merged(acc[0], acc[1], nread)

    def release(self, cell: Cell, group: int) -> None:
        """Delete the row's partials (after its marker), so that a finished job holds none and a
        running one only those of its open rows.  A chunk left behind is garbage, not an error."""
        from cqsa_dask.store.layout import delete_chunks

        per_array: dict[str, tuple[zarr.Array, list[tuple[int, ...]]]] = {}
        for _, slot in cell.job.plan.producers(group):
            for arr, coords in _chunks(cell, slot, group):
                per_array.setdefault(arr.path, (arr, []))[1].append(coords)
        for arr, coords_list in per_array.values():  # one request per array on an object store
            try:
                delete_chunks(arr, coords_list)
            except OSError as e:
                log.warning("could not delete the merged partial chunks %s of %s: %s", coords_list, arr.path, e)


def _read_partial(cell: Cell, task: int, slot: int, group: int, finite_inputs: bool
                  ) -> tuple[torch.Tensor, torch.Tensor]:
    """Partial (out (hq, G, D), lse (hq, G)) of a producer, checked (module docstring: damage)."""
    from cqsa_dask.kernels.attention import all_finite
    from cqsa_dask.store.layout import chunk_exists, logical_dtype, read_block

    job, b, j = cell.job, cell.batch, cell.block
    where = f"quorum task {task} (batch {b}, head block {j}, slot {slot})"
    if not job.task_done[task, b, j]:
        raise StoreError(f"{where} has no completion marker; run `cqsa resume` to compute it")
    _, heads, rows = cell.block_of(group)
    try:
        if not all(chunk_exists(arr, c) for arr, c in _chunks(cell, slot, group)):
            ok, reason = False, "its chunk is missing (deleted when its row was merged, or lost)"
        else:
            arr = job.partials["partial_out"]
            out = read_block(arr, (slot, b, heads, rows), logical_dtype(arr))
            lse = read_block(job.partials["partial_lse"], (slot, b, heads, rows), "float32")
            ok = not finite_inputs or (all_finite(lse) and all_finite(out))
            reason = "missing or non-finite values"
    except Exception as e:  # noqa: BLE001  (a truncated or corrupt chunk fails to decode in many ways)
        ok, reason = False, f"{type(e).__name__}: {e}"
    if not ok:
        job.task_done[task, b, j] = 0
        raise StoreError(f"partial result of {where} is damaged ({reason}); its marker was cleared, "
                         "run `cqsa resume` to recompute it")
    return out, lse
