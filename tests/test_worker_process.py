"""The worker runtime (``runtime.py``): set up once per worker process by its plugin, the run
options it is built from, and what it may change in a process (``process.py``: only in a
worker process of its own)."""

from __future__ import annotations

import itertools
import os
import pickle
from typing import Any

import dask
import pytest
import torch
import zarr
from distributed import Client, LocalCluster, get_worker

from cqsa_dask.core.errors import InvalidInputError
from cqsa_dask.execution import process
from cqsa_dask.execution import runtime as rt_module
from cqsa_dask.execution.options import RunOptions
from cqsa_dask.execution.process import capped_bytes, describe_worker, worker_env
from cqsa_dask.execution.runtime import CQSAWorkerPlugin, ensure_runtime, plugin_name, runtime


def test_expandable_segments_are_set_unless_the_environment_chose(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv("PYTORCH_CUDA_ALLOC_CONF", raising=False)
    monkeypatch.delenv("PYTORCH_ALLOC_CONF", raising=False)
    process.expandable_segments()
    assert os.environ["PYTORCH_CUDA_ALLOC_CONF"] == "expandable_segments:True"
    for var in ("PYTORCH_CUDA_ALLOC_CONF", "PYTORCH_ALLOC_CONF"):  # either variable is the user's choice
        monkeypatch.delenv("PYTORCH_CUDA_ALLOC_CONF", raising=False)
        monkeypatch.setenv(var, "max_split_size_mb:64")
        process.expandable_segments()
        assert os.environ[var] == "max_split_size_mb:64"
        assert var == "PYTORCH_CUDA_ALLOC_CONF" or "PYTORCH_CUDA_ALLOC_CONF" not in os.environ
        monkeypatch.delenv(var)


def test_spawned_workers_get_the_allocator_setting_unless_the_environment_chose(
        monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv("PYTORCH_CUDA_ALLOC_CONF", raising=False)
    monkeypatch.delenv("PYTORCH_ALLOC_CONF", raising=False)
    opts = RunOptions.from_config()
    assert worker_env(opts) == {"PYTORCH_CUDA_ALLOC_CONF": "expandable_segments:True"}
    assert worker_env(opts.replace(expandable_segments=False)) == {}
    monkeypatch.setenv("PYTORCH_ALLOC_CONF", "max_split_size_mb:64")
    assert worker_env(opts) == {}
    assert "PYTORCH_CUDA_ALLOC_CONF" not in os.environ, "worker_env changes nothing here"


def test_torch_threads_default_to_the_cores_this_process_may_use() -> None:
    """dask-cuda pins each GPU worker to the cores near its GPU: "every core" means those."""
    from cqsa_dask.execution.process import torch_threads

    opts = RunOptions.from_config(torch_threads=None)
    before = os.sched_getaffinity(0)
    try:
        os.sched_setaffinity(0, {min(before)})
        assert torch_threads(opts) == 1
    finally:
        os.sched_setaffinity(0, before)
    assert torch_threads(opts) == len(before) and torch_threads(opts.replace(torch_threads=3)) == 3


def test_options_come_from_the_config_and_travel_with_each_task() -> None:
    opts = RunOptions.from_config()
    assert opts.expandable_segments is True and opts.host_cache == "auto" and opts.tasks_in_flight >= 1
    with dask.config.set({"cqsa.host-cache": "1GB", "cqsa.torch-threads": 3, "cqsa.tasks-in-flight": 4,
                          "cqsa.pin-host-memory": "auto"}):
        set_ = RunOptions.from_config(io_threads=7)
    assert (set_.host_cache, set_.torch_threads, set_.tasks_in_flight, set_.io_threads) == ("1GB", 3, 4, 7)
    assert set_.pin_host_memory == "auto"
    assert pickle.loads(pickle.dumps(set_)) == set_
    assert set_.runtime_key != opts.runtime_key and set_.replace(kernel="reference").runtime_key == set_.runtime_key
    with pytest.raises(AttributeError):
        set_.device = "cpu"  # type: ignore[misc]
    with pytest.raises(InvalidInputError, match="unknown run options"):
        RunOptions.from_config(host_cach=0)
    with pytest.raises(InvalidInputError, match="not understood"):
        RunOptions.from_config(io_threads="many")
    assert RunOptions.from_config(device="cpu", tasks_in_flight="auto").tasks_in_flight == 1
    assert RunOptions.from_config(device="cuda:1", tasks_in_flight="auto").tasks_in_flight == 2
    assert RunOptions.from_config(cuda_turn="streams").cuda_turn == "streams"
    with pytest.raises(InvalidInputError, match="cuda-turn must be"):
        RunOptions.from_config(cuda_turn="sometimes")
    assert RunOptions.from_config().cuda_turn == "streams"
    assert RunOptions.from_config(cuda_turn="kernels").cuda_turn == "kernels"
    assert RunOptions.from_config(cuda_turn="auto").cuda_turn == "streams"  # the former default's name


@pytest.mark.parametrize("budget", [10**5, 10**7, 10**8, 10**9, 2 * 10**9, 4 * 10**9, 16 * 10**9, 80 * 10**9])
def test_the_allocator_cap_sits_just_under_the_budget(budget: int) -> None:
    """From 1 GB up, below the budget by more than the 3.5 MB the reserve passed the cap on
    the H200 and by no more than 1 % or 32 MiB (the engine keeps its budget); any budget
    keeps at least 90 % of itself."""
    cap = capped_bytes(budget)
    assert 0.9 * budget <= cap < budget
    if budget >= 10**9:
        assert budget - 32 * 2**20 >= cap >= min(0.99 * budget, budget - 32 * 2**20)


def _probe(options: RunOptions) -> dict[str, Any]:
    """Run as a task: which runtime it gets, and what the process looks like."""
    import threading
    import uuid

    rt = runtime(options)
    rt.bind_thread()
    plugin = get_worker().plugins.get(plugin_name(options))
    tag = rt.__dict__.setdefault("_cqsa_test_tag", uuid.uuid4().hex)  # id() of a freed runtime may be reused
    return {"runtime": tag, "pid": os.getpid(), "thread": threading.get_ident(),
            "from_plugin": isinstance(plugin, CQSAWorkerPlugin) and plugin.runtime is rt,
            "owns_process": rt.owns_process, "torch_threads": torch.get_num_threads(),
            "zarr_concurrency": zarr.config.get("async.concurrency"), "cache": rt.cache.capacity,
            "setups": _setups(get_worker(), options)}


def _setups(worker: Any, options: RunOptions) -> int:
    return int(getattr(worker, "_cqsa_test_setups", {}).get(plugin_name(options), 0))


class _CountingPlugin(CQSAWorkerPlugin):
    """The real plugin, counting its setups on the worker."""

    def setup(self, worker: Any) -> None:
        counts = worker.__dict__.setdefault("_cqsa_test_setups", {})
        counts[self.name] = counts.get(self.name, 0) + 1
        super().setup(worker)


def test_the_plugin_sets_the_runtime_up_once_per_worker_process(monkeypatch: pytest.MonkeyPatch) -> None:
    """A worker process of its own: one setup for every task, ensure_runtime again is free, the
    options' torch threads and zarr concurrency hold in the worker's task threads, and the
    client's process is left as it was."""
    zarr_before, threads_before = zarr.config.get("async.concurrency"), torch.get_num_threads()
    env_before = os.environ.get("PYTORCH_CUDA_ALLOC_CONF")
    monkeypatch.setattr(rt_module, "CQSAWorkerPlugin", _CountingPlugin)
    opts = RunOptions.from_config(torch_threads=1, zarr_concurrency=3, host_cache="64MB", device="cpu")
    with LocalCluster(n_workers=1, threads_per_worker=2, processes=True, dashboard_address=":0") as cluster, \
            Client(cluster) as client:
        ensure_runtime(client, opts)
        ensure_runtime(client, opts)  # registered already: nothing happens
        got = [client.submit(_probe, opts, pure=False, key=f"probe-{i}").result() for i in range(4)]
        assert {g["runtime"] for g in got} == {got[0]["runtime"]} and len({g["pid"] for g in got}) == 1
        assert all(g["from_plugin"] and g["owns_process"] for g in got), got
        assert {g["setups"] for g in got} == {1}, "one setup for all the tasks"
        assert {(g["torch_threads"], g["zarr_concurrency"], g["cache"]) for g in got} == {(1, 3, 64 * 10**6)}
        other = opts.replace(host_cache=0)
        ensure_runtime(client, other)  # other settings: the runtime is replaced
        names = client.run_on_scheduler(lambda dask_scheduler: sorted(dask_scheduler.worker_plugins))
        assert plugin_name(other) in names and plugin_name(opts) not in names
        again = client.submit(_probe, other, pure=False).result()
        assert again["from_plugin"] and again["cache"] == 0 and again["runtime"] != got[0]["runtime"]
        described = client.run(describe_worker, "cpu")
        assert [d["device"] for d in described.values()] == ["cpu"]
    assert (zarr.config.get("async.concurrency"), torch.get_num_threads()) == (zarr_before, threads_before)
    assert os.environ.get("PYTORCH_CUDA_ALLOC_CONF") == env_before


def test_a_threaded_worker_leaves_the_users_process_alone() -> None:
    """Workers in this process (processes=False): the runtime comes from the plugin, but torch's
    threads and zarr's concurrency stay the user's."""
    zarr_before, threads_before = zarr.config.get("async.concurrency"), torch.get_num_threads()
    opts = RunOptions.from_config(torch_threads=threads_before + 1, zarr_concurrency=zarr_before + 5, device="cpu")
    with LocalCluster(n_workers=1, threads_per_worker=1, processes=False, dashboard_address=":0") as cluster, \
            Client(cluster) as client:
        ensure_runtime(client, opts)
        got = client.submit(_probe, opts, pure=False).result()
    assert got["from_plugin"] and not got["owns_process"]
    assert (got["torch_threads"], got["zarr_concurrency"]) == (threads_before, zarr_before)
    assert (zarr.config.get("async.concurrency"), torch.get_num_threads()) == (zarr_before, threads_before)


def test_outside_a_worker_tasks_get_a_process_local_runtime() -> None:
    opts = RunOptions.from_config(host_cache=0, device="cpu")
    rt = runtime(opts)
    assert rt is runtime(opts) and not rt.owns_process and rt.cache.capacity == 0
    assert runtime(opts.replace(host_cache="1MB")) is not rt
    assert runtime(opts.replace(check_finite=False)) is rt, "per-task options share the runtime"


def test_a_task_on_a_worker_of_another_device_kind_is_refused_in_one_line(client, tmp_path) -> None:  # type: ignore[no-untyped-def]
    """A job sized for CUDA workers (host staging, two tasks in flight) whose task lands on a CPU
    worker (one that joined its scheduler later, say) fails with one line naming both kinds."""
    import zarr

    import cqsa_dask
    from cqsa_dask.core.errors import InvalidInputError
    from cqsa_dask.execution.tasks import quorum_task
    from cqsa_dask.store.random_inputs import write_random_inputs

    path = tmp_path / "job.zarr"
    write_random_inputs(str(path), seq_len=200, heads=2, head_dim=16, seed=int.from_bytes(os.urandom(4), "little"))
    res = cqsa_dask.run(str(path), client=client, groups=3, memory_budget="64MB")
    assert not res.plan.host_staging  # planned for this machine's CPU workers
    steps = ["connected", "planned", "claimed", "runtime", "prepared", "submitted", "finished"]
    assert list(res.phases) == steps and all(res.phases[a] <= res.phases[b] for a, b in itertools.pairwise(steps))
    eng = zarr.open_group(str(path), mode="r+")["_cqsa"]
    plan = dict(eng.attrs["plan"])
    eng.attrs["plan"] = {**plan, "host_staging": True}  # as a plan for CUDA workers would say
    eng["task_done"][0, 0, 0] = 0
    with pytest.raises(InvalidInputError) as e:
        quorum_task(str(path), str(eng.attrs["token"]), 0, 0, 0, RunOptions.from_config(device="cpu"))
    assert str(e.value).count("\n") == 0 and "computes on cpu, but this job was planned for cuda workers" in str(e.value)
