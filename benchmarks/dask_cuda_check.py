"""GPU check: cqsa's local cluster started by dask-cuda's LocalCUDACluster runs an exact job.

::

    python3 -m benchmarks.dask_cuda_check [--seq-len 65536 --heads 2 --head-dim 128 --dtype bfloat16]

    cqsa.local-cluster.backend = dask-cuda (forced: a missing or broken dask-cuda is an error, not the spec)
      │
      ├─ workdir/a.zarr: random q, k, v (1, H, N, D)
      ├─ connect(..., gpus=local_gpus())  as run() calls it: local_spec -> choose_backend -> start
      │     each worker: CUDA_VISIBLE_DEVICES, resources, threads, memory limit, device (describe_worker),
      │     SIGINT ignored, cqsa's allocator setting, dask-cuda's preload and plugins, CUDA context
      ├─ cqsa_dask.run(a.zarr, client=c, groups=W)      then verify(a.zarr): float64 reference of sampled rows
      └─ cqsa_dask.run(b.zarr, groups=W) with no client: the path of `cqsa run` (its own cluster), verified too

Prints one JSON line (also written to ``--out``); exit status 0 when every
check passed, 1 when one failed, 2 when the check could not run (no GPU,
dask-cuda missing: the JSON line says why).  ``--dry-run-without-gpu``
exercises this script where there is no GPU: dask-cuda's GPU-less test mode
(``DASK_CUDA_TEST_DISABLE_DEVICE_SPECIFIC``), worker "0", tasks on the CPU,
and no second job (``run()`` without a client starts CPU workers there).
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import sys
import tempfile
import time
from typing import Any

__all__ = ["main"]


def _worker_facts(dask_worker: Any = None) -> dict[str, Any]:
    """What one worker process is, asked through ``client.run`` (the CUDA context is looked at before
    ``describe_worker`` starts one, so it shows whether dask-cuda's preload made it)."""
    import signal

    from cqsa_dask import config
    from cqsa_dask.execution.process import describe_worker

    try:
        from distributed.diagnostics.nvml import has_cuda_context

        context: bool | None = bool(has_cuda_context().has_context)
    except Exception:  # noqa: BLE001  (no NVML: a GPU-less dry run)
        context = None
    return {
        "name": str(dask_worker.name), "cuda_visible_devices": os.environ.get("CUDA_VISIBLE_DEVICES"),
        "pytorch_cuda_alloc_conf": os.environ.get("PYTORCH_CUDA_ALLOC_CONF"),
        "sigint_ignored": signal.getsignal(signal.SIGINT) == signal.SIG_IGN,
        "cuda_context_at_start": context, "preloads": [p.name for p in dask_worker.preloads],
        "plugins": sorted({n.split("-")[0] for n in dask_worker.plugins}),
        **describe_worker(str(config.get("device"))),
    }


def _workers(client: Any) -> list[dict[str, Any]]:
    info = client.scheduler_info()["workers"]
    facts = client.run(_worker_facts)
    return [{**facts[a], "resources": info[a]["resources"], "nthreads": info[a]["nthreads"],
             "memory_limit": info[a]["memory_limit"]} for a in sorted(facts)]


def _job(store: str, args: argparse.Namespace, seed: int, client: Any = None) -> dict[str, Any]:
    """Random inputs at ``store``, a causal job of ``args.groups`` groups on them, float64-checked rows."""
    import cqsa_dask
    from cqsa_dask.store.random_inputs import write_random_inputs
    from cqsa_dask.tools.verify import verify

    write_random_inputs(store, seq_len=args.seq_len, heads=args.heads, head_dim=args.head_dim, dtype=args.dtype,
                        seed=seed)
    t = time.perf_counter()
    res = cqsa_dask.run(store, client=client, memory_budget=None if client else args.budget, groups=args.groups,
                        causal=True)
    seconds = time.perf_counter() - t
    v = verify(store, rows=args.rows, seed=seed).to_dict()
    return {
        "via": "client" if client is not None else "run() without a client", "seed": seed,
        "groups": res.plan.groups, "tasks": res.plan.tasks, "quorum_tasks_run": res.quorum_tasks_run,
        "kernels": list(res.kernels), "seconds": round(seconds, 2), "peak_device_bytes": res.peak_device_bytes,
        "verify": {k: v[k] for k in ("passed", "rows_checked", "max_abs_out", "max_rel_out", "max_abs_lse",
                                     "tolerance")},
    }


def _versions() -> dict[str, Any]:
    from importlib.metadata import PackageNotFoundError, version

    import torch

    got: dict[str, Any] = {"python": platform.python_version(), "torch": torch.__version__, "cuda": torch.version.cuda}
    for name in ("dask", "distributed", "zarr", "dask-cuda", "cuda-core", "cuda-bindings", "nvidia-ml-py"):
        try:
            got[name] = version(name)
        except PackageNotFoundError:
            got[name] = None
    return got


def _failures(report: dict[str, Any], gpus: list[str], device: str, budget: int) -> list[str]:
    """What the report shows to be wrong (empty: passed)."""
    bad = []
    if report["backend"] != "dask-cuda":
        bad.append(f"the cluster is a {report['cluster_mro'][0]}, not dask-cuda's LocalCUDACluster")
    workers = report["workers"]
    firsts = sorted((w["cuda_visible_devices"] or "").split(",")[0] for w in workers)
    if firsts != sorted(gpus):
        bad.append(f"workers' own devices {firsts}, expected one worker per GPU {sorted(gpus)}")
    for w in workers:
        if w["resources"] != {report["resource"]: float(budget)}:
            bad.append(f"worker {w['name']} advertises {w['resources']}")
        if w["device"] != device or not w["sigint_ignored"] or "dask_cuda.initialize" not in w["preloads"]:
            bad.append(f"worker {w['name']}: device {w['device']}, SIGINT ignored {w['sigint_ignored']}, "
                       f"preloads {w['preloads']}")
    for job in report["jobs"]:
        if not job["verify"]["passed"] or job["quorum_tasks_run"] != job["tasks"]:
            bad.append(f"job via {job['via']}: verify {job['verify']}, {job['quorum_tasks_run']} of {job['tasks']} "
                       "tasks run")
    return bad


def _check(args: argparse.Namespace, report: dict[str, Any]) -> list[str]:
    import dask

    from cqsa_dask.client.cluster import connect, local_gpus
    from cqsa_dask.client.policy import local_device_kind
    from cqsa_dask.core.errors import CQSAError
    from cqsa_dask.core.units import parse_budget

    dask.config.set({"cqsa.local-cluster.backend": "dask-cuda", "cqsa.local-cluster.silence-logs": "error",
                     "cqsa.local-cluster.dashboard-address": "127.0.0.1:0"})
    if args.dry_run_without_gpu:
        os.environ["DASK_CUDA_TEST_DISABLE_DEVICE_SPECIFIC"] = "1"  # read where the workers' specs are made: here
        gpus, device = ["0"], "cpu"
    else:
        gpus, device = local_gpus(), local_device_kind()
        if device != "cuda" or not gpus:
            raise CQSAError(f"no GPU here (tasks would run on {device}, GPUs {gpus}); see --dry-run-without-gpu")
    budget = parse_budget(args.budget)
    report.update(gpus=gpus, budget_bytes=budget, resource="device_mem")
    t = time.perf_counter()
    with connect(budget_bytes=budget, resource="device_mem", threads=3, gpus=gpus) as c:
        report["cluster_start_seconds"] = round(time.perf_counter() - t, 2)
        report["cluster_mro"] = [k.__name__ for k in type(c.cluster).__mro__][:3]
        report["backend"] = "dask-cuda" if "LocalCUDACluster" in report["cluster_mro"] else "spec"
        report["workers"] = _workers(c)
        report["jobs"].append(_job(os.path.join(args.workdir, "a.zarr"), args, seed=args.seed, client=c))
    if not args.dry_run_without_gpu:
        report["jobs"].append(_job(os.path.join(args.workdir, "b.zarr"), args, seed=args.seed + 1))
    return _failures(report, gpus, device, budget)


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--seq-len", type=int, default=65536)
    p.add_argument("--heads", type=int, default=2)
    p.add_argument("--head-dim", type=int, default=128)
    p.add_argument("--dtype", default="bfloat16")
    p.add_argument("--groups", type=int, default=7, help="token groups of each job (several quorum tasks)")
    p.add_argument("--budget", default="4GB", help="the workers' device_mem resource")
    p.add_argument("--rows", type=int, default=32, help="rows checked against float64 per job")
    p.add_argument("--seed", type=int, default=1)
    p.add_argument("--workdir", default=None, help="where the stores go (default: a temporary folder, removed)")
    p.add_argument("--out", default=None, help="also write the JSON report here")
    p.add_argument("--dry-run-without-gpu", action="store_true", help="check this script where there is no GPU")
    args = p.parse_args(argv)
    report: dict[str, Any] = {"check": "dask-cuda backend of the local cluster", "jobs": [],
                              "seq_len": args.seq_len, "heads": args.heads, "head_dim": args.head_dim,
                              "dtype": args.dtype, "dry_run_without_gpu": args.dry_run_without_gpu}
    t = time.perf_counter()
    status = 2
    try:
        report["versions"] = _versions()
        with tempfile.TemporaryDirectory(prefix="cqsa-dask-cuda-") as tmp:
            args.workdir = args.workdir or tmp
            failures = _check(args, report)
        report.update(failures=failures, passed=not failures)
        status = 0 if not failures else 1
    except Exception as e:  # noqa: BLE001  (the one JSON line says what stopped the check)
        report.update(passed=False, error=f"{type(e).__name__}: {e}")
    report["seconds"] = round(time.perf_counter() - t, 1)
    line = json.dumps(report, default=str)
    if args.out:
        with open(args.out, "w") as f:
            f.write(line + "\n")
    print(line)
    return status


if __name__ == "__main__":
    sys.exit(main())
