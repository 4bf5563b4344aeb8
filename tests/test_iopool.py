"""The IO pool (execution/iopool.py): work runs in ticket order, first come first served within
a ticket; futures cancel, carry exceptions; "fifo" keeps the order of submission."""

from __future__ import annotations

import threading
from concurrent.futures import CancelledError

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from cqsa_dask.execution.iopool import IOPool
from cqsa_dask.execution.options import RunOptions
from cqsa_dask.execution.runtime import WorkerRuntime


def _blocked(pool: IOPool) -> threading.Event:
    """Occupy the pool's only thread until the returned event is set (queued work then waits)."""
    started, release = threading.Event(), threading.Event()

    def hold() -> None:
        started.set()
        release.wait(10)

    pool.lane().submit(hold)
    assert started.wait(10)
    return release


@settings(max_examples=40, deadline=None)
@given(st.lists(st.integers(0, 4), min_size=1, max_size=25))
def test_queued_work_runs_in_ticket_order_then_as_submitted(lanes_of_items: list[int]) -> None:
    pool = IOPool(1)
    release = _blocked(pool)
    lanes = [pool.lane() for _ in range(5)]  # drawn in this order: lane i has the i-th ticket
    ran: list[tuple[int, int]] = []
    futures = [lanes[lane].submit(ran.append, (lane, n)) for n, lane in enumerate(lanes_of_items)]
    release.set()
    for f in futures:
        f.result(10)
    assert ran == sorted((lane, n) for n, lane in enumerate(lanes_of_items))


def test_fifo_keeps_the_order_of_submission() -> None:
    pool = IOPool(1, ordered=False)
    release = _blocked(pool)
    late, early = pool.lane(), pool.lane()
    ran: list[str] = []
    futures = [early.submit(ran.append, "a"), late.submit(ran.append, "b"), early.submit(ran.append, "c")]
    release.set()
    for f in futures:
        f.result(10)
    assert ran == ["a", "b", "c"]


def test_a_cancelled_item_does_not_run_and_the_rest_do() -> None:
    pool = IOPool(1)
    release = _blocked(pool)
    lane = pool.lane()
    ran: list[int] = []
    first, second, third = (lane.submit(ran.append, i) for i in range(3))
    assert second.cancel()
    release.set()
    first.result(10)
    third.result(10)
    with pytest.raises(CancelledError):
        second.result(10)
    assert ran == [0, 2]


def test_an_exception_reaches_the_waiting_task() -> None:
    pool = IOPool(2)

    def fail() -> None:
        raise OSError("the store went away")

    with pytest.raises(OSError, match="went away"):
        pool.lane().submit(fail).result(10)
    assert pool.lane().submit(lambda x: x + 1, 41).result(10) == 42  # the thread survives


def test_the_runtime_orders_by_cqsa_io_order() -> None:
    assert WorkerRuntime(RunOptions.from_config()).pool.ordered
    assert not WorkerRuntime(RunOptions.from_config(io_order="fifo")).pool.ordered
    with pytest.raises(Exception, match="io-order must be 'tasks' or 'fifo'"):
        RunOptions.from_config(io_order="lifo")
