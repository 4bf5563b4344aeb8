"""Leases that know the dead: who may take a store over, and when.

    lease of ...            live process here    dead process here    another host      another host + force
    refused / taken over    refused              taken over at once   refused (hint)    taken over
"""

from __future__ import annotations

import logging
import subprocess
import sys
import time
from pathlib import Path

import pytest
import zarr
from clitools import snapshot

from cqsa_dask.core.errors import StoreError
from cqsa_dask.store import jobstate
from cqsa_dask.store.jobstate import Lease, check_free


def _engine_with(lease: dict[str, object] | None) -> zarr.Group:
    group = zarr.open_group(zarr.storage.MemoryStore(), mode="w", zarr_format=3)
    eng = group.create_group("_cqsa")
    eng.attrs["lease"] = lease
    return eng


def _lease(pid: int, started: float, host: str = jobstate._HOST) -> dict[str, object]:
    return {"owner": f"{host}:{pid}:abcd1234", "expires": time.time() + 3600, "host": host, "pid": pid,
            "started": started}


def _dead_pid() -> tuple[int, float]:
    """The pid and start time of a process that has exited."""
    import psutil

    proc = subprocess.Popen([sys.executable, "-c", "pass"])
    started = psutil.Process(proc.pid).create_time()
    proc.wait()
    return proc.pid, started


def test_a_dead_holder_of_this_host_is_taken_over(caplog: pytest.LogCaptureFixture) -> None:
    pid, started = _dead_pid()
    eng = _engine_with(_lease(pid, started))
    with caplog.at_level(logging.WARNING, logger="cqsa_dask.store.jobstate"):
        check_free(eng)
    assert "no longer exists on this host" in caplog.text
    lease = Lease(zarr.open_group(eng.store, mode="r+"), ttl=30)
    lease.acquire()  # the claim goes through and the store is ours
    assert zarr.open_group(eng.store, path="_cqsa", mode="r").attrs["lease"]["owner"] == lease.owner  # type: ignore[index]
    lease.release()


def test_a_live_holder_of_this_host_is_refused_even_with_force() -> None:
    import psutil

    me = psutil.Process()
    eng = _engine_with(_lease(me.pid, me.create_time()))
    for force in (False, True):
        with pytest.raises(StoreError, match="another run holds this store.*stop it first"):
            check_free(eng, force=force)


def test_a_reused_pid_is_not_the_holder() -> None:
    import psutil

    me = psutil.Process()  # same pid, but the lease's process started at another time: that one is gone
    check_free(_engine_with(_lease(me.pid, me.create_time() - 1000.0)))


def test_another_hosts_lease_needs_force() -> None:
    eng = _engine_with(_lease(4242, 1.0, host="elsewhere"))
    with pytest.raises(StoreError, match="resume with --force"):
        check_free(eng)
    check_free(eng, force=True)


def test_an_expired_or_old_style_lease() -> None:
    check_free(_engine_with({"owner": "x:1:y", "expires": time.time() - 1}))
    with pytest.raises(StoreError):  # no host or pid recorded (an older engine's): wait for its expiry
        check_free(_engine_with({"owner": "x:1:y", "expires": time.time() + 60}))


def test_start_ticks_name_the_holder_whatever_the_wall_clock_does(monkeypatch: pytest.MonkeyPatch) -> None:
    """A live holder's lease stays held when its create_time moves (the wall clock stepped: boot time is
    derived from it), and a reused pid or a dead one is told apart by its start ticks."""
    import psutil

    me = psutil.Process()
    ticks = jobstate._start_ticks(me.pid)
    assert isinstance(ticks, int)
    live = {**_lease(me.pid, me.create_time() - 5.0), "start_ticks": ticks}  # the clock moved by 5 s since
    with pytest.raises(StoreError, match="stop it first"):
        check_free(_engine_with(live))
    check_free(_engine_with({**live, "start_ticks": ticks - 100}))  # the same pid, another process: gone
    pid, started = _dead_pid()
    check_free(_engine_with({**_lease(pid, started), "start_ticks": 12345}))
    lease = Lease(zarr.open_group(_engine_with(None).store, mode="r+"), ttl=30)
    lease.acquire()  # a new lease records them
    stored = lease.eng.attrs["lease"]
    assert stored["start_ticks"] == ticks  # type: ignore[index]
    lease.release()


def test_a_held_store_is_refused_before_any_scheduler_is_asked(tmp_path: Path) -> None:
    """``run`` looks at the lease before it connects: a store another live run holds is refused at
    once, even with a scheduler that never answers (before, a SchedulerError after the 10 s connect
    timeout; with a busy cluster, the refusal waited on every worker's answer), and its bytes stay
    as they were."""
    import psutil

    import cqsa_dask
    from cqsa_dask.store.random_inputs import write_random_inputs

    store = tmp_path / "held.zarr"
    write_random_inputs(store, seq_len=64, heads=2, kv_heads=1, head_dim=8, seed=7)
    me = psutil.Process()
    eng = zarr.open_group(str(store), mode="r+", zarr_format=3).create_group("_cqsa")
    eng.attrs["lease"] = _lease(me.pid, me.create_time())
    before = snapshot(store)
    with pytest.raises(StoreError, match="another run holds this store"):
        cqsa_dask.run(store, scheduler="tcp://127.0.0.1:9")  # the discard port: nothing listens
    assert snapshot(store) == before
