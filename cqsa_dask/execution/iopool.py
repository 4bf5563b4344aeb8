"""The worker's IO threads, serving the earliest task's reads and writes first.

Tasks in flight on one worker share its IO threads (``cqsa.io-threads``).  With a
first-come queue, tasks that start together read at once and each gets a share of
the store's bandwidth, so the first kernels wait for the slowest share; on one GPU
under ``cqsa.cuda-turn: kernels`` the task holding the turn waited behind reads of
tasks that could not compute yet.  Here each task draws a ticket when it starts
(``IOPool.lane``) and queued work runs in ticket order, first come first served
within a ticket::

    submit(ticket t, fn)  ->  heap (t, seq)  ->  the next free IO thread runs the smallest

so the earliest task's reads land first, its kernels start, and the next task's
reads run under them: reads pipeline with compute across tasks even when every
task starts at once.  ``cqsa.io-order: fifo`` gives every task the same ticket
(first come, first served, as a plain thread pool).

The threads are a ``ThreadPoolExecutor``'s (its life cycle and shutdown at exit):
every submission queues one item on the heap and one call of ``_run_next`` on the
executor, which runs whatever item is most urgent when a thread is free.
"""

from __future__ import annotations

import heapq
import itertools
import threading
from collections.abc import Callable
from concurrent.futures import Future, ThreadPoolExecutor
from typing import Any, TypeVar

__all__ = ["IOPool", "Lane"]

T = TypeVar("T")


class IOPool:
    """``threads`` IO threads running queued work in ticket order (``ordered``) or as it came."""

    def __init__(self, threads: int, *, ordered: bool = True, name: str = "cqsa-io"):
        self.ordered = ordered
        self._exec = ThreadPoolExecutor(max_workers=threads, thread_name_prefix=name)
        self._heap: list[tuple[int, int, Future[Any], Callable[..., Any], tuple[Any, ...]]] = []
        self._lock = threading.Lock()
        self._seq = itertools.count()
        self._tickets = itertools.count()

    def lane(self) -> Lane:
        """A task's way into the pool: its work runs after that of tasks that drew before it."""
        return Lane(self, next(self._tickets) if self.ordered else 0)

    def submit(self, ticket: int, fn: Callable[..., T], *args: Any) -> Future[T]:
        """Queue ``fn(*args)`` with ``ticket``; its future (cancellable until a thread takes it)."""
        f: Future[T] = Future()
        with self._lock:
            heapq.heappush(self._heap, (ticket, next(self._seq), f, fn, args))
        self._exec.submit(self._run_next)
        return f

    def _run_next(self) -> None:
        """On an IO thread: run the most urgent queued item (one per submission)."""
        with self._lock:
            _, _, f, fn, args = heapq.heappop(self._heap)
        if not f.set_running_or_notify_cancel():
            return
        try:
            result = fn(*args)
        except BaseException as e:  # noqa: BLE001 - handed to the waiting task, as ThreadPoolExecutor does
            f.set_exception(e)
            del e
        else:
            f.set_result(result)


class Lane:
    """One task's submissions to an :class:`IOPool`, under the ticket it drew."""

    def __init__(self, pool: IOPool, ticket: int):
        self.pool, self.ticket = pool, ticket

    def submit(self, fn: Callable[..., T], *args: Any) -> Future[T]:
        """Queue ``fn(*args)`` behind the work of earlier tickets; its future."""
        return self.pool.submit(self.ticket, fn, *args)
