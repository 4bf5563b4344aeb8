"""Benchmarks of cqsa_dask against in-memory torch SDPA, and correctness on the device.

Each performance case measures, in one process and one run, side by side:

    torch SDPA on the whole problem in memory    (inputs drawn with randn on the device)
    cqsa_dask.run end to end on a Zarr store     (store written beforehand, timed apart)

and records wall time, TFLOP/s (4 B H N^2 D, causal counts half), tokens/s,
peak device memory, bytes read and written, the plan, the kernel and the
error of sampled rows against float64.  The Dask cluster is started by this
script (LocalCluster with the sizes of ``cqsa.local-cluster`` and
resources={"device_mem": budget}) and passed as ``client=``, so cluster start
is not in the cqsa time; the worker is warmed (CUDA context, kernel probe)
before timing, as SDPA is.

Suites::

    cpu   N = 32,768, H = 2, D = 64, float32, budget forcing >= 7 groups;
          non-causal and causal; against CPU SDPA, the two alternating
          (--rounds) because other work on the 2 cores distorts timings
    gpu   (a) correctness on CUDA, N ~ 3000, W = 7 and 13, bf16/fp16/fp32,
              causal or not, GQA, D = 64/128, against float64 (whole output)
          (b) B=1, H=4, D=128, bf16: N = 262,144 and 1,048,576 at 4 GB,
              1,048,576 causal at 4 GB
          (c) N = 1,048,576 at 1, 2, 8 GB (while the deadline allows)
          (d) N = 4,194,304 at 4 GB, non-causal and causal
          (e) N = 4,194,304 at 16, 8, 2, 1 GB (cqsa alone)
          (f) out of memory: the process capped at 4 GB, SDPA fails, cqsa completes
          (g) N = 2M, 8M, 16M at 4 GB (cqsa alone: the N^2 fit with 1M and 4M)
          d-g only when asked (--parts), in the order of --cases ("oom" for f)

Usage::

    python benchmarks/bench.py --suite cpu --out docs/benchmarks.json
    python benchmarks/bench.py --suite gpu --out $OUT/gpu.json        # on the GPU machine
    python benchmarks/bench.py --suite gpu --parts bd --cases n4M-4GB n1M-4GB --label gpu-4M --out $OUT/gpu2.json
    python benchmarks/bench.py --suite gpu --tiny --out /tmp/tiny.json  # gpu code path, CPU, tiny sizes
    python benchmarks/bench.py --merge gpu.json --out docs/benchmarks.json
    python benchmarks/bench.py --plot docs/benchmarks.json --plot-dir docs

``--out`` holds {"suites": {name: record}}; a run replaces only its own
suite's record, and the file is rewritten after every case, so a run cut
short still leaves the cases it finished.
"""

from __future__ import annotations

import argparse
import datetime as _dt
import json
import logging
import math
import os
import platform
import resource as _resource
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from typing import Any, Self

from distributed.diagnostics.plugin import WorkerPlugin

GB = 1e9
T0 = time.perf_counter()


def log(msg: str) -> None:
    print(f"[{time.perf_counter() - T0:7.1f}s] {msg}", flush=True)


# ----------------------------------------------------------------------------- records


class Record:
    """The suite's JSON record, rewritten into ``path`` after every change."""

    def __init__(self, path: str, suite: str, data: dict[str, Any]):
        self.path, self.suite, self.data = path, suite, data

    def save(self) -> None:
        doc: dict[str, Any] = {"suites": {}}
        if os.path.exists(self.path):
            try:
                with open(self.path) as f:
                    doc = json.load(f)
                doc.setdefault("suites", {})
            except (OSError, ValueError):
                doc = {"suites": {}}
        doc["suites"][self.suite] = self.data
        os.makedirs(os.path.dirname(os.path.abspath(self.path)), exist_ok=True)
        tmp = self.path + ".tmp"
        with open(tmp, "w") as f:
            json.dump(doc, f, indent=1, sort_keys=True, default=_json_default)
        os.replace(tmp, self.path)


def _json_default(o: Any) -> Any:
    if hasattr(o, "item"):
        return o.item()
    if isinstance(o, float) and not math.isfinite(o):
        return None
    return str(o)


def environment() -> dict[str, Any]:
    import dask
    import distributed
    import numcodecs
    import numpy
    import torch
    import zarr

    import cqsa_dask

    env: dict[str, Any] = {
        "date_utc": _dt.datetime.now(_dt.UTC).isoformat(timespec="seconds"),
        "python": sys.version.split()[0], "platform": platform.platform(),
        "cpu": _cpu_model(), "cpu_count": os.cpu_count(), "ram_gb": _ram_gb(),
        "torch": torch.__version__, "cuda": torch.version.cuda,
        "cudnn": torch.backends.cudnn.version() if torch.backends.cudnn.is_available() else None,
        "dask": dask.__version__, "distributed": distributed.__version__, "zarr": zarr.__version__,
        "numcodecs": numcodecs.__version__, "numpy": numpy.__version__,
        "cqsa_dask": cqsa_dask.__version__, "git_commit": _git_commit(), "git_dirty": _git_dirty(),
        "cqsa_source_sha256": _source_hash(os.path.dirname(cqsa_dask.__file__)),
        "torch_threads": torch.get_num_threads(),
        "cqsa_config": dask.config.get("cqsa"),
    }
    if torch.cuda.is_available():
        p = torch.cuda.get_device_properties(0)
        env.update(gpu=p.name, gpu_memory_gb=p.total_memory / GB, gpu_count=torch.cuda.device_count())
    return env


def _cpu_model() -> str:
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith("model name"):
                    return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor()


def _ram_gb() -> float | None:
    try:
        with open("/proc/meminfo") as f:
            return int(f.readline().split()[1]) * 1024 / GB
    except (OSError, ValueError, IndexError):
        return None


def _source_hash(folder: str) -> str:
    """sha256 over the engine's .py and .yaml files: says which code ran, with or without git."""
    import hashlib

    h = hashlib.sha256()
    for name in sorted(os.listdir(folder)):
        if name.endswith((".py", ".yaml")):
            with open(os.path.join(folder, name), "rb") as f:
                h.update(name.encode() + b"\0" + f.read())
    return h.hexdigest()[:16]


def _git_dirty() -> str | None:
    try:
        here = os.path.dirname(os.path.abspath(__file__))
        r = subprocess.run(["git", "-C", here, "status", "--short", "--", "../cqsa_dask"],
                           check=False, capture_output=True, text=True, timeout=5)
        return r.stdout.strip() if r.returncode == 0 else None
    except (OSError, subprocess.SubprocessError):
        return None


def _git_commit() -> str | None:
    try:
        here = os.path.dirname(os.path.abspath(__file__))
        r = subprocess.run(["git", "-C", here, "rev-parse", "HEAD"], check=False, capture_output=True, text=True,
                           timeout=5)
        return r.stdout.strip() or None
    except (OSError, subprocess.SubprocessError):
        return None


# ----------------------------------------------------------------------------- in-memory SDPA


_TORCH_DTYPES = {"float32": "float32", "float16": "float16", "bfloat16": "bfloat16"}


def _dtype(name: str) -> Any:
    import torch

    return getattr(torch, name)


def attention_flops(b: int, h: int, n: int, d: int, causal: bool) -> int:
    """4 B H D times the number of (query, key) pairs; causal: N(N+1)/2."""
    pairs = n * (n + 1) // 2 if causal else n * n
    return 4 * b * h * d * pairs


def sdpa_in_memory(*, b: int, h: int, n: int, d: int, dtype: str, causal: bool, device: str,
                   reps: int, warmup: int, seed: int = 0) -> dict[str, Any]:
    """Time torch SDPA on (B, H, N, D) randn inputs made on ``device``.

    CUDA: cuDNN backend, else flash; CUDA events; peak = max_memory_reserved
    (and allocated) since a reset taken before the inputs were made.
    CPU: the default backend; perf_counter; peak = growth of the process RSS
    high-water mark (approximate).
    """
    import torch
    import torch.nn.functional as F

    dt = _dtype(dtype)
    cuda = device.startswith("cuda")
    if cuda:
        torch.cuda.synchronize()
        torch.cuda.empty_cache()
        torch.cuda.reset_peak_memory_stats()
    rss0 = _resource.getrusage(_resource.RUSAGE_SELF).ru_maxrss * 1024
    g = torch.Generator(device=device).manual_seed(seed)
    q, k, v = (torch.randn(b, h, n, d, device=device, dtype=dt, generator=g) for _ in range(3))
    backends = _cuda_backends() if cuda else [None]
    chosen, last_err = None, None
    times: list[float] = []
    o: Any = None
    for be in backends:
        try:
            if cuda and warmup == 0:  # large N: warm the backend on a small shape first
                with _backend(be):
                    F.scaled_dot_product_attention(q[:, :, :65536], k[:, :, :65536], v[:, :, :65536],
                                                   is_causal=causal)
                torch.cuda.synchronize()
            t = time.perf_counter()
            with _backend(be):
                o = F.scaled_dot_product_attention(q, k, v, is_causal=causal)
            if cuda:
                torch.cuda.synchronize()
            probe = time.perf_counter() - t
            chosen = be
            break
        except RuntimeError as e:
            last_err = e
            log(f"  SDPA backend {be} failed: {str(e).splitlines()[0][:200]}")
    if chosen is None and backends != [None]:
        raise RuntimeError(f"no SDPA backend ran: {last_err}")
    if warmup == 0:  # the full-size probe is the first timed rep (host clock after a sync)
        times.append(probe)
        reps -= 1
    with _backend(chosen):
        for _ in range(max(0, warmup - 1)):  # the probe above was the first warm-up
            o = None  # free the last output first: one output buffer, as a single call has
            o = F.scaled_dot_product_attention(q, k, v, is_causal=causal)
        for _ in range(reps):
            o = None
            if cuda:
                e0, e1 = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
                e0.record()
                o = F.scaled_dot_product_attention(q, k, v, is_causal=causal)
                e1.record()
                torch.cuda.synchronize()
                times.append(e0.elapsed_time(e1) / 1e3)
            else:
                t = time.perf_counter()
                o = F.scaled_dot_product_attention(q, k, v, is_causal=causal)
                times.append(time.perf_counter() - t)
    if not bool(torch.isfinite(o).all()):
        raise RuntimeError("SDPA returned non-finite values")
    sec = statistics.median(times)
    flops = attention_flops(b, h, n, d, causal)
    rec: dict[str, Any] = {
        "backend": str(chosen).split(".")[-1] if chosen is not None else "default (cpu)",
        "device": device, "seconds": sec, "seconds_all": times, "reps": len(times),
        "tflops": flops / sec / 1e12, "tokens_per_s": b * n / sec,
    }
    if cuda:
        rec["peak_reserved_bytes"] = int(torch.cuda.max_memory_reserved())
        rec["peak_allocated_bytes"] = int(torch.cuda.max_memory_allocated())
    else:
        rec["peak_rss_growth_bytes"] = _resource.getrusage(_resource.RUSAGE_SELF).ru_maxrss * 1024 - rss0
    del q, k, v, o
    if cuda:
        torch.cuda.empty_cache()
    return rec


def _cuda_backends() -> list[Any]:
    from torch.nn.attention import SDPBackend

    return [SDPBackend.CUDNN_ATTENTION, SDPBackend.FLASH_ATTENTION]


def _backend(be: Any) -> Any:
    import contextlib

    if be is None:
        return contextlib.nullcontext()
    from torch.nn.attention import sdpa_kernel

    return sdpa_kernel([be])


def ceilings(device: str) -> dict[str, Any]:
    """Dense bf16 matmul rate and pageable/pinned host-to-device copy rates."""
    import torch

    if not device.startswith("cuda"):
        return {}
    out: dict[str, Any] = {}
    a = torch.randn(8192, 8192, device=device, dtype=torch.bfloat16)
    bm = torch.randn(8192, 8192, device=device, dtype=torch.bfloat16)
    for _ in range(3):
        a @ bm
    torch.cuda.synchronize()
    e0, e1 = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
    e0.record()
    for _ in range(20):
        a @ bm
    e1.record()
    torch.cuda.synchronize()
    out["matmul_bf16_8192_tflops"] = 20 * 2 * 8192**3 / (e0.elapsed_time(e1) / 1e3) / 1e12
    del a, bm
    host = torch.randn(128 * 2**20).to(torch.bfloat16)  # 256 MiB
    for name, src in (("pageable", host), ("pinned", host.pin_memory())):
        src.to(device)
        torch.cuda.synchronize()
        t = time.perf_counter()
        for _ in range(3):
            src.to(device)
        torch.cuda.synchronize()
        out[f"h2d_{name}_gb_s"] = 3 * src.nbytes / (time.perf_counter() - t) / GB
    torch.cuda.empty_cache()
    return out


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


# --record-dashboard: {"path", "inputs", "figures"} of every cluster closed so far
DASHBOARD_RECORD: dict[str, Any] | None = None


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
    from cqsa_dask.kernels.attention import attend, resolve_device, select_kernel

    dev = resolve_device(config.get("device"))
    dt = getattr(torch, dtype)
    name = select_kernel(dev, dt, head_dim, config.get("kernel"))  # same positional call as the task's
    q = torch.randn(1, 2, 256, head_dim, device=dev).to(dt)
    attend(q, q, q, scale=head_dim**-0.5, diagonal_causal=False, kernel=name)
    attend(q, q, q, scale=head_dim**-0.5, diagonal_causal=True, kernel=name)
    if dev.type == "cuda":
        torch.cuda.synchronize()
    return {"device": str(dev), "kernel": name}


class Cluster:
    """LocalCluster + Client shaped as run() would start them, with resource = budget."""

    def __init__(self, budget_bytes: int):
        import dask
        from distributed import Client, LocalCluster

        import cqsa_dask  # noqa: F401  (registers cqsa defaults)
        from cqsa_dask.client.api import plan_options
        from cqsa_dask.client.cluster import DASHBOARD_PRELOAD

        lc = dask.config.get("cqsa.local-cluster")
        res = str(dask.config.get("cqsa.resource"))
        threads = dask.config.get("cqsa.local-cluster.threads-per-worker")  # "auto": tasks in flight + 1, as run()
        opts = plan_options()
        threads = opts["tasks_in_flight"] + int(opts["host_staging"]) if threads == "auto" else int(threads)
        t = time.perf_counter()
        self.cluster = LocalCluster(
            n_workers=int(lc["n-workers"]), threads_per_worker=threads,
            processes=bool(lc["processes"]), dashboard_address=":0",
            resources={res: float(budget_bytes)}, silence_logs=logging.ERROR,
            scheduler_kwargs={"preload": [DASHBOARD_PRELOAD]},  # the /cqsa page's plugin, as run()'s cluster
        )
        self.client = Client(self.cluster)
        self.client.register_plugin(TaskRecorder(), name=TaskRecorder.name)
        if DASHBOARD_RECORD is not None:  # --record-dashboard: the /cqsa page's inputs, for a replay
            from dashboard_replay import DashboardRecorder

            self.client.register_plugin(DashboardRecorder(), name=DashboardRecorder.name)
        self.start_seconds = time.perf_counter() - t
        self.budget_bytes = budget_bytes
        self.warmed: dict[tuple[str, int], Any] = {}

    def warm(self, dtype: str, head_dim: int) -> Any:
        if (dtype, head_dim) not in self.warmed:
            t = time.perf_counter()
            r = next(iter(self.client.run(_worker_warm, dtype, head_dim).values()))
            r["seconds"] = time.perf_counter() - t
            self.warmed[(dtype, head_dim)] = r
        return self.warmed[(dtype, head_dim)]

    def close(self) -> None:
        if DASHBOARD_RECORD is not None:
            from dashboard_replay import fetch

            got = fetch(self.client)
            for k in ("inputs", "figures"):
                DASHBOARD_RECORD[k].extend(got[k])
            with open(DASHBOARD_RECORD["path"], "w") as f:
                json.dump({k: DASHBOARD_RECORD[k] for k in ("inputs", "figures")}, f)
        self.client.close()
        self.cluster.close()


class Clusters:
    """One cluster per budget (the resource must equal the budget), the last one kept."""

    def __init__(self) -> None:
        self.current: Cluster | None = None

    def get(self, budget_bytes: int) -> Cluster:
        if self.current is not None and self.current.budget_bytes == budget_bytes:
            return self.current
        self.close()
        log(f"  starting LocalCluster with device_mem={budget_bytes / GB:.3g} GB")
        self.current = Cluster(budget_bytes)
        log(f"  cluster up in {self.current.start_seconds:.1f}s")
        return self.current

    def close(self) -> None:
        if self.current is not None:
            self.current.close()
            self.current = None


def cqsa_run(cl: Cluster, store: str, *, causal: bool, budget_bytes: int, dtype: str, head_dim: int,
             groups: int | None = None, reps: int = 1, time_box: float | None = None) -> dict[str, Any]:
    """cqsa_dask.run on ``store`` with client=cl.client; ``reps`` fresh runs (restart=True).

    ``time_box``: stop a run still going after that many seconds by closing
    ``cl`` (its workers with it); the record then has ``stopped_after`` and
    the figures of the quorum tasks that finished (count, largest device
    peak) instead of a time: for a case longer than the session allows.
    """
    import threading

    import cqsa_dask

    warm = cl.warm(dtype, head_dim)
    walls, execs, res, tasks = [], [], None, []
    for _ in range(reps):
        cl.client.run(_worker_reset)
        _clear_job(store)
        box: dict[str, Any] = {}

        def go(box: dict[str, Any]) -> None:
            try:
                box["res"] = cqsa_dask.run(store, causal=causal, memory_budget=budget_bytes, client=cl.client,
                                           groups=groups, restart=True)
            except BaseException as e:  # noqa: BLE001  (re-raised below, or the stop's consequence)
                box["error"] = e

        with NvmlPeak() as nv:
            t, t_unix = time.perf_counter(), time.time()
            th = threading.Thread(target=go, args=(box,), name="bench-cqsa-run", daemon=True)
            th.start()
            th.join(time_box)
            if th.is_alive():
                log(f"  stopping the run after {time_box:.0f}s (time box): closing its cluster")
                done = [r for rs in cl.client.run(_worker_collect).values() for r in rs]  # before the workers go
                cl.close()
                th.join(120)
                return {"stopped_after": time.perf_counter() - t, **_finished_so_far(store), **nv.result(),
                        "peak_device_reserved_bytes": _max_reserved(done),
                        "timeline": timeline(store, t_unix), "worker": warm}
            walls.append(time.perf_counter() - t)
        if "error" in box:
            raise box["error"]
        res = box["res"]
        execs.append(res.seconds)
        tasks = [r for rs in cl.client.run(_worker_collect).values() for r in rs]
    assert res is not None
    p = res.plan
    sec = statistics.median(walls)
    return {
        "seconds": sec, "seconds_all": walls, "execute_seconds": statistics.median(execs),
        "tflops": p.flops / sec / 1e12, "tokens_per_s": p.batch * p.seq_len / sec,
        "peak_device_bytes": res.peak_device_bytes,
        "peak_device_reserved_bytes": _max_reserved(tasks),
        "bytes_read": res.bytes_read,
        "bytes_written": res.bytes_written, "kernels": list(res.kernels),
        "quorum_tasks_run": res.quorum_tasks_run, "merges_run": res.merges_run,
        "plan": _plan_figures(p.to_dict()),
        "worker": warm, "tasks": summarize_tasks(tasks), "partials": p.partials, **nv.result(),
        "timeline": timeline(store, t_unix),
    }


def _max_reserved(tasks: list[dict[str, Any]]) -> int | None:
    """The largest reserved peak the quorum task records ``tasks`` report (None on the CPU)."""
    return max((r["peak_device_reserved_bytes"] for r in tasks if r.get("peak_device_reserved_bytes") is not None),
               default=None)


def _plan_figures(plan: dict[str, Any]) -> dict[str, Any]:
    """The figures of a plan dict that the record keeps."""
    keep = ("groups", "quorum_size", "heads_per_task", "task_memory_bytes", "group_size", "tasks", "merges",
            "flops", "bytes_read", "bytes_written", "budget_bytes")
    return {k: v for k, v in plan.items() if k in keep}


def _finished_so_far(store: str) -> dict[str, Any]:
    """The plan, and the quorum tasks finished (count, largest device peak) of a stopped job."""
    import numpy as np
    import zarr

    from cqsa_dask.store.layout import STAT_FIELDS

    eng = zarr.open_group(store, mode="r")["_cqsa"]
    plan = dict(eng.attrs["plan"])  # type: ignore[arg-type]
    stats = np.asarray(eng["task_stats"][...])  # type: ignore[index]
    done = np.isfinite(stats[..., 0])
    peaks = stats[..., STAT_FIELDS.index("peak_device_bytes")][done]
    peaks = peaks[np.isfinite(peaks)]
    return {"quorum_tasks_done": int(done.sum()), "peak_device_bytes": int(peaks.max()) if peaks.size else None,
            "plan": _plan_figures(plan)}


def timeline(store: str, t0: float) -> dict[str, Any]:
    """The last run's per-task records from the store (``_cqsa/task_stats``, ``merge_stats``):
    rows [i, b, j, start - t0, seconds, compute s, io s, bytes read, bytes written], for
    reading where the time went (which task waited, when the merges ran) after the run."""
    import numpy as np
    import zarr

    out: dict[str, Any] = {"fields": ["i", "b", "j", "start", "seconds", "compute_s", "io_s", "read", "written"]}
    for kind, name in (("quorum", "task_stats"), ("merge", "merge_stats")):
        try:
            a = np.asarray(zarr.open_group(store, mode="r")["_cqsa"][name][...])  # type: ignore[index]
        except (KeyError, FileNotFoundError):
            continue
        rows = []
        for idx in zip(*np.nonzero(np.isfinite(a[..., 0]))):
            r = a[idx]
            rows.append([int(x) for x in idx] + [round(float(r[0]) - t0, 4)]
                        + [None if not np.isfinite(v) else round(float(v), 4) for v in r[1:6]])
        out[kind] = sorted(rows, key=lambda row: row[3])
    return out


def _clear_job(store: str) -> None:
    """Delete the previous run's outputs and engine state (untimed): a job on a fresh store does
    not pay for removing another job's files, which took up to 7 s after a 4M job (22 GB)."""
    for name in ("out", "lse", "_cqsa"):
        shutil.rmtree(os.path.join(store, name), ignore_errors=True)


def summarize_tasks(tasks: list[dict[str, Any]]) -> dict[str, Any]:
    """Summed task-side seconds (one worker, so sums over concurrent threads can exceed wall)."""
    q = [t for t in tasks if t["kind"] == "quorum"]
    m = [t for t in tasks if t["kind"] == "merge"]
    return {
        "quorum_count": len(q), "merge_count": len(m),
        "quorum_seconds": sum(t["seconds"] for t in q),
        "quorum_compute_seconds": sum(t.get("compute_seconds", 0.0) for t in q),
        "quorum_io_seconds": sum(t.get("io_seconds", 0.0) for t in q),
        "merge_seconds": sum(t["seconds"] for t in m),
        "quorum_bytes_read": sum(t["bytes_read"] for t in q),
        "quorum_bytes_written": sum(t["bytes_written"] for t in q),
        "merge_bytes_read": sum(t["bytes_read"] for t in m),
        "merge_bytes_written": sum(t["bytes_written"] for t in m),
    }


# ----------------------------------------------------------------------------- float64 checks


def sampled_reference(group: Any, rows: list[tuple[int, int, int]], *, causal: bool, scale: float,
                      device: str, chunk: int = 32768) -> dict[tuple[int, int, int], tuple[Any, float]]:
    """Float64 (out (D,), lse) of ``rows``, streaming k, v once for all rows.

    The same online-softmax reference as cqsa_dask.tools.verify.reference_row, batched
    over the rows so that each chunk of k and v is read once instead of once
    per row (at N = 1M that is 2 GB per row).
    """
    import torch

    from cqsa_dask.store.layout import input_info, logical_dtype, read_block

    info = input_info(group)
    dt = logical_dtype(group["q"])
    rep = info.heads_q // info.heads_kv
    refs: dict[tuple[int, int, int], tuple[Any, float]] = {}
    for b in sorted({r[0] for r in rows}):
        rs = [r for r in rows if r[0] == b]
        q = torch.stack([read_block(group["q"], (b, h, n), dt) for _, h, n in rs]).to(device, torch.float64)
        kh = torch.tensor([h // rep for _, h, _ in rs], device=device)
        pos = torch.tensor([n for _, _, n in rs], device=device)
        m = torch.full((len(rs),), -math.inf, dtype=torch.float64, device=device)
        s = torch.zeros(len(rs), dtype=torch.float64, device=device)
        acc = torch.zeros(len(rs), info.head_dim, dtype=torch.float64, device=device)
        stop = max(n for _, _, n in rs) + 1 if causal else info.seq_len
        for c0 in range(0, stop, chunk):
            c1 = min(stop, c0 + chunk)
            k = read_block(group["k"], (b, slice(None), slice(c0, c1)), dt).to(device, torch.float64)  # (Hkv, C, D)
            v = read_block(group["v"], (b, slice(None), slice(c0, c1)), dt).to(device, torch.float64)
            logits = torch.bmm(k[kh], q[:, :, None])[..., 0] * scale  # (R, C)
            if causal:
                keys = torch.arange(c0, c1, device=device)
                logits = logits.masked_fill(keys[None, :] > pos[:, None], -math.inf)
            m_new = torch.maximum(m, logits.max(dim=1).values)  # finite: chunk 0 holds key 0
            w = torch.exp(logits - m_new[:, None])
            corr = torch.exp(m - m_new)
            acc = acc * corr[:, None] + torch.bmm(w[:, None, :], v[kh])[:, 0]
            s = s * corr + w.sum(dim=1)
            m = m_new
        out, lse = (acc / s[:, None]).cpu().numpy(), (m + torch.log(s)).cpu().numpy()
        for i, r in enumerate(rs):
            refs[r] = (out[i], float(lse[i]))
    return refs


def compare_rows(group: Any, refs: dict[tuple[int, int, int], tuple[Any, float]]) -> dict[str, Any]:
    """Max errors of out/lse on the rows of ``refs``, as verify.check_rows reports them."""
    import numpy as np

    from cqsa_dask.store.layout import logical_dtype, read_block

    dt = logical_dtype(group["out"])
    abs_o = rel_o = abs_l = 0.0
    for (b, h, n), (ref, ref_lse) in refs.items():
        got = read_block(group["out"], (b, h, n), dt).double().numpy()
        lse = float(np.asarray(group["lse"][b, h, n]))
        err = float(np.abs(got - ref).max()) if np.isfinite(got).all() else math.inf
        abs_o = max(abs_o, err)
        rel_o = max(rel_o, err / max(float(np.abs(ref).max()), 1e-30))
        abs_l = max(abs_l, abs(lse - ref_lse) if math.isfinite(lse) else math.inf)
    return {"rows": len(refs), "max_abs_out": abs_o, "max_rel_out": rel_o, "max_abs_lse": abs_l}


def full_reference_errors(group: Any, *, causal: bool, scale: float, device: str) -> dict[str, Any]:
    """Whole-output errors of the store's out/lse, and of SDPA in the same dtype, against float64."""
    import torch
    import torch.nn.functional as F

    from cqsa_dask.store.layout import logical_dtype, read_block

    dt = logical_dtype(group["q"])
    q, k, v = (read_block(group[n], (...,), dt).to(device) for n in ("q", "k", "v"))  # (B, H, N, D)
    rep = q.shape[1] // k.shape[1]
    k, v = k.repeat_interleave(rep, dim=1), v.repeat_interleave(rep, dim=1)
    n = q.shape[2]
    s = torch.matmul(q.double(), k.double().transpose(-1, -2)) * scale  # (B, H, N, N)
    if causal:
        s = s.masked_fill(torch.ones(n, n, dtype=torch.bool, device=device).triu(1), -math.inf)
    ref_lse = torch.logsumexp(s, dim=-1)
    ref = torch.matmul(torch.exp(s - ref_lse[..., None]), v.double())
    del s
    out = read_block(group["out"], (...,), dt).to(device).double()
    lse = read_block(group["lse"], (...,), "float32").to(device).double()
    sdpa = F.scaled_dot_product_attention(q, k, v, is_causal=causal, scale=scale).double()

    def errs(o: Any, l: Any | None) -> dict[str, Any]:
        d = {"max_abs_out": float((o - ref).abs().max()),
             "rel_fro_out": float(torch.linalg.vector_norm(o - ref) / torch.linalg.vector_norm(ref)),
             "finite": bool(torch.isfinite(o).all())}
        if l is not None:
            d["max_abs_lse"] = float((l - ref_lse).abs().max())
        return d

    return {"cqsa": errs(out, lse), "sdpa_same_dtype": errs(sdpa, None)}


# ----------------------------------------------------------------------------- cases


def write_store(path: str, *, n: int, h: int, hkv: int, d: int, dtype: str, seed: int) -> dict[str, Any]:
    from cqsa_dask.store.random_inputs import make_synthetic_store

    shutil.rmtree(path, ignore_errors=True)
    t = time.perf_counter()
    make_synthetic_store(path, seq_len=n, heads=h, kv_heads=hkv, head_dim=d, batch=1, dtype=dtype, seed=seed)
    sec = time.perf_counter() - t
    e = 4 if dtype == "float32" else 2
    nbytes = n * d * e * (h + 2 * hkv)
    return {"seconds": sec, "bytes": nbytes, "gb_per_s": nbytes / sec / GB}


def write_synthetic_store(path: str, *, n: int, h: int, hkv: int, d: int, dtype: str, seed: int) -> dict[str, Any]:
    """A store whose q, k, v are generated by the tasks that use them (docs/synthetic.md)."""
    from cqsa_dask.store.generated import SyntheticSource, create_synthetic_store

    shutil.rmtree(path, ignore_errors=True)
    src = SyntheticSource(seq_len=n, heads_q=h, heads_kv=hkv, head_dim=d, dtype=dtype, seed=seed)
    create_synthetic_store(path, src)
    return {"synthetic": True, "source": src.to_attrs(), "bytes": 0, "seconds": 0.0}


def zarr_read_rate(path: str, device: str) -> dict[str, Any]:
    """Read all of k once (sync, as tasks do) and copy it to the device: GB/s of each."""
    import torch
    import zarr

    from cqsa_dask.store.layout import logical_dtype, read_block

    g = zarr.open_group(path, mode="r")
    t = time.perf_counter()
    arr = g["k"]
    assert isinstance(arr, zarr.Array)
    k = read_block(arr, (...,), logical_dtype(arr))
    tr = time.perf_counter() - t
    rec = {"zarr_read_gb_s": k.nbytes / tr / GB, "bytes": k.nbytes}
    if device.startswith("cuda"):
        torch.cuda.synchronize()
        t = time.perf_counter()
        k.to(device)
        torch.cuda.synchronize()
        rec["h2d_pageable_gb_s"] = k.nbytes / (time.perf_counter() - t) / GB
        torch.cuda.empty_cache()
    return rec


def correctness_cases(tiny: bool) -> list[dict[str, Any]]:
    """12 cases: W in {7, 13} x dtype x causal, GQA and D alternating so each dtype sees both."""
    n = 300 if tiny else 3000
    cases = []
    i = 0
    for dtype in ("bfloat16", "float16", "float32"):
        for causal in (False, True):
            for w in (7, 13):
                gqa = i % 2 == 0
                d = 128 if (i // 2) % 2 == 0 else 64
                cases.append({"name": f"c{i:02d}", "n": n + (i % 3), "h": 4, "hkv": 2 if gqa else 4, "d": d,
                              "dtype": dtype, "causal": causal, "groups": w})
                i += 1
    return cases


_BOUND = {"float32": 1e-4, "float16": 5e-3, "bfloat16": 2e-2}


def run_correctness(rec: Record, clusters: Clusters, *, device: str, workdir: str, tiny: bool) -> None:
    import zarr

    rec.data.setdefault("correctness", [])
    cl = clusters.get(int(1e9))
    for c in correctness_cases(tiny):
        path = os.path.join(workdir, "corr.zarr")
        try:
            write_store(path, n=c["n"], h=c["h"], hkv=c["hkv"], d=c["d"], dtype=c["dtype"], seed=100 + int(c["name"][1:]))
            run = cqsa_run(cl, path, causal=c["causal"], budget_bytes=cl.budget_bytes, dtype=c["dtype"],
                           head_dim=c["d"], groups=c["groups"])
            g = zarr.open_group(path, mode="r")
            errs = full_reference_errors(g, causal=c["causal"], scale=c["d"] ** -0.5, device=device)
            ok = errs["cqsa"]["finite"] and errs["cqsa"]["rel_fro_out"] <= _BOUND[c["dtype"]]
            entry = {**c, "ok": ok, "errors": errs, "kernels": run["kernels"], "seconds": run["seconds"],
                     "plan_groups": run["plan"]["groups"], "quorum_size": run["plan"]["quorum_size"]}
        except Exception as e:  # noqa: BLE001  (record and go on: the report needs every failure)
            entry = {**c, "ok": False, "error": _exc(e)}
        rec.data["correctness"].append(entry)
        rec.save()
        log("  " + _corr_line(entry))
        shutil.rmtree(os.path.join(workdir, "corr.zarr"), ignore_errors=True)


def _exc(e: BaseException) -> str:
    import traceback

    return "".join(traceback.format_exception(type(e), e, e.__traceback__))


def _corr_line(e: dict[str, Any]) -> str:
    head = (f"{e['name']} N={e['n']} Hq={e['h']} Hkv={e['hkv']} D={e['d']} {e['dtype']:8s} "
            f"causal={int(e['causal'])} W={e['groups']}")
    if "error" in e:
        return head + "  ERROR " + e["error"].strip().splitlines()[-1]
    c, s = e["errors"]["cqsa"], e["errors"]["sdpa_same_dtype"]
    return (head + f"  kernel={','.join(e['kernels'])}  cqsa max|dout|={c['max_abs_out']:.2e} "
            f"rel={c['rel_fro_out']:.2e} max|dlse|={c['max_abs_lse']:.2e}  "
            f"(sdpa rel={s['rel_fro_out']:.2e})  {'ok' if e['ok'] else 'FAIL'}")


def perf_case(rec: Record, clusters: Clusters, case: dict[str, Any], *, store: str, device: str,
              sdpa_cache: dict[Any, Any], ref_cache: dict[Any, Any], sdpa_reps: int, cqsa_reps: int,
              check_rows_too: bool = False, rounds: int = 0) -> dict[str, Any]:
    """One row of the performance table: SDPA (cached per shape) and cqsa_dask.run.

    ``rounds`` > 0: instead, alternate one SDPA call and one cqsa run ``rounds``
    times (medians of each side), so that load from other processes drifting
    over the minutes of a case hits both sides alike.
    """
    if rounds > 0:
        return _paired_case(clusters, case, store=store, device=device, ref_cache=ref_cache,
                            check_rows_too=check_rows_too, rounds=rounds)
    n, h, d, dtype, causal = case["n"], case["h"], case["d"], case["dtype"], case["causal"]
    entry: dict[str, Any] = dict(case)
    entry["loadavg_before"] = os.getloadavg()  # other processes on this machine distort CPU timings
    skey = (n, h, d, dtype, causal)
    if not case.get("sdpa", True) and skey not in sdpa_cache:
        sdpa_cache[skey] = {"skipped": "cqsa alone in this case (SDPA is timed in the cases of parts b and d)"}
    if skey not in sdpa_cache:
        log(f"  SDPA in memory N={n} H={h} D={d} {dtype} causal={causal}")
        try:
            big = n > 2**21
            sdpa_cache[skey] = sdpa_in_memory(b=1, h=h, n=n, d=d, dtype=dtype, causal=causal, device=device,
                                              reps=1 if big else sdpa_reps, warmup=0 if big else 1)
        except Exception as e:  # noqa: BLE001
            sdpa_cache[skey] = {"error": _exc(e)}
    entry["sdpa"] = sdpa_cache[skey]
    log(f"  sdpa: {_short(entry['sdpa'])}")
    cl = clusters.get(case["budget_bytes"])
    try:
        log(f"  cqsa_dask.run budget={case['budget_bytes'] / GB:.4g} GB causal={causal}")
        entry["cqsa"] = cqsa_run(cl, store, causal=causal, budget_bytes=case["budget_bytes"], dtype=dtype,
                                 head_dim=d, reps=cqsa_reps, time_box=case.get("time_box"))
        log(f"  cqsa: {_short(entry['cqsa'])}")
    except Exception as e:  # noqa: BLE001
        entry["cqsa"] = {"error": _exc(e)}
        log("  cqsa FAILED:\n" + entry["cqsa"]["error"])
        return entry
    if "stopped_after" in entry["cqsa"]:  # its cluster was closed to stop it; no output to check
        clusters.current = None
        return entry
    entry["loadavg_after"] = os.getloadavg()
    return _check_case(entry, store=store, device=device, ref_cache=ref_cache, check_rows_too=check_rows_too)


def _with_median(runs: list[dict[str, Any]], flops: int, tokens: int) -> dict[str, Any]:
    """The last run's record, with seconds = the median over ``runs`` and rates from it."""
    secs = [r["seconds"] for r in runs]
    sec = statistics.median(secs)
    return dict(runs[-1], seconds=sec, seconds_all=secs, tflops=flops / sec / 1e12, tokens_per_s=tokens / sec)


def _paired_case(clusters: Clusters, case: dict[str, Any], *, store: str, device: str,
                 ref_cache: dict[Any, Any], check_rows_too: bool, rounds: int) -> dict[str, Any]:
    n, h, d, dtype, causal = case["n"], case["h"], case["d"], case["dtype"], case["causal"]
    entry: dict[str, Any] = dict(case, rounds=rounds, loadavg_before=os.getloadavg())
    cl = clusters.get(case["budget_bytes"])
    sdpa, cqsa = [], []
    for r in range(rounds):
        sdpa.append(sdpa_in_memory(b=1, h=h, n=n, d=d, dtype=dtype, causal=causal, device=device, reps=1,
                                   warmup=1 if r == 0 else 0))
        cqsa.append(cqsa_run(cl, store, causal=causal, budget_bytes=case["budget_bytes"], dtype=dtype, head_dim=d))
        log(f"  round {r}: sdpa {sdpa[-1]['seconds']:.3f}s  cqsa {cqsa[-1]['seconds']:.3f}s  "
            f"load {os.getloadavg()[0]:.2f}")
    flops = attention_flops(1, h, n, d, causal)
    entry["sdpa"] = _with_median(sdpa, flops, n)
    entry["cqsa"] = _with_median(cqsa, flops, n)
    entry["paired_efficiency"] = [s["seconds"] / c["seconds"] for s, c in zip(sdpa, cqsa)]
    entry["cqsa_rounds"] = [_round_figures(c) for c in cqsa]  # where each round's time went
    entry["paired_median"] = statistics.median(entry["paired_efficiency"])
    entry["paired_median_ci95"] = median_ci(entry["paired_efficiency"])
    entry["efficiency_of_minima"] = min(s["seconds"] for s in sdpa) / min(c["seconds"] for c in cqsa)
    entry["loadavg_after"] = os.getloadavg()
    log(f"  sdpa: {_short(entry['sdpa'])}")
    log(f"  cqsa: {_short(entry['cqsa'])}")
    ci = entry["paired_median_ci95"]
    log(f"  median of the {rounds} pairs {entry['paired_median']:.3f}"
        + (f", 95 % interval {ci[0]:.3f}-{ci[1]:.3f}" if ci else " (too few rounds for a 95 % interval)"))
    return _check_case(entry, store=store, device=device, ref_cache=ref_cache, check_rows_too=check_rows_too)


def _round_figures(c: dict[str, Any]) -> dict[str, Any]:
    """One cqsa run's wall time against its tasks: seconds, the execute time, the sums of the
    quorum tasks' time and compute, and the first task's start and the last merge's end
    (seconds after the run began)."""
    t = c.get("tasks", {})
    spans = [(r[3], r[3] + r[4]) for kind in ("quorum", "merge") for r in c.get("timeline", {}).get(kind, [])
             if r[3] is not None and r[4] is not None]
    return {"seconds": c["seconds"], "execute_seconds": c.get("execute_seconds"),
            "quorum_seconds": t.get("quorum_seconds"), "quorum_compute_seconds": t.get("quorum_compute_seconds"),
            "first_start": min((a for a, _ in spans), default=None), "last_end": max((b for _, b in spans), default=None)}


def median_ci(xs: list[float], level: float = 0.95) -> tuple[float, float] | None:
    """Distribution-free interval for the median of ``xs`` (n values, any order): the order
    statistics x_(k) and x_(n+1-k), 1-based, with the largest k for which
    P(Binomial(n, 1/2) < k) <= (1 - level) / 2, so that the interval covers the median
    with probability >= ``level`` for any continuous distribution.  None when n is too
    small (n < 6 at 95 %)."""
    n, tail = len(xs), (1 - level) / 2
    k, below = 0, 0.0  # below = P(X < k + 1) as k grows
    while k < n // 2:
        below += math.comb(n, k) / 2**n
        if below > tail:
            break
        k += 1
    if k == 0:
        return None
    v = sorted(xs)
    return v[k - 1], v[n - k]


def _check_case(entry: dict[str, Any], *, store: str, device: str, ref_cache: dict[Any, Any],
                check_rows_too: bool) -> dict[str, Any]:
    """Sampled rows against float64, and the efficiency."""
    import zarr

    from cqsa_dask.store.generated import source_of
    from cqsa_dask.tools.verify import check_rows, sample_rows

    causal, d = entry["causal"], entry["d"]
    g = zarr.open_group(store, mode="r")
    rows = sample_rows(g, 6, seed=1)  # 6 random rows + the first and the last: 8
    rkey = (store, causal)
    t = time.perf_counter()
    if source_of(g) is not None:  # generated inputs: the library's float64 check (cqsa verify) only
        r = check_rows(g, rows, causal=causal, scale=d**-0.5)
        entry["check"] = {"rows": r.rows, "max_abs_out": r.max_abs_out, "max_rel_out": r.max_rel_out,
                          "max_abs_lse": r.max_abs_lse, "by": "cqsa_dask.tools.verify.check_rows (generated inputs)"}
    else:
        if rkey not in ref_cache:
            ref_cache[rkey] = sampled_reference(g, rows, causal=causal, scale=d**-0.5, device=device)
        entry["check"] = compare_rows(g, ref_cache[rkey])
    if check_rows_too and "by" not in entry["check"]:  # the library's per-row check, to confirm the batched one
        r = check_rows(g, rows, causal=causal, scale=d**-0.5)
        entry["check_rows"] = {"rows": r.rows, "max_abs_out": r.max_abs_out, "max_rel_out": r.max_rel_out,
                               "max_abs_lse": r.max_abs_lse}
    entry["check"]["seconds"] = time.perf_counter() - t
    s = entry["sdpa"]
    if "seconds" in s:
        entry["efficiency"] = s["seconds"] / entry["cqsa"]["seconds"]
    log(f"  check: max|dout|={entry['check']['max_abs_out']:.2e} max|dlse|={entry['check']['max_abs_lse']:.2e}"
        f"  efficiency={entry.get('efficiency', float('nan')):.3f}")
    return entry


def _stopped(c: dict[str, Any]) -> str:
    peak = c.get("peak_device_bytes")
    return (f"stopped after {c['stopped_after']:.0f} s (time box): {c['quorum_tasks_done']}/{c['plan']['tasks']} "
            f"quorum tasks done, device peak {'n/a' if peak is None else f'{peak / GB:.2f} GB'}")


def _short(r: dict[str, Any]) -> str:
    if "error" in r:
        return "ERROR " + r["error"].strip().splitlines()[-1]
    if "stopped_after" in r:
        return _stopped(r)
    if "seconds" not in r:
        return "not run: " + str(r.get("skipped", ""))
    s = f"{r['seconds']:.3f}s {r['tflops']:.2f} TFLOP/s"
    if "plan" in r:
        p = r["plan"]
        s += (f" W={p['groups']} |D|={p['quorum_size']} hk/task={p['heads_per_task']} "
              f"kernel={','.join(r['kernels'])} read={r['bytes_read'] / GB:.2f}GB written={r['bytes_written'] / GB:.2f}GB")
        t = r["tasks"]
        s += (f" | quorum {t['quorum_seconds']:.2f}s (compute {t['quorum_compute_seconds']:.2f}, "
              f"io {t['quorum_io_seconds']:.2f}), merge {t['merge_seconds']:.2f}s")
    return s


# ----------------------------------------------------------------------------- suites


def cpu_budget(n: int, h: int, d: int, dtype: str, min_groups: int = 7) -> int:
    """The largest budget (bytes) for which make_plan, with run()'s options, picks at least
    ``min_groups`` groups."""
    from cqsa_dask import BudgetError, make_plan
    from cqsa_dask.client.api import plan_options

    def groups(b: int) -> int:
        try:
            return make_plan(seq_len=n, heads=h, head_dim=d, dtype=dtype, budget=b, **plan_options()).groups
        except BudgetError:
            return 10**9
    lo, hi = 1, 10**12
    while hi - lo > 1:
        mid = (lo + hi) // 2
        lo, hi = (mid, hi) if groups(mid) >= min_groups else (lo, mid)
    return lo


def suite_cpu(args: argparse.Namespace, rec: Record) -> None:
    n, h, d, dtype = 32768, 2, 64, "float32"
    budget = cpu_budget(n, h, d, dtype)
    rec.data["budget_rule"] = "largest budget with make_plan groups >= 7"
    rec.data["budget_bytes"] = budget
    log(f"CPU suite: N={n} H={h} D={d} {dtype}, budget {budget:,} bytes")
    store = os.path.join(args.workdir, "cpu.zarr")
    rec.data["store_write"] = write_store(store, n=n, h=h, hkv=h, d=d, dtype=dtype, seed=0)
    log(f"  store written: {rec.data['store_write']}")
    clusters = Clusters()
    sdpa_cache: dict[Any, Any] = {}
    ref_cache: dict[Any, Any] = {}
    try:
        for causal in (False, True):
            case = {"name": "cpu-causal" if causal else "cpu", "n": n, "h": h, "hkv": h, "d": d, "dtype": dtype,
                    "causal": causal, "budget_bytes": budget}
            log(f"case {case['name']}")
            e = perf_case(rec, clusters, case, store=store, device="cpu", sdpa_cache=sdpa_cache,
                          ref_cache=ref_cache, sdpa_reps=3, cqsa_reps=3, check_rows_too=True, rounds=args.rounds)
            rec.data["cases"].append(e)
            rec.save()
    finally:
        clusters.close()
        shutil.rmtree(store, ignore_errors=True)


def gpu_perf_cases(tiny: bool, boxes: dict[str, float] | None = None) -> list[dict[str, Any]]:
    """(b) then (c), most important first; tiny: the same code path at small sizes.
    ``boxes``: {case name: seconds after which its run is stopped, its finished tasks' peaks
    still measured} (the 4M / 1 GB run, or a 16M run longer than the device time left)."""
    boxes = boxes or {}
    base = {"h": 4, "hkv": 4, "d": 128, "dtype": "bfloat16"}
    n1, n2, n4 = (1024, 2048, 4096) if tiny else (262144, 1048576, 4194304)
    bud = {k: (int(8.5e6 + k * 1e9 / 512) if tiny else int(k * 1e9)) for k in (1, 2, 4, 8, 16)}
    rows = [
        ("n262k-4GB", n1, 4, False, "b"), ("n1M-4GB", n2, 4, False, "b"), ("n1M-4GB-causal", n2, 4, True, "b"),
        ("n1M-1GB", n2, 1, False, "c"), ("n1M-2GB", n2, 2, False, "c"), ("n1M-8GB", n2, 8, False, "c"),
        ("n4M-4GB", n4, 4, False, "d"), ("n4M-4GB-causal", n4, 4, True, "d"),
        ("n4M-16GB", n4, 16, False, "e"), ("n4M-8GB", n4, 8, False, "e"), ("n4M-2GB", n4, 2, False, "e"),
        ("n4M-1GB", n4, 1, False, "e"),
        ("n2M-4GB", 2 * n2, 4, False, "g"), ("n8M-4GB", 2 * n4, 4, False, "g"), ("n16M-4GB", 4 * n4, 4, False, "g"),
    ]
    # (e) budget sweep and (g) the N^2 fit: cqsa alone (SDPA is timed once per shape, in (b) and (d))
    return [{"name": nm, "n": n, "budget_bytes": bud[b], "causal": c, "part": part, "sdpa": part not in "eg", **base,
             **({"time_box": boxes[nm]} if boxes.get(nm) else {})}
            for nm, n, b, c, part in rows]


def suite_gpu(args: argparse.Namespace, rec: Record) -> None:
    import torch

    device = "cuda" if torch.cuda.is_available() and not args.tiny else "cpu"
    if not args.tiny and device != "cuda":
        raise SystemExit("the gpu suite needs CUDA (use --tiny to exercise it on the CPU)")
    deadline = T0 + args.deadline
    rec.data["device"] = device
    if device == "cuda":
        rec.data["ceilings"] = ceilings(device)
        log(f"ceilings: {rec.data['ceilings']}")
    clusters = Clusters()
    try:
        if "a" in args.parts:
            log("(a) correctness against float64")
            run_correctness(rec, clusters, device=device, workdir=args.workdir, tiny=args.tiny)
        sdpa_cache: dict[Any, Any] = {}
        ref_cache: dict[Any, Any] = {}
        stores: dict[int, str] = {}
        cases = gpu_perf_cases(args.tiny, {"n4M-1GB": args.time_box, **_boxes(args.box)})
        if args.cases:  # run in the order given
            cases = sorted((c for c in cases if c["name"] in args.cases), key=lambda c: args.cases.index(c["name"]))
        cases = [c for c in cases if c["part"] in args.parts]
        if "f" in args.parts:  # the out-of-memory case, after the cases listed before it in --cases
            at = args.cases.index("oom") if args.cases and "oom" in args.cases else len(cases)
            cases.insert(at, {"name": "oom", "part": "f"})
        cost = Costs(args.tiny)
        for case in cases:
            if case["name"] == "oom":
                _drop_stores(stores)
                if cost.oom > deadline - time.perf_counter():
                    rec.data["skipped"].append({"name": "oom", "reason": "deadline"})
                    continue
                rec.data["oom"] = oom_case(clusters, device=device, workdir=args.workdir, tiny=args.tiny)
                rec.save()
                continue
            n = case["n"]
            left = deadline - time.perf_counter()
            generated = bool(args.synthetic_from) and n >= args.synthetic_from
            need = cost.need(case, have_store=n in stores or generated,
                             have_sdpa=(n, case["h"], case["d"], case["dtype"], case["causal"]) in sdpa_cache)
            if need > left:
                log(f"case {case['name']} skipped: about {need:.0f}s needed, {left:.0f}s left before the deadline")
                rec.data["skipped"].append({"name": case["name"], "reason": f"deadline: ~{need:.0f}s needed, {left:.0f}s left"})
                rec.save()
                continue
            log(f"case {case['name']} (part {case['part']})")
            t_case = time.perf_counter()
            if n not in stores:
                _drop_stores(stores)
                path = os.path.join(args.workdir, f"n{n}.zarr")
                if generated:  # generated where used: nothing on disk
                    w = write_synthetic_store(path, n=n, h=case["h"], hkv=case["hkv"], d=case["d"],
                                              dtype=case["dtype"], seed=n % 997)
                    log(f"  store N={n}: generated inputs (synthetic.py), nothing written")
                else:
                    w = write_store(path, n=n, h=case["h"], hkv=case["hkv"], d=case["d"], dtype=case["dtype"],
                                    seed=n % 997)
                    w["zarr_read"] = zarr_read_rate(path, device)
                    cost.store_rate = w["bytes"] / w["seconds"]
                    log(f"  store N={n} written: {w['bytes'] / GB:.2f} GB in {w['seconds']:.1f}s; "
                        f"read back {w['zarr_read']}")
                rec.data["stores"][str(n)] = w
                stores[n] = path
            e = perf_case(rec, clusters, case, store=stores[n], device=device, sdpa_cache=sdpa_cache,
                          ref_cache=ref_cache, sdpa_reps=3, cqsa_reps=1)
            e["case_seconds"] = time.perf_counter() - t_case
            cost.learn(e)
            rec.data["cases"].append(e)
            rec.save()
        _drop_stores(stores)
    finally:
        clusters.close()


def _boxes(specs: list[str]) -> dict[str, float]:
    """``--box`` arguments ``NAME=S`` as {name: seconds}."""
    out: dict[str, float] = {}
    for spec in specs:
        name, _, sec = spec.partition("=")
        try:
            out[name] = float(sec)
        except ValueError:
            out[name] = 0.0
        if not out[name] > 0:
            raise SystemExit(f"--box {spec!r}: expected CASE=SECONDS, seconds > 0")
    return out


def _drop_stores(stores: dict[int, str]) -> None:
    """Delete the stores written so far: one large store at a time on disk."""
    for path in stores.values():
        shutil.rmtree(path, ignore_errors=True)
    stores.clear()


class Costs:
    """Seconds a case will take, from what the cases before it took (for --deadline).

    Before any measurement: cqsa at 450 TFLOP/s and SDPA at 480 (the H200
    measured 462-516 and 490-502 on 2026-11-29), stores written at 1 GB/s
    (measured 2.1), the float64 row check 20 s; each learned figure replaces
    its guess.  Margin 1.25.  (Guesses of 300 TFLOP/s and 0.2 GB/s made a
    fresh process skip a 4M case that fitted its time.)
    """

    def __init__(self, tiny: bool):
        self.tiny = tiny
        self.cqsa_rate, self.sdpa_rate, self.store_rate = 450e12, 480e12, 1e9
        self.oom = 5.0 if tiny else 90.0

    def need(self, case: dict[str, Any], *, have_store: bool, have_sdpa: bool) -> float:
        """``have_store``: the inputs exist already, or are generated (nothing to write)."""
        if self.tiny:
            return 5.0
        n, h, d = case["n"], case["h"], case["d"]
        flops = attention_flops(1, h, n, d, case["causal"])
        t = flops / self.cqsa_rate + 20.0
        if not have_store:
            t += 3 * n * h * d * 2 / self.store_rate
        if case.get("sdpa", True) and not have_sdpa:
            t += flops / self.sdpa_rate
        return 1.25 * t

    def learn(self, e: dict[str, Any]) -> None:
        c, s = e.get("cqsa", {}), e.get("sdpa", {})
        if "tflops" in c:
            self.cqsa_rate = min(self.cqsa_rate, c["tflops"] * 1e12) if e["budget_bytes"] <= 2e9 else c["tflops"] * 1e12
        if "tflops" in s:
            self.sdpa_rate = s["tflops"] * 1e12


def oom_case(clusters: Clusters, *, device: str, workdir: str, tiny: bool) -> dict[str, Any]:
    """Target 3: a process capped at 4 GB of device memory; SDPA runs out, cqsa completes.

    The cap is ``torch.cuda.set_per_process_memory_fraction(4 GB / total)``
    in this process (for SDPA) and in the worker process (for cqsa, budget
    4 GB); N starts at 1M (inputs 3.2 GB + output 1.1 GB) and doubles until
    SDPA fails.  Sampled rows of cqsa's result are checked against float64.
    On the CPU (--tiny) there is no cap: only the code path runs.
    """
    import torch

    cap = int(4e9)
    total = torch.cuda.get_device_properties(0).total_memory if device == "cuda" else 0
    rec: dict[str, Any] = {"cap_bytes": cap, "device_total_bytes": total, "tries": []}
    log(f"(f) out-of-memory case: device memory capped at {cap / GB:g} GB")
    n = 2048 if tiny else 2**20
    for attempt in range(3):
        if device == "cuda":
            torch.cuda.empty_cache()
            torch.cuda.set_per_process_memory_fraction(cap / total)
        try:
            r = sdpa_in_memory(b=1, h=4, n=n, d=128, dtype="bfloat16", causal=False, device=device, reps=1, warmup=1)
            rec["tries"].append({"n": n, "sdpa": r})
            log(f"  SDPA at N={n} fits under the cap ({r['seconds']:.2f}s): doubling N")
        except RuntimeError as e:  # torch.OutOfMemoryError, or every backend failing with it
            if "out of memory" not in str(e):
                raise
            rec["tries"].append({"n": n, "sdpa_error": str(e).splitlines()[0][:300]})
            log(f"  SDPA at N={n}: out of memory under the cap, as expected")
            break
        finally:
            if device == "cuda":
                torch.cuda.set_per_process_memory_fraction(1.0)
                torch.cuda.empty_cache()
        if tiny or attempt == 2:  # no cap on the CPU; on CUDA, three sizes at most
            break
        n *= 2
    rec["n"] = n
    path = os.path.join(workdir, "oom.zarr")
    write_store(path, n=n, h=4, hkv=4, d=128, dtype="bfloat16", seed=7)
    cl = clusters.get(cap)
    frac = cap / total if total else None
    try:
        if frac is not None:
            cl.client.run(_set_fraction, frac)
        run = cqsa_run(cl, path, causal=False, budget_bytes=cap, dtype="bfloat16", head_dim=128)
    finally:
        if frac is not None:
            cl.client.run(_set_fraction, 1.0)
    e = _check_case({"causal": False, "d": 128, "sdpa": {}, "cqsa": run}, store=path, device=device, ref_cache={},
                    check_rows_too=False)
    rec.update(cqsa=run, check=e["check"])
    log(f"  cqsa under the cap: {_short(run)}")
    shutil.rmtree(path, ignore_errors=True)
    return rec


def _set_fraction(fraction: float) -> None:
    import torch

    torch.cuda.empty_cache()
    torch.cuda.set_per_process_memory_fraction(fraction)


# ----------------------------------------------------------------------------- table and plots


def table(data: dict[str, Any]) -> str:
    lines = []
    if data.get("correctness"):
        lines.append("correctness (whole output vs float64):")
        lines += ["  " + _corr_line(e) for e in data["correctness"]]
    hdr = (f"{'case':16s} {'N':>9s} {'c':>1s} {'budget':>8s} {'W':>3s} {'|D|':>3s} {'kernel':>9s} "
           f"{'sdpa s':>8s} {'cqsa s':>8s} {'eff':>6s} {'sdpaTF':>7s} {'cqsaTF':>7s} {'sdpa GB':>7s} "
           f"{'cqsa GB':>7s} {'readGB':>7s} {'wrotGB':>7s} {'max|dout|':>9s}")
    lines += ["performance:", hdr]
    for e in data.get("cases", []):
        s, c = e.get("sdpa", {}), e.get("cqsa", {})
        if "error" in c:
            lines.append(f"{e['name']:16s} {e['n']:>9d} ERROR {c['error'].strip().splitlines()[-1]}")
            continue
        if "stopped_after" in c:
            lines.append(f"{e['name']:16s} {e['n']:>9d} {_stopped(c)}")
            continue
        p = c["plan"]
        speak = s.get("peak_reserved_bytes")
        lines.append(
            f"{e['name']:16s} {e['n']:>9d} {int(e['causal']):>1d} {e['budget_bytes'] / GB:>7.4g}G {p['groups']:>3d} "
            f"{p['quorum_size']:>3d} {','.join(c['kernels']):>9s} {s.get('seconds', float('nan')):>8.3f} "
            f"{c['seconds']:>8.3f} {e.get('efficiency', float('nan')):>6.3f} {s.get('tflops', float('nan')):>7.2f} "
            f"{c['tflops']:>7.2f} {(speak or float('nan')) / GB:>7.2f} {(c['peak_device_bytes'] or float('nan')) / GB:>7.2f} "
            f"{c['bytes_read'] / GB:>7.2f} {c['bytes_written'] / GB:>7.2f} {e.get('check', {}).get('max_abs_out', float('nan')):>9.2e}")
    fit = fit_exponent(data.get("cases", []))
    if fit:
        lines.append(f"time ~ N^{fit['exponent']:.3f} over N = {', '.join(_kilo(n) for n in fit['n'])} "
                     f"(4 GB, non-causal); peak device GB {', '.join(f'{b / GB:.2f}' for b in fit['peak_bytes'])}")
    o = data.get("oom")
    if o:
        c = o.get("cqsa", {})
        lines.append(f"oom: cap {o['cap_bytes'] / GB:g} GB, N={o['n']}: SDPA "
                     + ("out of memory" if "sdpa_error" in o["tries"][-1] else "fit")
                     + (f"; cqsa {c['seconds']:.2f}s, peak {(c['peak_device_bytes'] or 0) / GB:.2f} GB, "
                        f"max|dout| {o['check']['max_abs_out']:.2e}" if "seconds" in c else ""))
    for s in data.get("skipped", []):
        lines.append(f"skipped {s['name']}: {s['reason']}")
    return "\n".join(lines)


REPORT_BEGIN = "<!-- bench.py --report: generated from benchmarks.json, do not edit by hand -->"
REPORT_END = "<!-- end of the generated section -->"


def _md_row(e: dict[str, Any]) -> str:
    s, c = e.get("sdpa", {}), e.get("cqsa", {})
    if "seconds" not in c:
        why = _stopped(c) if "stopped_after" in c else (c.get("error") or "not run").strip().splitlines()[-1][:80]
        return f"| {e['name']} | {e['n']:,} | {'yes' if e['causal'] else 'no'} | {e['budget_bytes'] / GB:.3g} | | | | {why} | | | | | |"
    p = c["plan"]
    sdpa = f"{s['seconds']:.2f}" if "seconds" in s else ("OOM" if "error" in s else "")
    eff = f"{e['efficiency']:.3f}" if e.get("efficiency") is not None else ""
    if e.get("paired_median_ci95"):  # interleaved rounds (cpu suite): the pairs' median and its interval
        lo, hi = e["paired_median_ci95"]
        eff += f" (pairs: median {e['paired_median']:.3f}, 95 % {lo:.3f}-{hi:.3f})"
    peak = f"{c['peak_device_bytes'] / GB:.2f}" if c.get("peak_device_bytes") else "n/a"
    if c.get("peak_device_reserved_bytes"):
        peak += f" / {c['peak_device_reserved_bytes'] / GB:.2f}"
    err = e.get("check", {}).get("max_abs_out")
    return (f"| {e['name']} | {e['n']:,} | {'yes' if e['causal'] else 'no'} | {e['budget_bytes'] / GB:.3g} | "
            f"{p['groups']} | {p['quorum_size']} | {sdpa} | {c['seconds']:.2f} | {eff} | {c['tflops'] * 1e3:,.1f} | "
            f"{peak} | {c['bytes_read'] / GB:.2f} / {c['bytes_written'] / GB:.2f} | "
            f"{'' if err is None else f'{err:.1e}'} |")


def report(data: dict[str, Any]) -> str:
    """Markdown: one table per recorded run, newest first (the generated part of benchmarks.md)."""
    out = [REPORT_BEGIN, "", "## Every recorded run (generated)", "",
           ("One table per run in [benchmarks.json](benchmarks.json), newest first, made by "
           "`python benchmarks/bench.py --report docs/benchmarks.md --plot docs/benchmarks.json`. "
           "Efficiency = SDPA time / cqsa time, both measured in the same run; GFLOP/s count half the "
           "FLOPs for causal cases; peak is torch's max allocated on the device, then max reserved where "
           "recorded (n/a on the CPU); "
           "max |Δout| is over sampled rows against float64. The sections above read these figures."), ""]
    suites = sorted(data["suites"].items(), key=lambda kv: kv[1].get("env", {}).get("date_utc", ""), reverse=True)
    for label, d in suites:
        env = d.get("env", {})
        where = env.get("gpu") or f"CPU ({env.get('cpu_count')} cores)"
        sha = env.get("cqsa_source_sha256", "?")
        out += [f"### `{label}`: {env.get('date_utc', '?')[:16].replace('T', ' ')} UTC, {where}", "",
                (f"torch {env.get('torch')}, dask {env.get('dask')}, zarr {env.get('zarr')}, "
                f"engine source sha256 {sha}; command `{d.get('command', '?')}`"), ""]
        cases = d.get("cases", [])
        if cases:
            out += [("| case | N | causal | budget GB | W | \\|D\\| | SDPA s | cqsa s | efficiency | cqsa GFLOP/s | "
                    "peak GB | read / written GB | max \\|Δout\\| |"),
                    "|---|---|---|---|---|---|---|---|---|---|---|---|---|"]
            out += [_md_row(e) for e in cases]
        fit = fit_exponent(cases)
        if fit:
            out.append(f"\nTime grows as N^{fit['exponent']:.2f} over N = {', '.join(_kilo(n) for n in fit['n'])} "
                       "(4 GB, non-causal).")
        for sk in d.get("skipped", []):
            out.append(f"\nSkipped {sk['name']}: {sk['reason']}.")
        out.append("")
    out.append(REPORT_END)
    return "\n".join(out) + "\n"


def write_report(json_path: str, md_path: str) -> None:
    """Replace the generated section of ``md_path`` (appended when absent) with :func:`report`."""
    with open(json_path) as f:
        text = report(json.load(f))
    with open(md_path) as f:
        md = f.read()
    if REPORT_BEGIN in md and REPORT_END in md:
        head, rest = md.split(REPORT_BEGIN, 1)
        md = head + text + rest.split(REPORT_END, 1)[1].lstrip("\n")
    else:
        md = md.rstrip("\n") + "\n\n" + text
    with open(md_path, "w") as f:
        f.write(md)


def fit_exponent(cases: list[dict[str, Any]], budget: float = 4e9) -> dict[str, Any] | None:
    """Least-squares slope of log(cqsa seconds) on log(N), non-causal cases at ``budget``."""
    pts = sorted((e["n"], e["cqsa"]["seconds"], e["cqsa"]["peak_device_bytes"] or 0) for e in cases
                 if not e["causal"] and e["budget_bytes"] == int(budget) and "seconds" in e.get("cqsa", {}))
    if len({n for n, _, _ in pts}) < 2:
        return None
    xs, ys = [math.log(n) for n, _, _ in pts], [math.log(t) for _, t, _ in pts]
    mx, my = sum(xs) / len(xs), sum(ys) / len(ys)
    slope = sum((x - mx) * (y - my) for x, y in zip(xs, ys)) / sum((x - mx) ** 2 for x in xs)
    return {"exponent": slope, "n": [n for n, _, _ in pts], "seconds": [t for _, t, _ in pts],
            "peak_bytes": [p for _, _, p in pts]}


def _kilo(n: int) -> str:
    return f"{n // 2**20}M" if n % 2**20 == 0 else f"{n // 2**10}k"


def _ticks(ax: Any, values: list[float], labels: list[str]) -> None:
    from matplotlib.ticker import NullLocator

    ax.xaxis.set_minor_locator(NullLocator())
    ax.set_xticks(values, labels)


_FIRST_GPU_RUNS = ("gpu", "gpu-4M")  # engine 6483880


def plot(path: str, outdir: str) -> list[str]:
    """docs/benchmarks_gpu.png (time, efficiency vs N; time, memory vs budget) and benchmarks_cpu.png."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    with open(path) as f:
        doc = json.load(f)
    suites = doc.get("suites", {})
    made = []
    # benchmarks_gpu.png: engine 6483880's runs only (pooling engines would average them per N);
    # later engines have their own figures (plot_targets)
    gpu = [dict(e, run=name) for name, d in sorted(suites.items()) if name in _FIRST_GPU_RUNS and not d.get("tiny")
           for e in d.get("cases", []) if "plan" in e.get("cqsa", {})]
    if gpu:
        fig, ax = plt.subplots(2, 2, figsize=(12, 8.5))
        at4 = sorted([e for e in gpu if e["budget_bytes"] == int(4e9) and not e["causal"] and "efficiency" in e],
                     key=lambda e: e["n"])
        ns = sorted({e["n"] for e in at4})

        def mean(xs: list[float]) -> float:
            return sum(xs) / len(xs)

        def per_n(key: Any) -> list[float]:
            return [mean([key(e) for e in at4 if e["n"] == n]) for n in ns]

        a = ax[0][0]
        a.loglog(ns, per_n(lambda e: e["sdpa"]["seconds"]), "o-", label="SDPA in memory (cuDNN)")
        a.loglog(ns, per_n(lambda e: e["cqsa"]["seconds"]), "s-", label="cqsa_dask.run, 4 GB budget")
        a.loglog(ns, per_n(lambda e: e["cqsa"]["plan"]["flops"] / 600e12), ":", color="gray",
                 label="FLOPs / 600 TFLOP/s")
        a.set(xlabel="N (tokens)", ylabel="seconds", title="time vs N (B=1, H=4, D=128, bf16, non-causal)")
        _ticks(a, ns, [_kilo(n) for n in ns])
        a.legend()
        a = ax[0][1]
        a.semilogx([e["n"] for e in at4], [e["efficiency"] for e in at4], "s", label="one run each")
        a.semilogx(ns, per_n(lambda e: e["efficiency"]), "-", color="C1")
        for n in ns:
            w = next(e for e in at4 if e["n"] == n)["cqsa"]["plan"]["groups"]
            a.annotate(f"W={w}", (n, per_n(lambda e: e["efficiency"])[ns.index(n)]), textcoords="offset points",
                       xytext=(5, 5))
        a.axhline(0.85, color="red", ls="--", label="target 0.85 at N = 4M")
        a.set(xlabel="N (tokens)", ylabel="SDPA time / cqsa time", ylim=(0, 1), title="efficiency vs N, 4 GB budget")
        _ticks(a, ns, [_kilo(n) for n in ns])
        a.legend()
        n1 = 2**20
        byb = sorted([e for e in gpu if e["n"] == n1 and not e["causal"] and e["run"] == "gpu"],
                     key=lambda e: e["budget_bytes"])
        if byb:
            bs = [e["budget_bytes"] / GB for e in byb]
            a = ax[1][0]
            a.plot(bs, [e["cqsa"]["seconds"] for e in byb], "s-", label="cqsa_dask.run")
            a.axhline(byb[0]["sdpa"]["seconds"], color="C0", ls="--", label="SDPA in memory")
            for e, b in zip(byb, bs):
                a.annotate(f"W={e['cqsa']['plan']['groups']}, |D|={e['cqsa']['plan']['quorum_size']}",
                           (b, e["cqsa"]["seconds"]), textcoords="offset points", xytext=(4, 4))
            a.set(xscale="log", xlabel="memory budget (GB)", ylabel="seconds", ylim=(0, None),
                  title=f"time vs budget, N = {n1:,}")
            _ticks(a, bs, [f"{b:g}" for b in bs])
            a.legend()
            a = ax[1][1]
            a.plot(bs, [e["cqsa"]["peak_device_bytes"] / GB for e in byb], "s-", label="cqsa peak (max allocated)")
            a.plot(bs, bs, ":", color="gray", label="budget")
            a.axhline(byb[0]["sdpa"]["peak_allocated_bytes"] / GB, color="C0", ls="--",
                      label="SDPA peak (inputs + output + backend)")
            a.set(xscale="log", xlabel="memory budget (GB)", ylabel="GB", ylim=(0, None),
                  title=f"peak device memory vs budget, N = {n1:,}")
            _ticks(a, bs, [f"{b:g}" for b in bs])
            a.legend()
        fig.tight_layout()
        out = os.path.join(outdir, "benchmarks_gpu.png")
        fig.savefig(out, dpi=100)
        made.append(out)
    made += plot_targets(suites, outdir, plt)
    made += plot_targets(suites, outdir, plt, ("gpu-9da62c4",), "benchmarks_gpu_9da62c4.png")
    made += plot_targets(suites, outdir, plt, ("gpu-e7e4d9c", "gpu-f2da5ea", "gpu-f2da5ea-b"),
                         "benchmarks_gpu_f2da5ea.png")
    # engine af7a126 where measured, earlier engines' runs for the cases it did not rerun
    af7a126 = ("gpu-e7e4d9c", "gpu-f2da5ea", "gpu-f2da5ea-b", "gpu-af7a126", "gpu-af7a126-16M", "gpu-af7a126-4M-b")
    made += plot_targets(suites, outdir, plt, af7a126, "benchmarks_gpu_af7a126.png")
    # engine 51f278e: every budget at 4M (1 GB run to the end) and 4M at 4 GB; 1M, 2M, 8M, 16M as above
    made += plot_targets(suites, outdir, plt, (*af7a126, "gpu-51f278e", "gpu-51f278e-b", "gpu-51f278e-d",
                                               "gpu-51f278e-e8"), "benchmarks_gpu_51f278e.png")
    cpu = suites.get("cpu")
    if cpu and cpu.get("cases"):
        cases = [e for e in cpu["cases"] if "plan" in e.get("cqsa", {})]
        fig, ax = plt.subplots(1, 1, figsize=(7.5, 4.2))
        x = range(len(cases))
        ax.bar([i - 0.2 for i in x], [e["sdpa"]["seconds"] for e in cases], 0.4, label="SDPA in memory")
        ax.bar([i + 0.2 for i in x], [e["cqsa"]["seconds"] for e in cases], 0.4,
               label=f"cqsa_dask.run (W={cases[0]['cqsa']['plan']['groups']})")
        for i, e in zip(x, cases):  # every measurement, to show the spread
            ax.plot([i - 0.2] * len(e["sdpa"]["seconds_all"]), e["sdpa"]["seconds_all"], "k.")
            ax.plot([i + 0.2] * len(e["cqsa"]["seconds_all"]), e["cqsa"]["seconds_all"], "k.")
        load = max(max(e["loadavg_before"][0], e["loadavg_after"][0]) for e in cases)
        ax.set_xticks(list(x), ["causal" if e["causal"] else "non-causal" for e in cases])
        ax.set(ylabel="seconds (bars: median; dots: each run)",
               title=f"CPU, N={cases[0]['n']:,}, H={cases[0]['h']}, D={cases[0]['d']}, float32 "
                     f"(2 cores, load avg up to {load:.1f})")
        ax.legend()
        fig.tight_layout()
        out = os.path.join(outdir, "benchmarks_cpu.png")
        fig.savefig(out, dpi=100)
        made.append(out)
    return made


def plot_targets(suites: dict[str, Any], outdir: str, plt: Any, runs: tuple[str, ...] = ("gpu-targets", "gpu-targets-2"),
                 name: str = "benchmarks_gpu_targets.png") -> list[str]:
    """docs/NAME: time and peak memory against budget (N = 4M) and against N (4 GB), from
    ``runs`` (a case in several of them: the last one's); memory as torch's max allocated and, where
    recorded, max reserved and NVML's peak of the worker process."""
    latest: dict[tuple[int, int], dict[str, Any]] = {}  # a case measured in two of ``runs``: the later run's
    for run in runs:
        for e in suites.get(run, {}).get("cases", []):
            if not e["causal"]:
                latest[(e["n"], e["budget_bytes"])] = e
    cases = list(latest.values())
    timed = [e for e in cases if "seconds" in e.get("cqsa", {})]
    byb = sorted((e for e in timed if e["n"] == 4194304), key=lambda e: e["budget_bytes"])
    byn = sorted((e for e in timed if e["budget_bytes"] == int(4e9)), key=lambda e: e["n"])
    memb = sorted((e for e in cases if e["n"] == 4194304 and e.get("cqsa", {}).get("peak_device_bytes")),
                  key=lambda e: e["budget_bytes"])
    if len(byb) < 2 or len(byn) < 2:
        return []
    fig, ax = plt.subplots(2, 2, figsize=(12, 8.5))
    bs = [e["budget_bytes"] / GB for e in byb]
    a = ax[0][0]
    a.plot(bs, [e["cqsa"]["seconds"] for e in byb], "s-", label="cqsa_dask.run")
    sdpa = next(e["sdpa"]["seconds"] for e in cases if e["n"] == 4194304 and "seconds" in e.get("sdpa", {}))
    a.axhline(sdpa, color="C0", ls="--", label=f"SDPA in memory ({sdpa:.1f} s, 28 GB)")
    t16 = next((e["cqsa"]["seconds"] for e in byb if e["budget_bytes"] == int(16e9)), None)
    if t16:
        a.axhline(1.25 * t16, color="red", ls=":", label="1.25 x the 16 GB time (target 2)")
    for e, b in zip(byb, bs):
        a.annotate(f"W={e['cqsa']['plan']['groups']}", (b, e["cqsa"]["seconds"]), textcoords="offset points",
                   xytext=(4, 4))
    a.set(xscale="log", xlabel="memory budget (GB)", ylabel="seconds", ylim=(0, None),
          title="time vs budget, N = 4,194,304, H=4, D=128, bf16" + "".join(
              f" ({e['budget_bytes'] / GB:g} GB: not finished)" for e in memb if "seconds" not in e["cqsa"]))
    _ticks(a, bs, [f"{b:g}" for b in bs])
    a.legend(fontsize=8)
    a = ax[0][1]
    mb = [e["budget_bytes"] / GB for e in memb]
    _plot_peaks(a.plot, memb, mb)
    a.plot(mb, mb, ":", color="gray", label="budget")
    a.set(xscale="log", yscale="log", xlabel="memory budget (GB)", ylabel="GB",
          title="peak device memory vs budget, N = 4M")
    _ticks(a, mb, [f"{b:g}" for b in mb])
    a.legend(fontsize=8)
    ns = [e["n"] for e in byn]
    ts = [e["cqsa"]["seconds"] for e in byn]
    a = ax[1][0]
    a.loglog(ns, ts, "s-", label="cqsa_dask.run, 4 GB")
    a.loglog(ns, [ts[-1] * (n / ns[-1]) ** 2 for n in ns], ":", color="gray", label="N^2 through the 4M point")
    sd = [(e["n"], e["sdpa"]["seconds"]) for e in byn if "seconds" in e.get("sdpa", {})]
    a.loglog([n for n, _ in sd], [t for _, t in sd], "o", label="SDPA in memory")
    fit = fit_exponent(byn)
    a.set(xlabel="N (tokens)", ylabel="seconds",
          title=f"time vs N, 4 GB (fitted exponent {fit['exponent']:.2f})" if fit else "time vs N")
    _ticks(a, ns, [_kilo(n) for n in ns])
    a.legend(fontsize=8)
    a = ax[1][1]
    _plot_peaks(a.semilogx, byn, ns)
    a.axhline(4, color="gray", ls=":", label="budget")
    a.set(xlabel="N (tokens)", ylabel="GB", ylim=(0, 6), title="peak device memory vs N, 4 GB budget")
    _ticks(a, ns, [_kilo(n) for n in ns])
    a.legend(fontsize=8)
    fig.tight_layout()
    out = os.path.join(outdir, name)
    fig.savefig(out, dpi=100)
    return [out]


# The peaks a targets plot draws: key in a case's cqsa record, line style, legend.
_PEAKS = (("peak_device_bytes", "s-", "torch, max allocated"),
          ("peak_device_reserved_bytes", "^-", "torch, max reserved"),
          ("nvml_worker_peak_bytes", "o--", "NVML, worker process (CUDA context included)"))


def _plot_peaks(draw: Any, cases: list[dict[str, Any]], xs: list[float]) -> None:
    """One line per peak of :data:`_PEAKS` that ``cases`` recorded, in GB against ``xs``."""
    for key, style, label in _PEAKS:
        pts = [(x, e["cqsa"][key] / GB) for e, x in zip(cases, xs) if e["cqsa"].get(key)]
        if pts:
            draw([x for x, _ in pts], [y for _, y in pts], style, label=label)


# ----------------------------------------------------------------------------- main


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--suite", choices=["cpu", "gpu"])
    ap.add_argument("--out", help="JSON record to write (suites merged into an existing file)")
    ap.add_argument("--tiny", action="store_true", help="gpu suite at tiny sizes on the CPU (a dry run)")
    ap.add_argument("--parts", default="abc",
                    help="gpu suite parts: a correctness, b 262k/1M, c 1M budgets, d 4M, e 4M budgets 1-16 GB, "
                         "f out of memory under a 4 GB cap, g 2M/8M/16M for the N^2 fit")
    ap.add_argument("--cases", nargs="*", help="only these performance cases (names as in the table)")
    ap.add_argument("--deadline", type=float, default=450.0, help="gpu suite: seconds after start to stop new cases")
    ap.add_argument("--rounds", type=int, default=3,
                    help="cpu suite: alternate SDPA and cqsa this many times (0: 3 SDPA reps, then 3 cqsa runs)")
    ap.add_argument("--label", help="name of the suite's record in --out (default: the suite name)")
    ap.add_argument("--workdir", default=None, help="directory for the Zarr stores (default: a temporary one)")
    ap.add_argument("--plot", metavar="JSON", help="make PNGs from a JSON record")
    ap.add_argument("--plot-dir", default="docs")
    ap.add_argument("--report", metavar="MD", help="with --plot JSON: rewrite MD's generated tables from it")
    ap.add_argument("--time-box", type=float, default=300.0, metavar="S",
                    help="gpu suite: stop the 4M / 1 GB run after S seconds, keeping its finished tasks' peaks (0: never)")
    ap.add_argument("--box", action="append", default=[], metavar="CASE=S",
                    help="gpu suite: stop case CASE's run after S seconds, as --time-box does (repeatable)")
    ap.add_argument("--synthetic-from", type=int, default=0, metavar="N",
                    help="gpu suite: cases with N >= this run on generated inputs (nothing on disk; SDPA not run)")
    ap.add_argument("--record-dashboard", metavar="JSON",
                    help="record the /cqsa page's inputs (benchmarks/dashboard_replay.py replays them)")
    ap.add_argument("--merge", metavar="JSON", help="copy the suites of this record into --out")
    args = ap.parse_args()
    if args.record_dashboard:
        global DASHBOARD_RECORD
        DASHBOARD_RECORD = {"path": args.record_dashboard, "inputs": [], "figures": []}

    if args.merge:
        with open(args.merge) as f:
            src = json.load(f)
        for name, data in src.get("suites", {}).items():
            Record(args.out, name, data).save()
        print(f"merged {sorted(src.get('suites', {}))} into {args.out}")
    if args.plot:
        for p in plot(args.plot, args.plot_dir):
            print("wrote", p)
        if args.report:
            write_report(args.plot, args.report)
            print("wrote", args.report)
    if not args.suite:
        return
    if not args.out:
        ap.error("--suite needs --out")
    own_tmp = args.workdir is None
    args.workdir = args.workdir or tempfile.mkdtemp(prefix="cqsa-bench-")
    os.makedirs(args.workdir, exist_ok=True)
    cmd = "python benchmarks/bench.py " + " ".join(sys.argv[1:])
    rec = Record(args.out, args.label or (args.suite + ("-tiny" if args.tiny else "")),
                 {"suite": args.suite, "tiny": args.tiny, "command": cmd, "cases": [], "skipped": [],
                  "stores": {}, "env": environment()})
    log(f"suite {args.suite}: env {json.dumps({k: v for k, v in rec.data['env'].items() if k != 'cqsa_config'})}")
    rec.save()
    try:
        (suite_cpu if args.suite == "cpu" else suite_gpu)(args, rec)
    finally:
        rec.data["total_seconds"] = time.perf_counter() - T0
        rec.save()
        if own_tmp:
            shutil.rmtree(args.workdir, ignore_errors=True)
    print(table(rec.data), flush=True)


if __name__ == "__main__":
    main()
