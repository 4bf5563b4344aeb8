"""The local cluster (``cqsa run`` without a scheduler): one spec, two ways to start it.

::

    connect() ─> local_spec(budget, resource, threads, gpus)   what the cluster is; cqsa.local-cluster read here
              ─> choose_backend(spec)                          cqsa.local-cluster.backend
              ─> start(spec, backend)                          worker processes spawned with SIGINT ignored
                   "dask-cuda"  CUDACluster(**cuda_cluster_kwargs(spec))      dask-cuda's LocalCUDACluster
                   "spec"       _GPUCluster(spec.gpus, **cluster_kwargs(spec))  the same by hand
                                LocalCluster(n_workers, **cluster_kwargs(spec))  CPU workers (no GPU in use)

Both backends take their parameters from ``cluster_kwargs(spec)``, so they
cannot drift; dask-cuda's adds only what names the devices the other way::

    LocalSpec field      spec backend                         dask-cuda backend
    gpus                 one worker per entry, each seeing    CUDA_VISIBLE_DEVICES=",".join(gpus), n_workers=len:
                         CUDA_VISIBLE_DEVICES=entry           worker i sees the list rotated by i (its own first)
    threads_per_worker   threads_per_worker                   the same
    memory_limit         memory_limit (bytes per worker)      the same
    resources            {resource: budget} per worker        the same
    env                  env, plus CUDA_VISIBLE_DEVICES       the same (CUDACluster keeps it beside the device list)
    dashboard_address    the scheduler's dashboard            the same
    silence_logs         log level of scheduler and workers   the same
    scheduler_preload    scheduler_kwargs={"preload": ...}    the same
                                                              + device_memory_limit=0: no device LRU
                                                                (cqsa keeps no device data in Dask)

dask-cuda adds its own worker preload (a CUDA context on the worker's device
at start) and plugins (CPU affinity to the GPU's NUMA node); cqsa's worker
runtime is set up by the client after start, alike for both.

Backend policy (``cqsa.local-cluster.backend``):

    auto       dask-cuda when the workers are GPUs, ``dask_cuda`` imports, and it can start
               the spec (distinct GPUs, worker processes); otherwise the spec backend
    dask-cuda  that, or InvalidInputError saying why not: a forced backend never falls back
    spec       the hand-made spec, also where dask-cuda is installed
"""

from __future__ import annotations

import ast
import contextlib
import importlib.util
import logging
import signal
import sys
import threading
from collections.abc import Iterator, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal, get_args

from distributed import LocalCluster

from cqsa_dask import config
from cqsa_dask.core.errors import InvalidInputError, SchedulerError

__all__ = ["DASHBOARD_PRELOAD", "Backend", "BackendSetting", "LocalSpec", "choose_backend", "cluster_kwargs",
           "cuda_cluster_kwargs", "local_spec", "parse_backend", "start", "worker_processes"]

log = logging.getLogger(__name__)

Backend = Literal["dask-cuda", "spec"]
BackendSetting = Literal["auto", "dask-cuda", "spec"]

DASHBOARD_PRELOAD = "cqsa_dask.dashboard"


@dataclass(frozen=True)
class LocalSpec:
    """What the local cluster is, whichever backend starts it.

    ``gpus``: device ids (``CUDA_VISIBLE_DEVICES`` entries), one worker each; () = CPU
    workers, ``n_workers`` of them.  ``memory_limit``: host bytes per worker (None: no
    limit).  ``resources``: what each worker advertises (the budget, bytes).
    """

    gpus: tuple[str, ...]
    n_workers: int
    threads_per_worker: int
    processes: bool
    memory_limit: int | None
    resources: Mapping[str, float]
    env: Mapping[str, str]
    dashboard_address: str | None
    silence_logs: int
    scheduler_preload: tuple[str, ...] = (DASHBOARD_PRELOAD,)


def local_spec(*, budget_bytes: int, resource: str, threads: int, gpus: Sequence[str] = ()) -> LocalSpec:
    """The local cluster for ``gpus`` (one worker process each, pinned to it) or, without GPUs,
    ``cqsa.local-cluster.n-workers`` CPU workers; each with ``threads`` threads unless
    ``cqsa.local-cluster.threads-per-worker`` says otherwise, advertising ``budget_bytes`` of
    ``resource``.  The only place that reads ``cqsa.local-cluster``'s sizes."""
    from distributed.worker_memory import parse_memory_limit

    from cqsa_dask.execution.options import RunOptions
    from cqsa_dask.execution.process import worker_env

    def lc(key: str) -> Any:
        return config.get(f"local-cluster.{key}")

    processes = worker_processes(lc("processes"), gpus)
    if gpus and not processes and tuple(gpus) != _first_gpu():
        raise InvalidInputError(
            f"a threaded local cluster (cqsa.local-cluster.processes false) computes in this process, on its first "
            f"GPU only; got GPUs {','.join(gpus)}: give --gpus 0, or let the local cluster start worker processes")
    n_workers = len(gpus) if gpus else int(lc("n-workers"))
    setting = lc("memory-limit")
    try:  # "auto": this machine's memory shared among the workers (as LocalCUDACluster and LocalCluster do)
        memory_limit = parse_memory_limit(setting, 1, max(1, n_workers), logger=log)
    except (ValueError, TypeError):
        raise InvalidInputError(f"cqsa.local-cluster.memory-limit must be 'auto', bytes such as 40GB, a fraction "
                                f"of this machine's memory or 0 (no limit); got {setting!r}") from None
    return LocalSpec(
        gpus=tuple(gpus), n_workers=n_workers,
        threads_per_worker=threads if lc("threads-per-worker") == "auto" else int(lc("threads-per-worker")),
        processes=processes, memory_limit=memory_limit, resources={resource: float(budget_bytes)},
        # worker processes get the allocator setting before torch starts in them (a threaded
        # worker runs in this process, which is the user's: left alone)
        env=worker_env(RunOptions.from_config()) if processes else {},
        dashboard_address=lc("dashboard-address"),
        silence_logs=logging.getLevelName(str(lc("silence-logs")).upper()),
    )


def worker_processes(setting: Any, gpus: Sequence[str]) -> bool:
    """Whether the local cluster's worker runs in processes of its own, by
    ``cqsa.local-cluster.processes`` (``setting``): true, false, or "auto": a thread of this
    process when the tasks run on one GPU, this process's first (``gpus``), worker processes
    otherwise.  A worker process imports distributed, torch and the engine before its first
    task (5-9 s on the H200 machine, docs/benchmarks.md), more than a 1M-token job computes."""
    if setting == "auto":
        return not (len(gpus) == 1 and tuple(gpus) == _first_gpu())
    if isinstance(setting, bool):
        return setting
    raise InvalidInputError(f"cqsa.local-cluster.processes must be true, false or auto; got {setting!r}")


def _first_gpu() -> tuple[str, ...]:
    """(id of this process's first GPU,), as ``local_gpus`` names it ("0" where none is visible:
    the name its first device would have)."""
    from cqsa_dask.client.cluster import visible_gpus

    return tuple(visible_gpus()[:1]) or ("0",)


def cluster_kwargs(spec: LocalSpec) -> dict[str, Any]:
    """Keyword arguments of ``LocalCluster`` (and of ``_GPUCluster`` after the device list) for ``spec``;
    the number of workers and the devices are each backend's own."""
    return {
        "threads_per_worker": spec.threads_per_worker, "processes": spec.processes,
        "memory_limit": spec.memory_limit, "resources": dict(spec.resources),
        **({"env": dict(spec.env)} if spec.processes else {}),
        "dashboard_address": spec.dashboard_address, "silence_logs": spec.silence_logs,
        "scheduler_kwargs": {"preload": list(spec.scheduler_preload)},
    }


def cuda_cluster_kwargs(spec: LocalSpec) -> dict[str, Any]:
    """Keyword arguments of dask-cuda's ``LocalCUDACluster`` (26.10) for ``spec``: ``cluster_kwargs``
    less ``processes`` (dask-cuda always spawns), plus the device list, one worker per device, and
    no device-memory LRU (``device_memory_limit=0``: cqsa keeps no device data in Dask; its
    "default" would size one at 80 % of the device, beside the budget)."""
    assert spec.gpus and spec.processes, "choose_backend admits dask-cuda only for GPU worker processes"
    kwargs = cluster_kwargs(spec)
    del kwargs["processes"]
    return {"CUDA_VISIBLE_DEVICES": ",".join(spec.gpus), "n_workers": len(spec.gpus), "device_memory_limit": 0,
            **kwargs}


def parse_backend(value: Any = None) -> BackendSetting:
    """``cqsa.local-cluster.backend`` (or ``value``), checked."""
    got = config.get("local-cluster.backend", value)
    if got not in get_args(BackendSetting):
        raise InvalidInputError(f"cqsa.local-cluster.backend must be auto, dask-cuda or spec; got {got!r}")
    return got


def choose_backend(spec: LocalSpec, setting: Any = None) -> Backend:
    """The backend that starts ``spec``, by ``cqsa.local-cluster.backend`` (or ``setting``).

    A forced "dask-cuda" that cannot start the spec raises :class:`InvalidInputError`
    with the reason; "auto" then takes the spec backend (logging why when dask-cuda is
    installed but does not import)."""
    wanted = parse_backend(setting)
    if wanted == "spec":
        return "spec"
    unfit = _dask_cuda_unfit(spec)
    if unfit is None:
        return "dask-cuda"
    if wanted == "dask-cuda":
        raise InvalidInputError(f"cqsa.local-cluster.backend is dask-cuda, but {unfit}; set it to auto or spec "
                                "(DASK_CQSA__LOCAL_CLUSTER__BACKEND=spec)")
    if spec.gpus and unfit.startswith("dask_cuda does not import"):
        log.warning("%s; starting the GPU workers without it", unfit)
    return "spec"


def _dask_cuda_unfit(spec: LocalSpec) -> str | None:
    """Why dask-cuda cannot start ``spec`` here (None: it can)."""
    if importlib.util.find_spec("dask_cuda") is None:
        return "dask_cuda is not installed (pip install 'cqsa-dask[cuda]')"
    if not spec.gpus:
        return "this run has no GPU workers (tasks on the CPU, or --gpus none)"
    if len(set(spec.gpus)) < len(spec.gpus):
        return (f"it starts one worker per distinct GPU and the GPUs {','.join(spec.gpus)} repeat one "
                "(workers sharing a GPU)")
    if not spec.processes:
        return "it needs worker processes (cqsa.local-cluster.processes is false)"
    try:
        import dask_cuda  # noqa: F401
    except Exception as e:  # noqa: BLE001  (installed without what it needs: cuda-core, nvidia-ml-py, ...)
        return f"dask_cuda does not import ({type(e).__name__}: {e})"
    return None


def start(spec: LocalSpec, backend: Backend) -> LocalCluster:
    """Start ``spec`` with ``backend`` and wait for its workers; the caller closes it."""
    with _no_sigint_in_children():  # the workers are spawned now, with SIGINT ignored; the job is not
        if backend == "dask-cuda":
            cluster = _start_dask_cuda(spec)
        else:
            try:
                cluster = (_GPUCluster(spec.gpus, **cluster_kwargs(spec)) if spec.gpus
                           else LocalCluster(n_workers=spec.n_workers, **cluster_kwargs(spec)))
            except Exception as e:
                script = _unguarded_script() if spec.processes else None
                if script is None:
                    raise
                raise SchedulerError(
                    f"the local cluster's worker processes did not start ({type(e).__name__}: {e}); each of them "
                    f"imports the calling script {script!r} again, so a script must call cqsa_dask "
                    "under `if __name__ == \"__main__\":`; or set cqsa.local-cluster.processes to false "
                    "(one threaded worker in this process)") from e
    log.info("local cluster (%s backend): %d workers on %s", backend, len(cluster.workers),
             ",".join(spec.gpus) or "the CPU")
    return cluster


def _unguarded_script() -> str | None:
    """The path of the script this process runs as ``python script.py`` when no top-level
    ``if __name__ == "__main__":`` guards its code (None: guarded, an interactive session,
    ``python -m``, unreadable): spawned worker processes import it again and run that code
    (Python's multiprocessing "spawn" start method), a second cluster start included."""
    main = sys.modules.get("__main__")
    path = getattr(main, "__file__", None) if getattr(main, "__spec__", None) is None else None
    if not path:
        return None
    try:
        tree = ast.parse(Path(path).read_bytes())
    except (OSError, SyntaxError, ValueError):
        return None
    guard = {"__name__", "__main__"}
    for node in tree.body:
        test = node.test if isinstance(node, ast.If) else None
        if isinstance(test, ast.Compare) and {_name(test.left), *map(_name, test.comparators)} == guard:
            return None
    return str(path)


def _name(node: ast.expr) -> str | None:
    """``__name__`` for that name, the text of a string constant, else None."""
    if isinstance(node, ast.Name):
        return node.id
    return node.value if isinstance(node, ast.Constant) and isinstance(node.value, str) else None


def _start_dask_cuda(spec: LocalSpec) -> LocalCluster:
    from cqsa_dask.client.cudacluster import CUDACluster

    try:
        cluster: LocalCluster = CUDACluster(**cuda_cluster_kwargs(spec))
    except Exception as e:  # NVML or CUDA unusable where torch works: say which backend failed
        raise SchedulerError(f"dask-cuda's LocalCUDACluster did not start ({type(e).__name__}: {e}); set "
                             "cqsa.local-cluster.backend to spec to start the GPU workers without it") from e
    cluster.wait_for_workers(len(spec.gpus))
    return cluster


class _GPUCluster(LocalCluster):
    """A LocalCluster of one worker process per GPU: worker i sees only device ``gpus[i]``
    (``CUDA_VISIBLE_DEVICES``, set in its nanny's environment before CUDA starts there), so
    its tasks' "cuda" is that GPU.  An id may repeat: two workers then share one GPU, each
    with the whole per-worker budget.  With ``processes=False``: one threaded worker in this
    process, on its first GPU (``local_spec`` admits no other)."""

    def __init__(self, gpus: Sequence[str], **options: Any):
        self._gpus = list(gpus)
        super().__init__(n_workers=0, **options)
        self.scale(len(self._gpus))
        self.wait_for_workers(len(self._gpus))

    def new_worker_spec(self) -> dict[Any, Any]:
        (name, spec), = super().new_worker_spec().items()
        if not self.processes:  # a threaded worker runs in this process, on its first GPU (local_spec)
            return {name: spec}
        gpu = self._gpus[int(name) % len(self._gpus)]
        opts = dict(spec["options"])
        opts["env"] = {**opts.get("env", {}), "CUDA_VISIBLE_DEVICES": gpu}
        return {name: {**spec, "options": opts}}


@contextlib.contextmanager
def _no_sigint_in_children() -> Iterator[None]:
    """Start worker processes with SIGINT ignored: Ctrl-C in a terminal goes to the whole process
    group, and each worker (and its nanny) would print a KeyboardInterrupt traceback.  The user's
    process alone is interrupted; it closes the cluster, which stops the workers.  Python keeps an
    inherited SIG_IGN for SIGINT, so only the start-up window needs the handler changed."""
    if threading.current_thread() is not threading.main_thread():
        yield
        return
    previous = signal.signal(signal.SIGINT, signal.SIG_IGN)
    try:
        yield
    finally:
        signal.signal(signal.SIGINT, previous)
