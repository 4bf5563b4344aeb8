"""S3 requests of a job, counted at the server: per task, and at resume, at W = 1,000 token groups.

::

    counting moto server (benchmarks/s3server.py, its own process)  <── every request counted by type
        s3://cqsa/full-<W>.zarr    q, k, v written with plain zarr, then
            run      cqsa_dask.run (local cluster: worker processes)   requests per task
            resume   the finished job again                            requests of a resume (no task left)
        s3://cqsa/half-<W>.zarr
            `cqsa run` (a subprocess) killed with SIGKILL once about half the task markers exist
            resume   cqsa_dask.run: requests until the graph is submitted (on_start), then in all

Shape: B = 1, H = 1, D = 8, float32, N = 8 W tokens (groups of 8), inputs
chunked one group per chunk; ``--groups`` forces W, so |D| is the ruler set's
(47 at W = 1,000).  The client and its workers reach the server through
``storage_options``; the killed run through the AWS_* environment.  A
resume's "startup" requests are those the server answered before the run
called ``on_start`` (just before it submits the graph): opening the store,
checking the inputs (fingerprint), the plan, the markers and the lease.
``--compare W2`` also resumes a finished job of W2 groups, to show what of
a resume grows with W.

Writes ``benchmarks/results/s3-requests-<UTC time>.json`` (the environment
blocks of ``environment.py``, the counts by type and by array) and prints
a Markdown table.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import signal
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import numpy as np

from benchmarks.environment import git_info, hardware, load, now_utc, versions
from benchmarks.s3server import TYPES, CountingS3, RequestCounts, counting_s3

ROOT = Path(__file__).resolve().parents[1]
BUCKET, KEY, SECRET = "cqsa", "test-key", "test-secret"
TOKENS_PER_GROUP, HEAD_DIM = 8, 8


def _options(server: CountingS3) -> dict[str, Any]:
    return {"endpoint_url": server.endpoint, "key": KEY, "secret": SECRET}


def write_inputs(url: str, options: dict[str, Any], groups: int, seed: int) -> None:
    """q, k, v (1, 1, 8 W, 8) float32 of N(0, 1) into a new group, with plain zarr, one group per chunk."""
    import zarr

    rng = np.random.default_rng(seed)
    g = zarr.open_group(url, mode="w", storage_options=options, zarr_format=3)
    shape = (1, 1, TOKENS_PER_GROUP * groups, HEAD_DIM)
    for name in ("q", "k", "v"):
        arr = g.create_array(name, shape=shape, chunks=(1, 1, TOKENS_PER_GROUP, HEAD_DIM), dtype="float32")
        arr[...] = rng.standard_normal(shape, dtype=np.float32)


def _summary(counts: RequestCounts, prefix: str, per: int | None = None) -> dict[str, Any]:
    out: dict[str, Any] = {"total": counts.total, "by_type": counts.by_type(), "by_array": counts.by_array(prefix),
                           "failed_by_status": {str(k): v for k, v in counts.failed().items()}}
    if per:
        out["per_task_by_type"] = {k: round(v / per, 2) for k, v in counts.by_type().items()}
        out["per_task_total"] = round(counts.total / per, 2)
    return out


def run_counted(server: CountingS3, url: str, groups: int, partials: str) -> dict[str, Any]:
    """Run (or resume) the job at ``url`` in this process; the server's counts until the graph is
    submitted and in all."""
    import cqsa_dask

    server.reset()
    startup: list[RequestCounts] = []
    t0 = time.perf_counter()
    res = cqsa_dask.run(url, storage_options=_options(server), groups=groups, memory_budget="1GB",
                        partials=partials, on_start=lambda plan, link: startup.append(server.counts()))
    seconds = time.perf_counter() - t0
    total = server.counts()
    prefix = url.split("/", 3)[3]
    return {"seconds": round(seconds, 2), "resumed": res.resumed, "quorum_tasks_run": res.quorum_tasks_run,
            "merges_run": res.merges_run, "quorum_size": res.plan.quorum_size, "groups": res.plan.groups,
            "startup": _summary(startup[0], prefix) if startup else None,
            "all": _summary(total, prefix, per=res.quorum_tasks_run or None)}


def _task_markers(server: CountingS3, url: str) -> int:
    import s3fs

    fs = s3fs.S3FileSystem(**_options(server), skip_instance_cache=True)
    with contextlib.suppress(FileNotFoundError):
        return sum("/c/" in p for p in fs.find(url.removeprefix("s3://") + "/_cqsa/task_done"))
    return 0


def kill_half_way(server: CountingS3, url: str, groups: int, partials: str) -> dict[str, Any]:
    """`cqsa run` as a subprocess (store reached through the AWS_* environment), SIGKILLed with its
    workers once half the task markers exist."""
    env = {**os.environ, "AWS_ENDPOINT_URL": server.endpoint, "AWS_ACCESS_KEY_ID": KEY,
           "AWS_SECRET_ACCESS_KEY": SECRET, "AWS_REGION": "us-east-1",
           "PYTHONPATH": os.pathsep.join([str(ROOT), os.environ.get("PYTHONPATH", "")])}
    cmd = [sys.executable, "-m", "cqsa_dask", "run", url, "--groups", str(groups), "--budget", "1GB",
           "--partials", partials, "--json"]
    proc = subprocess.Popen(cmd, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
                            start_new_session=True)
    try:
        while (done := _task_markers(server, url)) < groups // 2:
            if proc.poll() is not None:
                raise RuntimeError(f"`cqsa run` ended (status {proc.returncode}) before half its tasks")
            time.sleep(1.0)
    finally:
        with contextlib.suppress(ProcessLookupError):
            os.killpg(proc.pid, signal.SIGKILL)
        proc.wait()
    time.sleep(1.0)  # requests already on the wire land
    return {"task_markers_at_kill": done, "task_markers_after": _task_markers(server, url)}


def measure(groups: int, partials: str, compare: int | None, seed: int) -> dict[str, Any]:
    with counting_s3((BUCKET,), KEY, SECRET) as server:
        full = f"s3://{BUCKET}/full-{groups}.zarr"
        write_inputs(full, _options(server), groups, seed)
        rec: dict[str, Any] = {"run": run_counted(server, full, groups, partials)}
        rec["resume_finished"] = run_counted(server, full, groups, partials)
        if compare:
            small = f"s3://{BUCKET}/full-{compare}.zarr"
            write_inputs(small, _options(server), compare, seed + 1)
            run_counted(server, small, compare, partials)
            rec[f"resume_finished_w{compare}"] = run_counted(server, small, compare, partials)
        half = f"s3://{BUCKET}/half-{groups}.zarr"
        write_inputs(half, _options(server), groups, seed + 2)
        rec["killed"] = kill_half_way(server, half, groups, partials)
        rec["resume_half_done"] = run_counted(server, half, groups, partials)
    return rec


def table(results: dict[str, Any]) -> str:
    """The Markdown table of docs/cluster.md: requests of each phase by type (per task where said)."""
    rows = ["| phase | requests | " + " | ".join(TYPES) + " |", "|---|---|" + "---|" * len(TYPES)]
    phases = [("run, per task", results["run"]["all"], True),
              ("resume of the finished job (before submitting)", results["resume_finished"]["startup"], False),
              ("resume of the half-done job (before submitting)", results["resume_half_done"]["startup"], False),
              ("resume of the half-done job, per task run", results["resume_half_done"]["all"], True)]
    phases += [(f"resume of a finished job of W = {k.removeprefix('resume_finished_w')} (before submitting)",
                v["startup"], False) for k, v in results.items() if k.startswith("resume_finished_w")]
    for name, s, per in phases:
        by = s["per_task_by_type"] if per else s["by_type"]
        total = s["per_task_total"] if per else s["total"]
        rows.append(f"| {name} | {total:,} | " + " | ".join(f"{by.get(t, 0):,}" for t in TYPES) + " |")
    return "\n".join(rows)


@contextlib.contextmanager
def _quiet_local_cluster() -> Iterator[None]:
    import dask.config

    with dask.config.set({"cqsa.local-cluster.dashboard-address": ":0",
                          "cqsa.local-cluster.silence-logs": "critical"}):
        yield


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0] if __doc__ else None)
    ap.add_argument("--groups", type=int, default=1000, help="token groups W (N = 8 W tokens)")
    ap.add_argument("--partials", choices=("all", "bounded"), default="all")
    ap.add_argument("--compare", type=int, default=31, help="W of a second finished job resumed (0: none)")
    ap.add_argument("--seed", type=int, default=None)
    ap.add_argument("--out-dir", default=str(ROOT / "benchmarks" / "results"))
    args = ap.parse_args(argv)
    seed = args.seed if args.seed is not None else int.from_bytes(os.urandom(4), "little")
    t0 = time.perf_counter()
    rec: dict[str, Any] = {
        "benchmark": "s3-requests", "date": now_utc(), "issue": 16,
        "command": "python -m benchmarks.s3_requests " + " ".join(sys.argv[1:] if argv is None else argv),
        "shape": {"batch": 1, "heads": 1, "head_dim": HEAD_DIM, "seq_len": TOKENS_PER_GROUP * args.groups,
                  "dtype": "float32", "groups": args.groups, "partials": args.partials, "seed": seed},
        "hardware": hardware(), "versions": versions(), "git": git_info(), "load_start": load(),
    }
    with _quiet_local_cluster():
        rec["results"] = measure(args.groups, args.partials, args.compare or None, seed)
    rec["load_end"], rec["total_s"] = load(), round(time.perf_counter() - t0, 1)
    os.makedirs(args.out_dir, exist_ok=True)
    path = Path(args.out_dir) / f"s3-requests-{rec['date'].replace(':', '').replace('-', '')[:15]}Z.json"
    path.write_text(json.dumps(rec, indent=2, sort_keys=True) + "\n")
    print(table(rec["results"]))
    print(f"wrote {path}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
