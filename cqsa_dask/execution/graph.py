"""Build the Dask graph of one job: quorum tasks, then merges.

::

    cqsa-quorum-<job>,i,b,j ──┐      (resources={device_mem: predicted bytes})
    cqsa-quorum-<job>,i',b,j ─┼──> cqsa-merge-<job>,a,b,j   (one per query group)
    ...                       ┘

A merge depends on exactly the quorum tasks that wrote partials for its
query group (``Plan.producers``); in a bounded job the producers fold their
results into the row themselves and the merge only checks (and, after a
crash, finishes) it.  With ``plan.query_groups`` only those rows' merges and
producers are in the graph.  Tasks already recorded as done in the
store are left out (resume); a merge whose producers are all done has no
dependencies.  Keys are tuples whose first element starts with a readable
prefix, so the dashboard groups them as ``cqsa-quorum`` and ``cqsa-merge``.
Two layers carry the annotations: resources, retries and the partials
policy's priority (``quorum_priority``) on quorum tasks, a higher priority on
merges so that finished groups are merged (and their partials can be
released) early.  Every task carries the job's :class:`RunOptions`.
"""

from __future__ import annotations

from typing import Any

import numpy as np
from dask.highlevelgraph import HighLevelGraph, MaterializedLayer

from cqsa_dask.core.plan import Plan
from cqsa_dask.execution.options import RunOptions
from cqsa_dask.execution.tasks import merge_task, quorum_task
from cqsa_dask.store.location import StoreLike, parse_store

__all__ = ["JobGraph", "build_graph", "merge_prefix", "quorum_prefix"]


def quorum_prefix(token: str) -> str:
    return f"cqsa-quorum-{token}"


def merge_prefix(token: str) -> str:
    return f"cqsa-merge-{token}"


class JobGraph:
    """The graph and its output keys (quorum keys, merge keys)."""

    def __init__(self, graph: HighLevelGraph, quorum_keys: list[Any], merge_keys: list[Any]):
        self.graph, self.quorum_keys, self.merge_keys = graph, quorum_keys, merge_keys

    @property
    def keys(self) -> list[Any]:
        return self.quorum_keys + self.merge_keys


def build_graph(
    store: StoreLike, token: str, plan: Plan, *, resource: str, retries: int,
    task_done: np.ndarray | None = None, merge_done: np.ndarray | None = None,
    options: RunOptions | None = None,
) -> JobGraph:
    """Graph for the tasks and merges of ``plan`` not yet marked done.

    Args:
        store: where the job is; every task carries its ``StoreLocation`` (picklable).
        task_done, merge_done: (W, B, J) arrays of 0/1 markers from the store.
        resource: worker resource name; each quorum task asks for
            ``plan.resource_bytes`` of it (its predicted peak; on CUDA raised by the allocator cap's share).
        options: how workers run the tasks (default: ``RunOptions.from_config()``).
    """
    options = options if options is not None else RunOptions.from_config()
    store = parse_store(store)
    qp, mp = quorum_prefix(token), merge_prefix(token)
    grid = (plan.groups, plan.batch, plan.head_blocks)
    tdone = task_done if task_done is not None else np.zeros(grid, np.uint8)
    mdone = merge_done if merge_done is not None else np.zeros(grid, np.uint8)
    quorums: dict[Any, Any] = {}
    merges: dict[Any, Any] = {}
    todo = tdone == 0
    if plan.query_groups:  # only the producers of the chosen rows
        chosen = np.zeros(plan.groups, bool)
        chosen[plan.task_ids] = True
        todo &= chosen[:, None, None]
    for i, b, j in zip(*np.nonzero(todo)):
        quorums[(qp, int(i), int(b), int(j))] = (quorum_task, store, token, int(i), int(b), int(j), options)
    producers = {a: sorted({t for t, _ in plan.producers(a)}) for a in plan.merge_groups}
    for a in plan.merge_groups:
        for b in range(plan.batch):
            for j in range(plan.head_blocks):
                if mdone[a, b, j]:
                    continue
                deps = [k for k in ((qp, t, b, j) for t in producers[a]) if k in quorums]
                merges[(mp, a, b, j)] = (merge_task, store, token, a, b, j, options, *deps)
    layers = {
        qp: MaterializedLayer(quorums, annotations={
            "resources": {resource: plan.resource_bytes}, "retries": retries,
            "priority": plan.policy.quorum_priority}),
        mp: MaterializedLayer(merges, annotations={"retries": retries, "priority": 10}),
    }
    hlg = HighLevelGraph(layers, {qp: set(), mp: {qp}})
    return JobGraph(hlg, list(quorums), list(merges))
