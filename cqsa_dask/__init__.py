"""cqsa-dask: exact attention over sequences longer than device memory.

Cyclic quorum sets split full attention into independent tasks that cover
every pair of token groups exactly once; Dask schedules them under a memory
budget (a worker resource) and Zarr holds inputs, partials and outputs.
"""

from __future__ import annotations

__version__ = "0.1.0"

from . import config as _config  # noqa: F401  (registers defaults with dask.config)
from .api import JobResult, attention, run
from .errors import (
    BudgetError,
    CQSAError,
    InvalidInputError,
    JobFailedError,
    SchedulerError,
    StoreError,
)
from .plan import Plan, make_plan
from .synthetic import SyntheticSource, create_synthetic_store
from .verify import Verification, verify

__all__ = [
    "BudgetError",
    "CQSAError",
    "InvalidInputError",
    "JobFailedError",
    "JobResult",
    "Plan",
    "SchedulerError",
    "StoreError",
    "SyntheticSource",
    "Verification",
    "attention",
    "create_synthetic_store",
    "make_plan",
    "run",
    "verify",
]
