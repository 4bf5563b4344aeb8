"""The Dask graph of an analysis: analysis tasks, then reductions per group, then block maps.

::

    cqsa-quorum-<token>,i,b,j ──┐   (resources={device_mem: analysis task bytes})
    cqsa-quorum-<token>,i',b,j ─┼──> cqsa-merge-<token>,g,b,j   (row g's producers and column g's)
    ...                         ┴──> cqsa-blocks-<token>,b,j    (every task of (b, j); with a resolution)

Keys reuse the job's prefixes with the analysis token (``<job token>-analysis-<id>``),
so the scheduler's /cqsa page shows the analysis as a job of its own: the
same grid of quorum tasks and group reductions.  Tasks marked done in the
store are left out (resume).  A reduction depends on the tasks i = g - D[t]
for every slot t (a superset of column g's producers, found in O(|D|)) and
on row g's producers.
"""

from __future__ import annotations

from typing import Any

import numpy as np
from dask.highlevelgraph import HighLevelGraph, MaterializedLayer

from cqsa_dask.analysis.tasks import analysis_task, block_task, reduce_task
from cqsa_dask.core.plan import Plan
from cqsa_dask.execution.retry import with_attempts

__all__ = ["AnalysisGraph", "build_analysis_graph"]


class AnalysisGraph:
    """The graph and its output keys."""

    def __init__(self, graph: HighLevelGraph, task_keys: list[Any], reduce_keys: list[Any], block_keys: list[Any]):
        self.graph, self.task_keys, self.reduce_keys, self.block_keys = graph, task_keys, reduce_keys, block_keys

    @property
    def keys(self) -> list[Any]:
        return self.task_keys + self.reduce_keys + self.block_keys


def build_analysis_graph(store: str, job_token: str, token: str, plan: Plan, *, resolution: int | None,
                         resource: str, task_bytes: int, retries: int, task_done: np.ndarray,
                         reduce_done: np.ndarray, block_done: np.ndarray, options: dict[str, Any]) -> AnalysisGraph:
    """Graph of the analysis tasks, reductions and block maps not yet marked done ((W, B, J), (B, J) markers);
    ``retries``: attempts after a transient failure (``execution/retry.py``)."""
    tp, rp, bp = f"cqsa-quorum-{token}", f"cqsa-merge-{token}", f"cqsa-blocks-{token}"
    tasks: dict[Any, Any] = {}
    for i, b, j in zip(*np.nonzero(task_done == 0)):
        tasks[(tp, int(i), int(b), int(j))] = (with_attempts, retries, analysis_task, store, job_token, token, int(i), int(b), int(j),
                                               resolution, options)
    base, w = plan.quorums.base, plan.groups
    reduces: dict[Any, Any] = {}
    for g in range(plan.nonempty_groups):
        near = sorted({(g - d) % w for d in base} | {t for t, _ in plan.producers(g)})
        for b in range(plan.batch):
            for j in range(plan.head_blocks):
                if not reduce_done[g, b, j]:
                    deps = [k for k in ((tp, t, b, j) for t in near) if k in tasks]
                    reduces[(rp, g, b, j)] = (with_attempts, retries, reduce_task, store, job_token, token, g, b, j, *deps)
    blocks: dict[Any, Any] = {}
    if resolution is not None:
        for b in range(plan.batch):
            for j in range(plan.head_blocks):
                if not block_done[b, j]:
                    deps = [k for k in ((tp, t, b, j) for t in range(w)) if k in tasks]
                    blocks[(bp, b, j)] = (with_attempts, retries, block_task, store, job_token, token, b, j, *deps)
    layers = {
        # the tasks try again themselves after a transient failure only (execution/retry.py): Dask, never
        tp: MaterializedLayer(tasks, annotations={"resources": {resource: task_bytes}, "retries": 0}),
        rp: MaterializedLayer(reduces, annotations={"retries": 0, "priority": 10}),
        bp: MaterializedLayer(blocks, annotations={"retries": 0, "priority": 5}),
    }
    hlg = HighLevelGraph(layers, {tp: set(), rp: {tp}, bp: {tp}})
    return AnalysisGraph(hlg, list(tasks), list(reduces), list(blocks))
