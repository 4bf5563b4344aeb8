"""The row locks' scheduler side (execution/lockrelease.py): which leases it frees, and that it
travels by value.

In-process ``Scheduler`` and ``Worker`` (distributed's own, no subprocess): the
killed-worker test of test_reliability.py checks the whole path on real processes.
"""

from __future__ import annotations

import asyncio
import importlib.abc
import sys
from collections.abc import Iterator
from contextlib import contextmanager

import pytest
from distributed import Scheduler, Worker
from distributed.protocol.pickle import dumps, loads

from cqsa_dask.execution import lockrelease
from cqsa_dask.execution.lockrelease import TOPIC, RowLockRelease, holder_of, lease_id


def test_lease_ids_name_their_holder() -> None:
    assert holder_of(lease_id("Worker-1:2", "abc")) == "Worker-1:2"
    assert holder_of("0123abcd") is None  # a lease of distributed.Lock / Semaphore: random hex
    assert holder_of(None) is None


def test_free_releases_the_leases_of_workers_that_left_only() -> None:
    """Leases: one of a live worker, one of a worker that is gone, one of distributed.Lock (no holder).
    Only the second is freed (and logged); a waiter on its lock gets it at once."""

    async def scenario() -> None:
        async with Scheduler(dashboard_address=":0", port=0) as s, Worker(s.address, nthreads=1) as w:
            ext = s.extensions["semaphores"]
            plugin = RowLockRelease()
            await plugin.start(s)
            for name in ("cqsa-t-row-0", "cqsa-t-row-1", "other"):
                ext.create(name, 1, None)
            live, gone = lease_id(str(w.id), "a"), lease_id("Worker-gone", "b")
            assert ext._get_lease("cqsa-t-row-0", live) and ext._get_lease("cqsa-t-row-1", gone)
            assert ext._get_lease("other", "0123abcd")
            waiter = asyncio.ensure_future(ext.acquire(name="cqsa-t-row-1", timeout=5, lease_id=lease_id("W2", "c")))
            await asyncio.sleep(0.05)
            assert not waiter.done()
            assert plugin.free() == 1
            assert await asyncio.wait_for(waiter, 1), "the waiter did not get the freed lock"
            assert set(ext.leases["cqsa-t-row-0"]) == {live} and set(ext.leases["other"]) == {"0123abcd"}
            assert [e["leases"] for _, e in s.get_events(TOPIC)] == [[{"name": "cqsa-t-row-1", "holder": "Worker-gone"}]]
            await plugin.close()

    asyncio.run(scenario())


@contextmanager
def _unimportable(prefix: str) -> Iterator[None]:
    """``prefix`` and its submodules cannot be imported (and are not loaded) within the block."""

    class Block(importlib.abc.MetaPathFinder):
        def find_spec(self, name: str, path: object = None, target: object = None) -> None:
            if name == prefix or name.startswith(prefix + "."):
                raise ImportError(f"{name} is blocked")

    saved = {m: sys.modules.pop(m) for m in list(sys.modules) if m == prefix or m.startswith(prefix + ".")}
    blocker = Block()
    sys.meta_path.insert(0, blocker)
    try:
        yield
    finally:
        sys.meta_path.remove(blocker)
        sys.modules.update(saved)


def _payload(by_value: bool) -> bytes:
    """The plugin as distributed pickles it, with its module registered by value or not."""
    import cloudpickle

    registered = lockrelease.__name__ in cloudpickle.list_registry_pickle_by_value()
    try:
        if by_value and not registered:
            cloudpickle.register_pickle_by_value(lockrelease)
        elif registered and not by_value:
            cloudpickle.unregister_pickle_by_value(lockrelease)
        return dumps(RowLockRelease(window=7.0))
    finally:
        if registered and not by_value:
            cloudpickle.register_pickle_by_value(lockrelease)
        elif by_value and not registered:
            cloudpickle.unregister_pickle_by_value(lockrelease)


def test_the_plugin_travels_by_value() -> None:
    """What ensure_release sends (distributed's pickle, the module registered by value) loads
    where cqsa_dask cannot be imported: a scheduler needs only distributed.  Pickled by
    reference, as without the registration, it does not."""
    by_value, by_reference = _payload(by_value=True), _payload(by_value=False)
    with _unimportable("cqsa_dask"):
        plugin = loads(by_value)
        with pytest.raises(ImportError, match="blocked"):
            loads(by_reference)
    assert type(plugin).__name__ == "RowLockRelease"
    assert plugin.window == 7.0 and plugin.name == lockrelease.PLUGIN_NAME
