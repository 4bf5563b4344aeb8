"""Real ``dask scheduler`` and ``dask worker`` processes, as a user would start them.

::

    big:    dask scheduler :P1  <──  dask worker --resources device_mem=2e9
    small:  dask scheduler :P2  <──  dask worker --resources device_mem=1e6   (fits no task)

    store ──copy──> remote.zarr    cqsa_dask.run(scheduler=P1)      ┐ same out/lse,
          ──copy──> embedded.zarr  cqsa_dask.run() (local cluster)  ├ both exact
          ──copy──> cli.zarr       `cqsa run --scheduler P1 --json` ┘
          ──copy──> small.zarr     cqsa_dask.run(scheduler=P2) -> SchedulerError, fast

While the remote job runs, the scheduler is asked (``run_on_scheduler``) for
its tasks: quorum tasks are named ``cqsa-quorum`` and restricted to
``{device_mem: plan.task_memory_bytes}``; after it the worker's resource is
back to its total.  The processes are killed in teardown whatever happens.
"""

from __future__ import annotations

import json
import os
import shutil
import signal
import socket
import subprocess
import sys
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import cloudpickle
import numpy as np
import pytest
import torch
import zarr
from distributed import Client
from distributed.utils import key_split
from reference import check_exact

import cqsa_dask
from cqsa_dask.store.random_inputs import write_random_inputs

pytestmark = pytest.mark.integration

B, HQ, HKV, N, D = 2, 4, 1, 3000, 128  # with 16 MB the planner splits N into several groups
BUDGET = "16MB"
RESOURCE = "device_mem"


def _free_ports(n: int) -> list[int]:
    """``n`` distinct free ports (all held open while choosing, so they differ)."""
    socks = [socket.socket() for _ in range(n)]
    try:
        for s in socks:
            s.bind(("127.0.0.1", 0))
        return [int(s.getsockname()[1]) for s in socks]
    finally:
        for s in socks:
            s.close()


@dataclass
class DaskProcesses:
    """A scheduler and one worker process started from the command line."""

    address: str
    device_mem: float
    procs: list[subprocess.Popen[bytes]]
    logdir: Path

    def logs(self) -> str:
        return "\n".join(f"--- {p.name}\n{p.read_text()[-3000:]}" for p in sorted(self.logdir.glob("*.log")))


def _spawn(args: list[str], log: Path) -> subprocess.Popen[bytes]:
    with open(log, "wb") as f:
        # own session: teardown can signal the process and the children it spawned (nanny -> worker)
        return subprocess.Popen(args, stdout=f, stderr=subprocess.STDOUT, cwd=log.parent, start_new_session=True)


def _start(tmp: Path, device_mem: float, port: int) -> DaskProcesses:
    tmp.mkdir(parents=True, exist_ok=True)
    addr = f"tcp://127.0.0.1:{port}"
    sched = _spawn(["dask", "scheduler", "--host", "127.0.0.1", "--port", str(port), "--no-dashboard"],
                   tmp / "scheduler.log")
    worker = _spawn(["dask", "worker", addr, "--nworkers", "1", "--nthreads", "2", "--host", "127.0.0.1",
                     "--resources", f"{RESOURCE}={device_mem:g}", "--no-dashboard",
                     "--local-directory", str(tmp / "scratch")], tmp / "worker.log")
    return DaskProcesses(addr, device_mem, [sched, worker], tmp)


def _stop(dp: DaskProcesses) -> None:
    """Worker first, then scheduler: SIGTERM, then SIGKILL to the process group this module created."""
    for p in reversed(dp.procs):
        if p.poll() is None:
            p.terminate()
            try:
                p.wait(timeout=5)
            except subprocess.TimeoutExpired:
                pass
        try:  # the nanny's worker child may outlive the nanny
            os.killpg(p.pid, signal.SIGKILL)
        except ProcessLookupError:
            pass
        p.wait(timeout=5)


def _wait_ready(dp: DaskProcesses, timeout: float = 60) -> None:
    try:
        with Client(dp.address, timeout="30s") as c:
            c.wait_for_workers(1, timeout=timeout)
    except Exception as e:
        raise AssertionError(f"dask processes at {dp.address} not ready: {e}\n{dp.logs()}") from e


@pytest.fixture(scope="module")
def clusters(tmp_path_factory: pytest.TempPathFactory) -> Iterator[tuple[DaskProcesses, DaskProcesses]]:
    """(big, small): started together, since each takes seconds to come up."""
    base = tmp_path_factory.mktemp("dask")
    started = []
    ports = _free_ports(2)
    try:
        started.append(_start(base / "big", 2e9, ports[0]))
        started.append(_start(base / "small", 1e6, ports[1]))
        for dp in started:
            _wait_ready(dp)
        yield started[0], started[1]
    finally:
        for dp in started:
            _stop(dp)


@pytest.fixture(scope="module")
def source_store(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, int]:
    path = tmp_path_factory.mktemp("store") / "job.zarr"
    seed = int.from_bytes(os.urandom(4), "little")
    print(f"integration store seed {seed}")
    write_random_inputs(path, seq_len=N, heads=HQ, kv_heads=HKV, head_dim=D, batch=B, dtype="float32",
                         seed=seed, chunk_tokens=512)
    return path, seed


def _copy(src: Path, dst: Path) -> Path:
    shutil.copytree(src, dst)
    return dst


def _read(path: Path) -> tuple[torch.Tensor, ...]:
    g = zarr.open_group(path, mode="r", zarr_format=3)
    return tuple(torch.from_numpy(np.asarray(g[n][...])) for n in ("q", "k", "v", "out", "lse"))


# The scheduler and worker processes cannot import this test module: ship its probes by value.
cloudpickle.register_pickle_by_value(sys.modules[__name__])


def _scheduler_tasks(dask_scheduler: Any) -> list[tuple[Any, dict[str, float], str]]:
    return [(ts.key, dict(ts.resource_restrictions or {}), ts.state) for ts in dask_scheduler.tasks.values()]


def _worker_resources(dask_worker: Any) -> tuple[dict[str, float], dict[str, float]]:
    return dict(dask_worker.state.total_resources), dict(dask_worker.state.available_resources)


@pytest.fixture(scope="module")
def remote_run(clusters, source_store, tmp_path_factory):  # type: ignore[no-untyped-def]
    """run() against the big scheduler, with a snapshot of the scheduler's tasks mid-run."""
    big, _ = clusters
    path = _copy(source_store[0], tmp_path_factory.mktemp("remote") / "job.zarr")
    seen: list[Any] = []
    with Client(big.address, timeout="30s") as inspector:

        def progress(done: int, total: int) -> None:
            if not seen:  # first finished task: every key of the job is still known to the scheduler
                seen.append(inspector.run_on_scheduler(_scheduler_tasks))

        t0 = time.monotonic()
        res = cqsa_dask.run(path, scheduler=big.address, memory_budget=BUDGET, progress=progress)
        seconds = time.monotonic() - t0
        resources = inspector.run(_worker_resources)
    token = zarr.open_group(path, mode="r")["_cqsa"].attrs["token"]
    return path, res, seconds, seen[0] if seen else [], resources, token


@pytest.mark.filterwarnings("ignore:Port 8787 is already in use")  # the embedded cluster's default port
def test_remote_matches_embedded_and_is_exact(remote_run, source_store, tmp_path) -> None:  # type: ignore[no-untyped-def]
    path, res, seconds, _, _, _ = remote_run
    ctx = f"seed {source_store[1]}"
    assert res.plan.groups > 1 and res.plan.budget_bytes == 16 * 10**6, res.plan
    assert res.quorum_tasks_run == res.plan.tasks and res.merges_run == res.plan.merges
    embedded_path = _copy(source_store[0], tmp_path / "embedded.zarr")
    emb = cqsa_dask.run(embedded_path, memory_budget=BUDGET)  # no client, no scheduler: a local cluster
    assert emb.plan == res.plan
    q, k, v, out, lse = _read(path)
    *_, out_e, lse_e = _read(embedded_path)
    bitwise = torch.equal(out, out_e) and torch.equal(lse, lse_e)
    print(f"remote run {seconds:.1f}s, plan W={res.plan.groups}; remote vs embedded bitwise identical: {bitwise}")
    torch.testing.assert_close(out_e, out, rtol=1e-6, atol=1e-7)
    torch.testing.assert_close(lse_e, lse, rtol=1e-6, atol=1e-6)
    check_exact(q, k, v, out, lse, causal=False, scale=None, context=ctx)
    if not bitwise:  # identical results need no second float64 reference
        check_exact(q, k, v, out_e, lse_e, causal=False, scale=None, context=ctx)


def test_scheduler_sees_named_restricted_tasks(remote_run) -> None:  # type: ignore[no-untyped-def]
    _, res, _, tasks, resources, token = remote_run
    assert tasks, "progress was never called"
    mine = [(key, restr) for key, restr, _ in tasks if str(token) in str(key)]
    quorum = [(key, restr) for key, restr in mine if key_split(key) == "cqsa-quorum"]
    merge = [(key, restr) for key, restr in mine if key_split(key) == "cqsa-merge"]
    assert len(quorum) == res.plan.tasks, sorted(map(str, mine))
    assert len(merge) == res.plan.merges, sorted(map(str, mine))
    assert len(quorum) + len(merge) == len(mine), sorted(map(str, mine))
    for key, restr in quorum:
        assert restr == {RESOURCE: res.plan.task_memory_bytes}, (key, restr)
    for key, restr in merge:
        assert RESOURCE not in restr, (key, restr)
    # after the job every worker has its whole budget again
    for total, available in resources.values():
        assert total == {RESOURCE: 2e9} and available == total, (total, available)


def test_cli_against_scheduler(clusters, remote_run, source_store, tmp_path) -> None:  # type: ignore[no-untyped-def]
    big, _ = clusters
    path = _copy(source_store[0], tmp_path / "cli.zarr")
    proc = subprocess.run(["cqsa", "run", str(path), "--scheduler", big.address, "--budget", BUDGET, "--json"],
                          check=False, capture_output=True, text=True, timeout=90)
    assert proc.returncode == 0, f"stdout:\n{proc.stdout}\nstderr:\n{proc.stderr}"
    events = [json.loads(line) for line in proc.stdout.splitlines() if line.startswith("{")]
    done = [e for e in events if e.get("event") == "done"]
    assert len(done) == 1, proc.stdout
    plan = remote_run[1].plan
    assert done[0]["quorum_tasks_run"] == plan.tasks and done[0]["merges_run"] == plan.merges, done[0]
    assert done[0]["resumed"] is False and done[0]["budget_bytes"] == plan.budget_bytes
    *_, out, lse = _read(path)
    *_, out_r, lse_r = _read(remote_run[0])
    torch.testing.assert_close(out, out_r, rtol=1e-6, atol=1e-7)
    torch.testing.assert_close(lse, lse_r, rtol=1e-6, atol=1e-6)


def test_worker_too_small_fails_fast(clusters, source_store, tmp_path) -> None:  # type: ignore[no-untyped-def]
    _, small = clusters
    path = _copy(source_store[0], tmp_path / "small.zarr")
    t0 = time.monotonic()
    with pytest.raises(cqsa_dask.SchedulerError, match=RESOURCE) as info:
        cqsa_dask.run(path, scheduler=small.address, memory_budget=BUDGET)
    assert isinstance(info.value, ConnectionError)
    assert time.monotonic() - t0 < 20, "SchedulerError took too long"
    # without a budget, the workers' advertised 1e6 bytes is the budget: no plan fits, also at once
    t0 = time.monotonic()
    with pytest.raises(cqsa_dask.BudgetError):
        cqsa_dask.run(path, scheduler=small.address)
    assert time.monotonic() - t0 < 20


def test_plan_for_a_schedulers_workers(clusters) -> None:  # type: ignore[no-untyped-def]
    """`cqsa plan --scheduler`: sized for what the workers are (their device kind, asked of them)
    and advertise (2e9 bytes of device_mem), unless --budget says otherwise."""
    from cqsa_dask.client.policy import plan_options
    from cqsa_dask.core.plan import make_plan

    big, _ = clusters
    shape = {"seq_len": 2**20, "heads": 4, "head_dim": 128}
    for extra, budget in (([], int(2e9)), (["--budget", "1GB"], 10**9)):
        proc = subprocess.run(["cqsa", "plan", "--seq-len", str(2**20), "--heads", "4", "--head-dim", "128",
                               "--scheduler", big.address, "--json", *extra],
                              check=False, capture_output=True, text=True, timeout=90)
        assert proc.returncode == 0, proc.stderr
        got = json.loads(proc.stdout)
        want = make_plan(**shape, budget=budget, **plan_options("cpu"))  # type: ignore[arg-type]
        assert got == json.loads(want.to_json()), (got, want)
