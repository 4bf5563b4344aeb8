"""cqsa-dask: exact attention over sequences longer than device memory.

Cyclic quorum sets split full attention into independent tasks that cover
every pair of token groups exactly once; Dask schedules them under a memory
budget (a worker resource) and Zarr holds inputs, partials and outputs.

The packages follow the data path (docs/design.md)::

    core/       pure: quorums, planner, errors, dtypes, units  (no torch, no dask)
    store/      the job's Zarr store: location, layout, chunk IO, job state, inputs
    kernels/    attention kernels returning lse, the stable merge, device copies
    execution/  what workers run: tasks, partials policies, worker runtime, graph
    client/     run(), attention(), clusters
    tools/      the cqsa command, verify, the float64 reference
    dashboard/  the scheduler's /cqsa page (a scheduler preload)

Public names are loaded lazily: ``import cqsa_dask`` imports neither torch
nor distributed until one of them is used.
"""

from __future__ import annotations

import importlib
from typing import TYPE_CHECKING, Any

from cqsa_dask import config as _config  # noqa: F401  (registers defaults with dask.config)
from cqsa_dask.core.errors import (
    BudgetError,
    CQSAError,
    InvalidInputError,
    JobFailedError,
    SchedulerError,
    StoreError,
)
from cqsa_dask.core.plan import Plan, make_plan

__version__ = "0.1.0"

__all__ = [
    "BudgetError",
    "CQSAError",
    "InvalidInputError",
    "JobFailedError",
    "JobResult",
    "Plan",
    "SchedulerError",
    "Session",
    "StoreError",
    "SyntheticSource",
    "Verification",
    "analyze",
    "attention",
    "create_synthetic_store",
    "make_plan",
    "run",
    "verify",
]

# name -> module holding it, imported on first use (torch, zarr, distributed come with them)
_LAZY = {
    "analyze": "cqsa_dask.analysis.api",
    "JobResult": "cqsa_dask.client.api",
    "attention": "cqsa_dask.client.api",
    "run": "cqsa_dask.client.api",
    "Session": "cqsa_dask.client.session",
    "SyntheticSource": "cqsa_dask.store.generated",
    "create_synthetic_store": "cqsa_dask.store.generated",
    "Verification": "cqsa_dask.tools.verify",
    "verify": "cqsa_dask.tools.verify",
}

if TYPE_CHECKING:
    from cqsa_dask.analysis.api import analyze
    from cqsa_dask.client.api import JobResult, attention, run
    from cqsa_dask.client.session import Session
    from cqsa_dask.store.generated import SyntheticSource, create_synthetic_store
    from cqsa_dask.tools.verify import Verification, verify


def __getattr__(name: str) -> Any:
    module = _LAZY.get(name)
    if module is None:
        raise AttributeError(f"module 'cqsa_dask' has no attribute {name!r}")
    value = getattr(importlib.import_module(module), name)
    globals()[name] = value
    return value


def __dir__() -> list[str]:
    return sorted(set(globals()) | set(__all__))
