"""The one exception hierarchy of cqsa_dask.

Every error the package raises on purpose derives from :class:`CQSAError`.
Each subclass also derives from the built-in exception a caller would
naturally catch (``ValueError``, ``OSError``, ...), so ``except ValueError``
keeps working.  Messages say what was expected, what was given and what to
do; the CLI prints them as one line.

::

    CQSAError
    ├── InvalidInputError   (ValueError)   bad shapes, dtypes, options
    │   └── BudgetError     (ValueError)   budget malformed or too small
    ├── StoreError          (OSError)      missing/unreadable/unwritable store
    ├── SchedulerError      (ConnectionError) no scheduler, no fitting worker
    ├── JobFailedError      (RuntimeError) a task failed during the run
    └── JobCancelledError   (RuntimeError) a running task stopped: its job was interrupted
"""

from __future__ import annotations

__all__ = [
    "BudgetError",
    "CQSAError",
    "InvalidInputError",
    "JobCancelledError",
    "JobFailedError",
    "SchedulerError",
    "StoreError",
]


class CQSAError(Exception):
    """Base class of every error raised on purpose by cqsa_dask."""


class InvalidInputError(CQSAError, ValueError):
    """The inputs (tensors, arrays, options) are not acceptable."""


class BudgetError(InvalidInputError):
    """The memory budget is malformed or too small for any plan."""


class StoreError(CQSAError, OSError):
    """The Zarr store is missing, is not a group, or cannot be read/written."""


class SchedulerError(CQSAError, ConnectionError):
    """The Dask scheduler cannot be reached or has no worker that fits."""


class JobFailedError(CQSAError, RuntimeError):
    """A task of the job failed; the message names the task and the cause."""


class JobCancelledError(CQSAError, RuntimeError):
    """A task stopped at a step because its job was interrupted (Ctrl-C, SIGTERM, a failed
    task) in the process that runs it: a threaded worker's tasks (``execution/stop.py``)."""
