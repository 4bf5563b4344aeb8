"""The analysis arrays of a job store: results, partials and markers under ``STORE/analysis``.

::

    STORE/analysis/                   attrs: job token, analysis token, resolution
    ├── key_mass      (B, Hq, N)        float32  sum_i P[b, h, i, j]     chunks (1, hq_t, G)
    ├── entropy       (B, Hq, N)        float32  -sum_j P ln P (nats)    chunks (1, hq_t, G)
    ├── block_mass    (B, Hq, R, R)     float32  (with a resolution)     chunks (1, hq_t, R, R)
    ├── _entropy_part (|D|, B, Hq, N)   float32  slot s of the producer task (NaN = missing)
    ├── _mass_part    (|D|, B, Hq, N)   float32  key slot t of the producer task
    ├── _block_part   (W, B, Hq, R, R)  float32  per task (with a resolution)
    ├── task_done     (W, B, J) uint8   1 = the analysis task's partials are durable
    ├── reduce_done   (W, B, J) uint8   1 = key_mass and entropy of that group durable
    └── block_done    (B, J)    uint8   1 = block_mass of that head block durable

Invariants (the job's): every chunk has one writer; a marker is written only
after the data it vouches for; partials are deleted once their group is
reduced, so a finished analysis holds only its results.  The analysis writes
nothing outside ``analysis/``.
"""

from __future__ import annotations

import uuid
from functools import lru_cache

import zarr

from cqsa_dask.analysis.spec import Resolution
from cqsa_dask.core.plan import Plan
from cqsa_dask.store.layout import array, create_array, open_store

__all__ = ["ANALYSIS", "Analysis", "create_analysis", "open_analysis", "stored_analysis"]

ANALYSIS = "analysis"


def create_analysis(group: zarr.Group, plan: Plan, job_token: str, resolution: Resolution | None) -> zarr.Group:
    """Create (over any earlier one) the analysis group of ``plan``'s job; return it."""
    b, hq, n = plan.batch, plan.heads_q, plan.seq_len
    g, ht, s = plan.group_size, plan.q_heads_per_task, plan.quorum_size
    grid = (plan.groups, b, plan.head_blocks)
    ana = group.create_group(ANALYSIS, overwrite=True)
    for name in ("key_mass", "entropy"):
        create_array(ana, name, (b, hq, n), (1, ht, g), "float32")
    for name in ("_entropy_part", "_mass_part"):
        create_array(ana, name, (s, b, hq, n), (1, 1, ht, g), "float32", nan_fill=True)
    if resolution is not None:
        r = resolution.blocks
        create_array(ana, "block_mass", (b, hq, r, r), (1, ht, r, r), "float32")
        create_array(ana, "_block_part", (plan.groups, b, hq, r, r), (1, 1, ht, r, r), "float32", nan_fill=True)
    for name in ("task_done", "reduce_done"):
        create_array(ana, name, grid, (1, 1, 1), "uint8")
    create_array(ana, "block_done", (b, plan.head_blocks), (1, 1), "uint8")
    ana.update_attributes({"job_token": job_token, "token": f"{job_token}-analysis-{uuid.uuid4().hex[:6]}",
                      "resolution": resolution.blocks if resolution else None})
    return ana


def stored_analysis(group: zarr.Group, job_token: str, resolution: Resolution | None) -> zarr.Group | None:
    """The analysis group of this job at this resolution, when one was started (to resume)."""
    node = group.get(ANALYSIS)
    if not isinstance(node, zarr.Group):
        return None
    same = (node.attrs.get("job_token") == job_token
            and node.attrs.get("resolution") == (resolution.blocks if resolution else None))
    return node if same else None


class Analysis:
    """The analysis arrays of one store, opened once per worker process (:func:`open_analysis`)."""

    def __init__(self, store: str, token: str):
        group = open_store(store, mode="r+")
        ana = group[ANALYSIS]
        assert isinstance(ana, zarr.Group) and ana.attrs.get("token") == token, "analysis replaced while running"
        self.key_mass, self.entropy = array(ana, "key_mass"), array(ana, "entropy")
        self.entropy_part, self.mass_part = array(ana, "_entropy_part"), array(ana, "_mass_part")
        self.task_done, self.reduce_done = array(ana, "task_done"), array(ana, "reduce_done")
        self.block_done = array(ana, "block_done")
        blocks = "block_mass" in ana
        self.block_mass = array(ana, "block_mass") if blocks else None
        self.block_part = array(ana, "_block_part") if blocks else None


@lru_cache(maxsize=16)
def open_analysis(store: str, token: str) -> Analysis:
    """The :class:`Analysis` of ``store`` (cached per process and analysis token)."""
    return Analysis(store, token)
