"""The benchmark's Dask side: a cluster shaped as run() starts one, task records, device peaks.

``Cluster(budget)`` is a LocalCluster with the sizes of ``cqsa.local-cluster``
(threads "auto" resolved as run() does) and resources={resource: budget}: what
run() starts when given no client, minus the start-up, which the runner times
apart.  One cluster per (budget, workers, processes): the resource must equal
the budget.  A worker plugin keeps every cqsa task's result dict (the
per-task profile); ``NvmlPeak`` samples NVML while a run goes (the worker's
own peak, CUDA context and allocator reserve included).

``DashboardRecording``: with --record-dashboard, every cluster also records
the /cqsa page's inputs for benchmarks/dashboard_replay.py.
"""

from __future__ import annotations

import json
import logging
import os
import time
from typing import Any, ClassVar, Self

from distributed.diagnostics.plugin import WorkerPlugin

__all__ = ["Cluster", "Clusters", "DashboardRecording", "NvmlPeak", "TaskRecorder", "collect_tasks", "reset_workers",
           "set_memory_fraction"]

GB = 1e9


class DashboardRecording:
    """Where --record-dashboard writes the /cqsa page's inputs of every cluster closed so far."""

    path: ClassVar[str | None] = None
    inputs: ClassVar[list[Any]] = []
    figures: ClassVar[list[Any]] = []


class NvmlPeak:
    """Peak of NVML's used device memory while the block runs: the device's, and each process's.

    The device figure counts every process (this one's cached SDPA and
    reference memory too); the worker's own peak, CUDA context and the
    caching allocator's reserve included, is ``nvml_worker_peak_bytes``.

    Sampled every 20 ms on a thread; ``result()`` gives the baseline before
    the block and the peak during it, or {} without CUDA or nvidia-ml-py.
    """

    def __init__(self) -> None:
        import threading

        self.handle: Any = None
        try:
            import pynvml
            import torch

            if torch.cuda.is_available():
                pynvml.nvmlInit()
                self.handle = pynvml.nvmlDeviceGetHandleByIndex(torch.cuda.current_device())
        except Exception:  # noqa: BLE001  (no NVML: torch's figures only)
            self.handle = None
        self.stop = threading.Event()
        self.base = self.peak = 0
        self.procs: dict[int, int] = {}  # pid -> peak bytes NVML saw it use
        self.thread = threading.Thread(target=self._watch, daemon=True)

    def _used(self) -> int:
        import pynvml

        return int(pynvml.nvmlDeviceGetMemoryInfo(self.handle).used)

    def _watch(self) -> None:
        import pynvml

        while not self.stop.wait(0.02):
            self.peak = max(self.peak, self._used())
            try:
                for p in pynvml.nvmlDeviceGetComputeRunningProcesses(self.handle):
                    if p.usedGpuMemory is not None:
                        self.procs[p.pid] = max(self.procs.get(p.pid, 0), int(p.usedGpuMemory))
            except pynvml.NVMLError:  # per-process figures unsupported: device totals only
                pass

    def __enter__(self) -> Self:
        if self.handle is not None:
            self.base = self.peak = self._used()
            self.thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        if self.handle is not None:
            self.stop.set()
            self.thread.join()
            self.peak = max(self.peak, self._used())

    def result(self) -> dict[str, int]:
        if self.handle is None:
            return {}
        others = [b for pid, b in self.procs.items() if pid != os.getpid()]
        return {"nvml_baseline_bytes": self.base, "nvml_peak_used_bytes": self.peak,
                "nvml_process_peak_bytes": {str(k): v for k, v in self.procs.items()},
                "nvml_worker_peak_bytes": max(others) if others else None}


# ----------------------------------------------------------------------------- Dask cluster


class TaskRecorder(WorkerPlugin):
    """Keeps the result dict of every cqsa task that finishes on the worker."""

    name = "bench-task-recorder"

    def setup(self, worker: Any) -> None:
        self.worker = worker
        self.records: list[dict[str, Any]] = []

    def teardown(self, worker: Any) -> None:
        pass

    def transition(self, key: Any, start: str, finish: str, *args: Any, **kwargs: Any) -> None:
        if start == "executing" and finish == "memory":
            try:
                v = self.worker.data[key]
            except Exception:  # noqa: BLE001  (spilled or gone: skip)
                return
            if isinstance(v, dict) and v.get("kind") in ("quorum", "merge"):
                self.records.append(v)


def _worker_reset(dask_worker: Any = None) -> None:
    import torch

    if torch.cuda.is_available() and torch.cuda.is_initialized():
        torch.cuda.synchronize()
        torch.cuda.reset_peak_memory_stats()
    p = dask_worker.plugins.get(TaskRecorder.name) if dask_worker is not None else None
    if p is not None:
        p.records.clear()


def _worker_collect(dask_worker: Any = None) -> list[dict[str, Any]]:
    p = dask_worker.plugins.get(TaskRecorder.name)
    return list(p.records) if p is not None else []


def _worker_warm(dtype: str, head_dim: int) -> dict[str, Any]:
    """Create the CUDA context and run the engine's kernel probe in the worker."""
    import torch

    from cqsa_dask import config
    from cqsa_dask.execution.devicethread import on_device
    from cqsa_dask.kernels.attention import attend, resolve_device, select_kernel

    dev = resolve_device(config.get("device"))
    dt = getattr(torch, dtype)
    name = select_kernel(dev, dt, head_dim, config.get("kernel"))  # same positional call as the task's
    q = torch.randn(1, 2, 256, head_dim, device=dev).to(dt)
    for causal in (False, True):  # on the thread the tasks' kernels are queued from
        on_device(dev, lambda c=causal: attend(q, q, q, scale=head_dim**-0.5, diagonal_causal=c, kernel=name))
    if dev.type == "cuda":
        torch.cuda.synchronize()
    return {"device": str(dev), "kernel": name}


def _tiny_job(client: Any, dtype: str, head_dim: int, budget: int) -> dict[str, float]:
    """Run a job of 3 groups (N = 768, H = 2) on ``client`` in a temporary store; its phases."""
    import shutil
    import tempfile

    import cqsa_dask
    from cqsa_dask.store.random_inputs import write_random_inputs

    tmp = tempfile.mkdtemp(prefix="cqsa-warm-")
    try:
        path = os.path.join(tmp, "warm.zarr")
        write_random_inputs(path, seq_len=768, heads=2, head_dim=head_dim, dtype=dtype, seed=1)
        return dict(cqsa_dask.run(path, client=client, memory_budget=budget, groups=3).phases)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)


class Cluster:
    """LocalCluster + Client shaped as run() would start them, with resource = budget."""

    def __init__(self, budget_bytes: int, *, workers: int = 1, processes: bool | None = None):
        import dask
        from distributed import Client, LocalCluster

        import cqsa_dask  # noqa: F401  (registers cqsa defaults)
        from cqsa_dask.client.api import plan_options
        from cqsa_dask.client.cluster import local_gpus
        from cqsa_dask.client.local import cluster_kwargs, local_spec

        opts = plan_options()
        # run()'s own local-cluster spec (threads, memory share, worker env, resource, dashboard
        # plugin, and on one GPU its worker: a thread of this process under processes "auto"), on
        # this machine's CPU-style workers (no per-GPU pinning: a worker uses GPU 0), ``workers`` of
        # them at least and ``processes`` if asked; a dashboard on any free port
        lc = dask.config.get("cqsa.local-cluster")
        wanted = {"cqsa.local-cluster.n-workers": max(int(lc["n-workers"]), workers),
                  **({"cqsa.local-cluster.processes": processes} if processes is not None else {})}
        gpus = local_gpus()[:1] if workers == 1 and opts["host_staging"] else []  # host_staging: CUDA
        with dask.config.set(wanted):
            spec = local_spec(budget_bytes=budget_bytes, resource=str(dask.config.get("cqsa.resource")),
                              threads=opts["tasks_in_flight"] + int(opts["host_staging"]), gpus=gpus)
        t = time.perf_counter()
        self.cluster = LocalCluster(n_workers=spec.n_workers, **{**cluster_kwargs(spec), "dashboard_address": ":0",
                                                                "silence_logs": logging.ERROR})
        self.client = Client(self.cluster)
        self.client.register_plugin(TaskRecorder(), name=TaskRecorder.name)
        if DashboardRecording.path is not None:
            from benchmarks.dashboard_replay import DashboardRecorder

            self.client.register_plugin(DashboardRecorder(), name=DashboardRecorder.name)
        self.start_seconds = time.perf_counter() - t
        self.key = (budget_bytes, workers, processes)
        self.warmed: dict[tuple[str, int], Any] = {}

    def warm(self, dtype: str, head_dim: int) -> Any:
        """CUDA context and the engine's kernel probe in every worker, then a tiny job through
        ``run()`` (the worker runtime, the client's first-run set-up), once per (dtype, D).

        A cluster that ran a job before is what "warm" means: the first job on a fresh cluster
        measured 0.9-1.1 s from the call to its graph against 0.06-0.08 s for the next ones
        (H200, 2026-12-03, ``JobResult.phases["prepared"]``)."""
        if (dtype, head_dim) not in self.warmed:
            t = time.perf_counter()
            r = next(iter(self.client.run(_worker_warm, dtype, head_dim).values()))
            r["first_job_phases"] = _tiny_job(self.client, dtype, head_dim, self.key[0])
            r["seconds"] = time.perf_counter() - t
            self.warmed[(dtype, head_dim)] = r
        return self.warmed[(dtype, head_dim)]

    def close(self) -> None:
        if DashboardRecording.path is not None:
            from benchmarks.dashboard_replay import fetch

            got = fetch(self.client)
            DashboardRecording.inputs.extend(got["inputs"])
            DashboardRecording.figures.extend(got["figures"])
            with open(DashboardRecording.path, "w") as f:
                json.dump({"inputs": DashboardRecording.inputs, "figures": DashboardRecording.figures}, f)
        self.client.close()
        self.cluster.close()


class Clusters:
    """One cluster per (budget, workers, processes), the last one kept."""

    def __init__(self) -> None:
        self.current: Cluster | None = None

    def get(self, budget_bytes: int, *, workers: int = 1, processes: bool | None = None) -> Cluster:
        if self.current is not None and self.current.key == (budget_bytes, workers, processes):
            return self.current
        self.close()
        self.current = Cluster(budget_bytes, workers=workers, processes=processes)
        return self.current

    def forget(self) -> None:
        """The current cluster was closed elsewhere (a time-boxed run)."""
        self.current = None

    def close(self) -> None:
        if self.current is not None:
            self.current.close()
            self.current = None


def reset_workers(client: Any) -> None:
    """Reset every worker's device peak statistics and task records."""
    client.run(_worker_reset)


def collect_tasks(client: Any) -> list[dict[str, Any]]:
    """The result dicts of the cqsa tasks every worker finished since the last reset."""
    return [r for rs in client.run(_worker_collect).values() for r in rs]


def set_memory_fraction(fraction: float) -> None:
    """Cap this process's CUDA memory at ``fraction`` of the device (1.0: no cap)."""
    import torch

    torch.cuda.empty_cache()
    torch.cuda.set_per_process_memory_fraction(fraction)
