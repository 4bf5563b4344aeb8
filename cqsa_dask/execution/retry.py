"""What is tried again when a task fails: transient failures inside the task, deterministic ones never.

    attempt ──ok──> result
       │ OSError, CUDA out-of-memory, ... (transient) ──> again, up to ``retries`` times
       └ CQSAError, ValueError, TypeError, ... (the same on every attempt) ──> raised at once

Dask's own task retries would also repeat deterministic failures (twice by
default, each a whole task) before the user hears of them, so the graphs of
jobs and analyses ask Dask for none.  Every step of a task is idempotent (one
writer per chunk, markers after data), so an attempt may start over.
"""

from __future__ import annotations

import logging
from collections.abc import Callable
from typing import Any, TypeVar

from cqsa_dask.core.errors import CQSAError

__all__ = ["DETERMINISTIC", "attempts", "with_attempts"]

log = logging.getLogger(__name__)

#: Failures that come out the same on every attempt (NaN/Inf inputs, a damaged chunk, a dtype
#: mismatch, a changed job): the task fails at once and the client stops the job with its message.
DETERMINISTIC: tuple[type[BaseException], ...] = (CQSAError, ValueError, TypeError, KeyError, IndexError,
                                                  NotImplementedError)
T = TypeVar("T")


def attempts(retries: int, attempt: Callable[[], T], what: str) -> T:
    """``attempt()``, tried again up to ``retries`` times when it fails for a transient reason
    (an OSError of the store, a CUDA out-of-memory while another task held memory, ...)."""
    for n in range(retries + 1):
        try:
            return attempt()
        except DETERMINISTIC:
            raise
        except Exception as e:  # transient: anything else
            if n == retries:
                raise
            log.warning("%s failed (%s: %s); attempt %d of %d", what, type(e).__name__, e, n + 2, retries + 1)
    raise AssertionError("unreachable")  # pragma: no cover


def with_attempts(retries: int, fn: Callable[..., T], *args: Any) -> T:
    """``fn(*args)`` under :func:`attempts`: the form a graph's task takes,
    ``(with_attempts, retries, fn, *args)``, for task functions that do not retry themselves."""
    return attempts(retries, lambda: fn(*args), getattr(fn, "__name__", "task"))
