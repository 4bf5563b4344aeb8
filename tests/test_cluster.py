"""The local cluster ``cqsa run`` starts: what it exposes to the network, its spec and backends.

    connect() ──> LocalCluster: scheduler on 127.0.0.1, dashboard on 127.0.0.1 (cqsa.local-cluster.
                  dashboard-address) unless the user asks for every interface
    local_spec() ──> choose_backend() ──> "dask-cuda": LocalCUDACluster(**cuda_cluster_kwargs(spec))
                                      └─> "spec":      _GPUCluster(gpus, **cluster_kwargs(spec))

dask-cuda is not installed here: the tests check the choice without it, the
parameters both backends get from one spec, and the hand-made spec for real;
``test_dask_cuda_backend_for_real`` (marked ``dask_cuda``) runs only where dask_cuda imports.
"""

from __future__ import annotations

import importlib.util
import inspect
import os
import signal
from typing import Any
from urllib.parse import urlparse

import dask
import psutil
import pytest
import torch as _torch
import zarr

from cqsa_dask import config
from cqsa_dask.client.cluster import connect
from cqsa_dask.client.local import (
    choose_backend,
    cluster_kwargs,
    cuda_cluster_kwargs,
    local_spec,
    start,
    worker_processes,
)
from cqsa_dask.core.errors import InvalidInputError

HAVE_DASK_CUDA = importlib.util.find_spec("dask_cuda") is not None
HAVE_GPU = _torch.cuda.is_available()


def _listening(port: int) -> set[str]:
    """The local addresses this process listens on at ``port``."""
    return {c.laddr.ip for c in psutil.Process(os.getpid()).net_connections(kind="tcp")
            if c.status == psutil.CONN_LISTEN and c.laddr.port == port}


@pytest.mark.integration
def test_dashboard_listens_on_localhost_by_default() -> None:
    assert str(config.get("local-cluster.dashboard-address")).startswith("127.0.0.1:")
    with connect(budget_bytes=10**9, resource="device_mem") as c:
        port = urlparse(c.dashboard_link).port
        assert port is not None
        addresses = _listening(port)
        scheduler = urlparse(c.scheduler.address).hostname
    assert addresses and addresses <= {"127.0.0.1"}, addresses
    assert scheduler == "127.0.0.1"


@pytest.mark.skipif(HAVE_GPU, reason="the settings on a machine without GPUs (this one has one)")
def test_gpus_setting_on_a_machine_without_gpus() -> None:
    from cqsa_dask.client.cluster import local_gpus, visible_gpus
    from cqsa_dask.core.errors import InvalidInputError

    assert visible_gpus() == [] and local_gpus("all") == [] and local_gpus("none") == []
    with pytest.raises(InvalidInputError, match=r"no GPU 0, 3: this machine shows no GPU"):
        local_gpus("0,3")
    with pytest.raises(InvalidInputError, match="GPU numbers such as 0,1"):
        local_gpus("first")


def _sigint_ignored() -> bool:
    return signal.getsignal(signal.SIGINT) == signal.SIG_IGN


def _exact_job(client: Any, tmp_path: Any, seed: int) -> None:
    """A causal job of several token groups on ``client``'s workers, checked against float64."""
    import torch
    from reference import check_exact

    import cqsa_dask
    from cqsa_dask.store.random_inputs import write_random_inputs

    store = tmp_path / f"job-{seed}.zarr"
    g = write_random_inputs(store, seq_len=1500, heads=2, kv_heads=1, head_dim=32, dtype="float32", seed=seed)
    res = cqsa_dask.run(store, client=client, groups=7, causal=True)
    assert res.quorum_tasks_run == res.plan.tasks
    q, k, v = (torch.from_numpy(g[n][...]) for n in ("q", "k", "v"))
    check_exact(q, k, v, torch.from_numpy(g["out"][...]), torch.from_numpy(g["lse"][...]), causal=True,
                scale=None, context=f"seed {seed}")


_SMALL = {"cqsa.local-cluster.threads-per-worker": 1, "cqsa.local-cluster.dashboard-address": "127.0.0.1:0"}


@pytest.mark.integration
def test_one_pinned_worker_per_gpu_entry(tmp_path) -> None:  # type: ignore[no-untyped-def]
    """The spec backend, for real: one worker process per entry, each seeing only its device
    (here "0" twice: two workers sharing one device, each advertising the whole budget; this
    machine has no GPU, so the job's tasks run on the CPU), started with SIGINT ignored (Ctrl-C
    reaches the user's process alone), with its share of the host memory; a job on them is exact."""
    from distributed import Client

    with dask.config.set(_SMALL):
        spec = local_spec(budget_bytes=3 * 10**8, resource="device_mem", threads=3, gpus=["0", "0"])
    assert choose_backend(spec) == "spec", "dask-cuda starts one worker per distinct GPU"
    with start(spec, "spec") as cluster, Client(cluster) as c:
        seen = c.run(lambda: (os.environ.get("CUDA_VISIBLE_DEVICES"), _sigint_ignored()))
        assert sorted(seen.values()) == [("0", True), ("0", True)], seen
        workers = c.scheduler_info()["workers"].values()
        assert [(w["resources"], w["nthreads"], w["memory_limit"]) for w in workers] == \
            [({"device_mem": 3e8}, 1, spec.memory_limit)] * 2
        _exact_job(c, tmp_path, seed=11)
    assert not _sigint_ignored(), "the user's process keeps its Ctrl-C"


def test_both_backends_get_the_parameters_of_one_spec() -> None:
    """LocalCUDACluster's keyword arguments are the hand-made spec's (LocalCluster's) less
    ``processes``, plus the device list, one worker per device and no device LRU; every one is
    a parameter LocalCUDACluster takes (its own, LocalCluster's, or a worker's, which
    LocalCluster hands to each Nanny)."""
    from distributed import LocalCluster, Nanny

    from cqsa_dask.execution.options import RunOptions
    from cqsa_dask.execution.process import worker_env

    with dask.config.set({**_SMALL, "cqsa.local-cluster.threads-per-worker": 5,
                          "cqsa.local-cluster.memory-limit": "3GB"}):
        spec = local_spec(budget_bytes=7 * 10**9, resource="gpu_bytes", threads=3, gpus=["1", "GPU-4f2a"])
    hand, cuda = cluster_kwargs(spec), cuda_cluster_kwargs(spec)
    assert hand == {
        "threads_per_worker": 5, "processes": True, "memory_limit": 3 * 10**9, "resources": {"gpu_bytes": 7e9},
        "env": worker_env(RunOptions.from_config()), "dashboard_address": "127.0.0.1:0",
        "silence_logs": spec.silence_logs, "scheduler_kwargs": {"preload": ["cqsa_dask.dashboard"]},
    }
    common = {k: v for k, v in hand.items() if k != "processes"}
    assert cuda == {**common, "CUDA_VISIBLE_DEVICES": "1,GPU-4f2a", "n_workers": 2, "device_memory_limit": 0}
    if HAVE_DASK_CUDA:
        from dask_cuda import LocalCUDACluster
        own = set(inspect.signature(LocalCUDACluster).parameters)
    else:  # read in dask-cuda 26.10.0's local_cuda_cluster.py
        own = {"CUDA_VISIBLE_DEVICES", "n_workers", "threads_per_worker", "memory_limit", "device_memory_limit"}
    accepted = own | set(inspect.signature(LocalCluster).parameters) | set(inspect.signature(Nanny).parameters)
    assert set(cuda) <= accepted, set(cuda) - accepted


def test_memory_limit_is_the_machines_share_per_worker() -> None:
    from distributed import system

    for gpus in (["0"], ["0", "1", "2"]):
        spec = local_spec(budget_bytes=10**9, resource="device_mem", threads=3, gpus=gpus)
        assert spec.memory_limit == system.MEMORY_LIMIT // len(gpus) == cluster_kwargs(spec)["memory_limit"]
    with dask.config.set({"cqsa.local-cluster.memory-limit": 0}):
        assert local_spec(budget_bytes=10**9, resource="device_mem", threads=2).memory_limit is None
    with dask.config.set({"cqsa.local-cluster.memory-limit": "lots"}), \
            pytest.raises(InvalidInputError, match="memory-limit must be 'auto', bytes such as 40GB"):
        local_spec(budget_bytes=10**9, resource="device_mem", threads=2)


@pytest.mark.skipif(HAVE_DASK_CUDA, reason="checks the choice where dask-cuda is not installed")
def test_backend_without_dask_cuda() -> None:
    """auto takes the hand-made spec; a forced dask-cuda is a clear error, never a silent fallback."""
    gpus = local_spec(budget_bytes=10**9, resource="device_mem", threads=3, gpus=["0", "1"])
    cpu = local_spec(budget_bytes=10**9, resource="device_mem", threads=2)
    assert [choose_backend(s, b) for s in (gpus, cpu) for b in ("auto", "spec")] == ["spec"] * 4
    for s in (gpus, cpu):
        with pytest.raises(InvalidInputError, match=r"^cqsa.local-cluster.backend is dask-cuda, but dask_cuda is "
                           r"not installed \(pip install 'cqsa-dask\[cuda\]'\); set it to auto or spec"):
            choose_backend(s, "dask-cuda")
    with dask.config.set({"cqsa.local-cluster.backend": "dask-cuda"}), pytest.raises(InvalidInputError):
        choose_backend(gpus)
    with pytest.raises(InvalidInputError, match="must be auto, dask-cuda or spec; got 'cuda'"):
        choose_backend(gpus, "cuda")


@pytest.mark.integration
@pytest.mark.dask_cuda
def test_dask_cuda_backend_for_real(tmp_path, monkeypatch) -> None:  # type: ignore[no-untyped-def]
    """Where dask-cuda is installed: auto starts LocalCUDACluster with the spec's parameters,
    cqsa's worker environment beside the device list, SIGINT ignored in the workers, and a
    job on them is exact.  Without a GPU, dask-cuda's own switch for GPU-less tests leaves out
    its device-specific parts (NVML: the spill store's device size, CPU affinity)."""
    from dask_cuda import LocalCUDACluster
    from distributed import Client

    from cqsa_dask.client.cluster import visible_gpus

    gpus = visible_gpus()[:2]
    if not gpus:
        monkeypatch.setenv("DASK_CUDA_TEST_DISABLE_DEVICE_SPECIFIC", "1")
        gpus = ["0"]
    with dask.config.set({**_SMALL, "cqsa.local-cluster.processes": True}):  # auto: one GPU is a thread here
        spec = local_spec(budget_bytes=3 * 10**8, resource="device_mem", threads=3, gpus=gpus)
    assert choose_backend(spec) == "dask-cuda"
    with start(spec, "dask-cuda") as cluster, Client(cluster) as c:
        assert isinstance(cluster, LocalCUDACluster)
        env = c.run(lambda: ({k: os.environ.get(k) for k in ("CUDA_VISIBLE_DEVICES", *spec.env)}, _sigint_ignored()))
        firsts = sorted(e["CUDA_VISIBLE_DEVICES"].split(",")[0] for e, _ in env.values())
        assert firsts == sorted(gpus), env
        assert all({k: e[k] for k in spec.env} == spec.env and ignored for e, ignored in env.values()), env
        workers = c.scheduler_info()["workers"].values()
        assert [(w["resources"], w["nthreads"], w["memory_limit"]) for w in workers] == \
            [({"device_mem": 3e8}, 1, spec.memory_limit)] * len(gpus)
        _exact_job(c, tmp_path, seed=13)


def test_cli_names_a_missing_gpu_in_one_line(tmp_path) -> None:  # type: ignore[no-untyped-def]
    from clitools import invoke

    from cqsa_dask.store.random_inputs import write_random_inputs

    store = tmp_path / "job.zarr"
    write_random_inputs(store, seq_len=256, heads=1, head_dim=16, dtype="float32", seed=3)
    r = invoke(["run", str(store), "--gpus", "2"], timeout=120)
    n = _torch.cuda.device_count()
    shows = f"GPUs 0-{n - 1}" if n else "no GPU"
    want = (f"cqsa: error: no GPU 2: this machine shows {shows}; give --gpus numbers among them (see nvidia-smi), "
            "or --gpus none")
    assert r.returncode == 2 and r.stderr.strip().splitlines() == [want], str(r)
    assert "out" not in zarr.open_group(store, mode="r"), "nothing written"


def test_cli_forced_dask_cuda_without_it_in_one_line(tmp_path) -> None:  # type: ignore[no-untyped-def]
    if HAVE_DASK_CUDA:
        pytest.skip("dask-cuda is installed here")
    from clitools import invoke

    from cqsa_dask.store.random_inputs import write_random_inputs

    store = tmp_path / "job.zarr"
    write_random_inputs(store, seq_len=256, heads=1, head_dim=16, dtype="float32", seed=3)
    r = invoke(["run", str(store)], timeout=120, env={"DASK_CQSA__LOCAL_CLUSTER__BACKEND": "dask-cuda"})
    want = ("cqsa: error: cqsa.local-cluster.backend is dask-cuda, but dask_cuda is not installed (pip install "
            "'cqsa-dask[cuda]'); set it to auto or spec (DASK_CQSA__LOCAL_CLUSTER__BACKEND=spec)")
    assert r.returncode == 2 and r.stderr.strip().splitlines() == [want], str(r)
    assert "out" not in zarr.open_group(store, mode="r"), "nothing written"


def test_auto_runs_one_gpu_in_a_thread_and_everything_else_in_processes() -> None:
    """``cqsa.local-cluster.processes: auto`` (the default): a thread of this process for tasks
    on one GPU, this process's first; worker processes for CPU tasks, several GPUs, or a GPU
    other than the first; true and false are obeyed; anything else is refused in one line."""
    from cqsa_dask.client.cluster import visible_gpus

    first = (visible_gpus() or ["0"])[0]  # where none is visible: the name its first device would have
    assert config.get("local-cluster.processes") == "auto"
    assert worker_processes("auto", [first]) is False
    other = "1" if first != "1" else "2"
    assert [worker_processes("auto", g) for g in ([], [first, other], [other], [first, first])] == [True] * 4
    assert (worker_processes(True, [first]), worker_processes(False, [])) == (True, False)
    spec = local_spec(budget_bytes=10**9, resource="device_mem", threads=3, gpus=[first])
    assert not spec.processes and spec.env == {} and choose_backend(spec) == "spec"
    assert local_spec(budget_bytes=10**9, resource="device_mem", threads=2).processes
    with pytest.raises(InvalidInputError, match="processes must be true, false or auto; got 'yes'"):
        worker_processes("yes", [first])


@pytest.mark.gpu
def test_run_with_no_client_on_one_gpu_computes_in_this_process(tmp_path) -> None:  # type: ignore[no-untyped-def]
    """The default on one GPU: ``run()`` with no client starts no worker process (none is this
    process's child while the job runs), its tasks run on the GPU, and the result is exact."""
    import torch
    from reference import check_exact

    import cqsa_dask
    from cqsa_dask.store.random_inputs import write_random_inputs

    store = tmp_path / "job.zarr"
    g = write_random_inputs(store, seq_len=3000, heads=4, kv_heads=2, head_dim=64, dtype="float16", seed=17)
    before = {p.pid for p in psutil.Process().children(recursive=True)}  # e.g. an earlier test's forkserver
    children: list[int] = []

    def progress(done: int, total: int) -> None:
        children.extend(p.pid for p in psutil.Process().children(recursive=True) if p.pid not in before)

    with dask.config.set({**_SMALL, "cqsa.local-cluster.gpus": "0"}):
        res = cqsa_dask.run(store, memory_budget="2GB", causal=True, progress=progress)
    assert res.plan.host_staging and res.peak_device_bytes, res  # sized for, and run on, the GPU
    assert children == [], f"worker processes started: {children}"
    q, k, v = (torch.from_numpy(g[n][...]) for n in ("q", "k", "v"))
    check_exact(q, k, v, torch.from_numpy(g["out"][...]), torch.from_numpy(g["lse"][...]), causal=True,
                scale=None, context="seed 17")


def test_a_threaded_gpu_cluster_is_one_worker_in_this_process(tmp_path) -> None:  # type: ignore[no-untyped-def]
    """``cqsa.local-cluster.processes: false`` with a GPU: the spec backend starts one threaded
    worker here (no environment of its own: it shares this process's devices) and a job on it is
    exact; more than the first GPU is refused in one line."""
    from distributed import Client

    with dask.config.set({**_SMALL, "cqsa.local-cluster.processes": False}):
        spec = local_spec(budget_bytes=3 * 10**8, resource="device_mem", threads=2, gpus=["0"])
        assert choose_backend(spec) == "spec" and "env" not in cluster_kwargs(spec)
        with start(spec, "spec") as cluster, Client(cluster) as c:
            assert set(c.run(os.getpid).values()) == {os.getpid()}, "the worker is a thread of this process"
            _exact_job(c, tmp_path, seed=12)
        for gpus in (["0", "1"], ["1"]):
            with pytest.raises(InvalidInputError, match="threaded local cluster .* first GPU only"):
                local_spec(budget_bytes=3 * 10**8, resource="device_mem", threads=2, gpus=gpus)


@pytest.mark.parametrize("advertised", [None, "just below"])
def test_a_users_cluster_without_the_resource_gets_one_error_saying_how(advertised: str | None) -> None:
    """attention() with the user's own LocalCluster whose workers advertise no ``device_mem``, or
    one byte less than a task needs: SchedulerError naming the bytes and how to advertise them
    (`dask worker --resources`, ``LocalCluster(resources=...)``); the inputs are untouched."""
    from distributed import Client, LocalCluster

    import cqsa_dask
    from cqsa_dask.core.errors import SchedulerError
    from cqsa_dask.core.plan import make_plan

    need = make_plan(seq_len=900, heads=2, head_dim=32, budget="3MB", dtype="float32").task_memory_bytes
    resources = {} if advertised is None else {"device_mem": need - 1}
    gen = _torch.Generator().manual_seed(int.from_bytes(os.urandom(4), "little"))
    q, k, v = (_torch.randn(1, 2, 900, 32, generator=gen) for _ in range(3))
    before = [x.clone() for x in (q, k, v)]
    with LocalCluster(n_workers=1, threads_per_worker=1, processes=False, dashboard_address=":0",
                      resources=resources) as lc, Client(lc) as c, pytest.raises(SchedulerError) as e:
        cqsa_dask.attention(q, k, v, client=c, memory_budget="3MB")
    msg = str(e.value)
    assert f"no worker advertises {need:,} bytes of resource 'device_mem'" in msg, msg
    assert f"--resources device_mem={need}" in msg and f"LocalCluster(resources={{'device_mem': {need}}})" in msg, msg
    assert "\n" not in msg and all(_torch.equal(x, y) for x, y in zip((q, k, v), before))
