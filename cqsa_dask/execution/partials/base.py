"""The partials policy: what a job keeps between a row's producers and its merge.

A query row (group a) that several quorum tasks produce needs their results
combined.  One object per policy decides everything that depends on how::

    store     create_arrays / open_arrays: its arrays under ``_cqsa``
    planner   bytes_written, partial_bytes, folds: pure arithmetic on a Plan
    graph     quorum_priority: the priority annotation of the quorum tasks
    producer  producer(...).emit(slot, a, out, lse): one result for row a
    merge     finish(cell, a): (out, lse) left to write, or None (row written);
              release(cell, a): after the row's marker, drop what it needs no more

    quorum task i ──emit──> the policy's arrays ──finish──> merge a ──> out, lse
                                                              merge_done[a] = 1
                                                            ──release──> (cleanup)

A row with a single producer never reaches a policy: that producer writes
out, lse and the row's marker itself (``Plan.direct``).  Policies hold no
state (one instance each, ``policy_for``); what runs on a worker comes in as
arguments (the job, its :class:`Cell`, the worker runtime).

Import pure: the planner (``core/plan.py``, which ``cqsa plan`` loads without
torch) reads the byte figures, so a policy module imports torch and zarr
only inside the methods that run on workers.
"""

from __future__ import annotations

from abc import ABC, abstractmethod
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, ClassVar

if TYPE_CHECKING:
    import torch
    import zarr

    from cqsa_dask.core.plan import Plan
    from cqsa_dask.execution.runtime import WorkerRuntime
    from cqsa_dask.store.layout import Job

__all__ = ["Cell", "Merged", "PartialsPolicy", "Producer"]


@dataclass(frozen=True)
class Cell:
    """One (batch element, head block) of a job: the part of a row a task writes.

    ``token`` names the job (cache keys, lock names)."""

    job: Job
    token: str
    batch: int
    block: int

    @property
    def q_heads(self) -> slice:
        """The block's query heads: hq = ``plan.q_heads_per_task`` of them."""
        hq = self.job.plan.q_heads_per_task
        return slice(self.block * hq, (self.block + 1) * hq)

    @property
    def kv_heads(self) -> slice:
        """The block's kv heads: ``plan.heads_per_task`` of them."""
        hk = self.job.plan.heads_per_task
        return slice(self.block * hk, (self.block + 1) * hk)

    def rows(self, group: int) -> slice:
        """Tokens of query ``group`` (G of them, fewer for the last groups)."""
        return slice(*self.job.plan.group_bounds(group))

    def block_of(self, group: int) -> tuple[int, slice, slice]:
        """Index (b, heads, tokens) of the row ``group`` in out (B, Hq, N, D) or lse (B, Hq, N)."""
        return self.batch, self.q_heads, self.rows(group)


@dataclass(frozen=True)
class Merged:
    """A row's merged result, for the merge to write: out (hq, G, D) float32, lse (hq, G)
    float32, and the bytes read from the store to make it."""

    out: torch.Tensor
    lse: torch.Tensor
    bytes_read: int


class Producer(ABC):
    """What one quorum task does with its results for shared rows.

    Made in the task's own thread (a distributed lock needs its worker
    context); ``emit`` runs on the task's IO threads, concurrently.
    """

    #: emit gets the float32 accumulator (True) or the result in the job's dtype (False)
    float32: ClassVar[bool] = False

    @abstractmethod
    def emit(self, slot: int, group: int, out: torch.Tensor, lse: torch.Tensor) -> int:
        """Hand over slot ``slot``'s result for row ``group``: out (hq, G, D), lse (hq, G)
        float32.  Returns the bytes written to the store."""


class PartialsPolicy(ABC):
    """One way of combining the producers' results of shared rows (module docstring)."""

    name: ClassVar[str]

    # -- the planner (pure) ------------------------------------------------------------
    def folds(self, plan: Plan) -> int:
        """Fold steps the job runs (0 for a policy that does not fold)."""
        return 0

    @abstractmethod
    def partial_bytes(self, plan: Plan) -> int:
        """Planned peak bytes the policy keeps on disk beyond out and lse."""

    @abstractmethod
    def bytes_written(self, plan: Plan) -> int:
        """Bytes the job's tasks write to the store, out and lse included."""

    # -- the store ---------------------------------------------------------------------
    @abstractmethod
    def create_arrays(self, eng: zarr.Group, plan: Plan) -> None:
        """Create the policy's arrays in the engine group ``eng`` (a new job)."""

    @abstractmethod
    def open_arrays(self, eng: zarr.Group) -> dict[str, zarr.Array]:
        """The arrays tasks use, by name (``Job.partials``)."""

    # -- the graph ---------------------------------------------------------------------
    #: priority annotation of the quorum tasks: a number, or a function of the task's key
    quorum_priority: ClassVar[Any] = 0

    # -- the tasks ---------------------------------------------------------------------
    @abstractmethod
    def producer(self, cell: Cell, task: int, groups: list[int], rt: WorkerRuntime) -> Producer:
        """The producer of quorum task ``task`` in ``cell`` for its shared rows ``groups``."""

    @abstractmethod
    def finish(self, cell: Cell, group: int, rt: WorkerRuntime, check_finite: bool) -> Merged | None:
        """The merge of shared row ``group``: its result left to write, or None when the
        row is written already (its marker then set).  ``check_finite``: the inputs were
        checked, so a non-finite partial is damage.  Raises StoreError for a damaged row."""

    def release(self, cell: Cell, group: int) -> None:
        """After row ``group``'s marker: delete what it no longer needs (best effort)."""
