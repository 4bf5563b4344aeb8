"""S3 requests of a job, counted at the server: per task, and at resume, up to W = 1,000 token groups.

::

    counting moto server (benchmarks/s3server.py, its own process)  <── every request counted by type
    W = --small (57): s3://cqsa/full-57.zarr, q, k, v written with plain zarr (one group per chunk)
        run       cqsa_dask.run, the whole job (local cluster, worker processes)  requests per task
        resume    the finished job again                                          requests of a resume
        half      `cqsa run` (subprocess, AWS_* environment) killed with SIGKILL at half its task
                  markers, then resumed to the end                               resume startup, per task
    W = --groups (1,000): q, k, v written with plain zarr (chunks of 125 groups)
        partly    `cqsa run` killed once --killed-after task markers exist; resumed: the requests
                  until the graph is submitted, then those of the first --window finished tasks
                  (quorum tasks and merges), then the resume is stopped
        finished  the same job computed on a local directory by the same engine and uploaded
                  (every file); its resume on S3 runs no task: all of it is resume cost

A resume's "startup" requests are those the server answered before the run
called ``on_start`` (just before it submits the graph): opening the store,
checking the inputs (fingerprint), the plan, the markers and the lease.
The W = 1,000 job is not run to its end through moto: at the rate the
2-core machine serves (tens of requests per second) its ~300,000 requests
would take hours, hence the window and the uploaded finished job.

Shape: B = 1, H = 1, D = 8, float32, N = 8 W tokens; ``groups`` forces W,
so |D| is the ruler set's (47 at W = 1,000).  The client reaches the
server through ``storage_options``.  Writes
``benchmarks/results/s3-requests-<UTC time>.json`` (the environment blocks
of ``environment.py``, the counts by type and by array) and prints a
Markdown table.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import signal
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable, Iterator
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


def write_inputs(url: str, options: dict[str, Any] | None, groups: int, seed: int, groups_per_chunk: int = 1) -> None:
    """q, k, v (1, 1, 8 W, 8) float32 of N(0, 1) into a new group, with plain zarr."""
    import zarr

    rng = np.random.default_rng(seed)
    g = zarr.open_group(url, mode="w", storage_options=options, zarr_format=3)
    shape = (1, 1, TOKENS_PER_GROUP * groups, HEAD_DIM)
    chunks = (1, 1, TOKENS_PER_GROUP * groups_per_chunk, HEAD_DIM)
    for name in ("q", "k", "v"):
        arr = g.create_array(name, shape=shape, chunks=chunks, dtype="float32")
        arr[...] = rng.standard_normal(shape, dtype=np.float32)


def _summary(counts: RequestCounts, prefix: str, per: int | None = None) -> dict[str, Any]:
    out: dict[str, Any] = {"total": counts.total, "by_type": counts.by_type(), "by_array": counts.by_array(prefix),
                           "failed_by_status": {str(k): v for k, v in counts.failed().items()}}
    if per:
        out["per_task_by_type"] = {k: round(v / per, 2) for k, v in counts.by_type().items()}
        out["per_task_total"] = round(counts.total / per, 2)
    return out


class _Enough(Exception):
    """Raised by the progress callback to stop a resume after its window of tasks."""


def run_counted(server: CountingS3, url: str, groups: int, partials: str, window: int | None = None
                ) -> dict[str, Any]:
    """Run (or resume) the job at ``url`` in this process; the server's counts until the graph is
    submitted, and in all (or, with ``window``, over the first ``window`` finished tasks, after
    which the run is stopped)."""
    import cqsa_dask

    server.reset()
    startup: list[RequestCounts] = []
    finished: list[int] = []

    def on_start(plan: Any, link: Any) -> None:
        startup.append(server.counts(reset=window is not None))

    def progress(done: int, total: int) -> None:
        finished.append(done)
        if window is not None and done >= window:
            raise _Enough

    t0 = time.perf_counter()
    res = None
    with contextlib.suppress(_Enough):
        res = cqsa_dask.run(url, storage_options=_options(server), groups=groups, memory_budget="1GB",
                            partials=partials, on_start=on_start, progress=progress)
    seconds = time.perf_counter() - t0
    total = server.counts()
    prefix = url.split("/", 3)[3]
    out: dict[str, Any] = {"seconds": round(seconds, 2), "startup": _summary(startup[0], prefix) if startup else None}
    if res is None:  # stopped after the window: counts since on_start, per finished task (quorum or merge)
        return out | {"stopped_after_tasks": finished[-1], "window": _summary(total, prefix, per=finished[-1])}
    return out | {"resumed": res.resumed, "quorum_tasks_run": res.quorum_tasks_run, "merges_run": res.merges_run,
                  "quorum_size": res.plan.quorum_size, "groups": res.plan.groups,
                  "all": _summary(total, prefix, per=res.quorum_tasks_run or None)}


def _task_markers(server: CountingS3, url: str) -> int:
    import s3fs

    fs = s3fs.S3FileSystem(**_options(server), skip_instance_cache=True)
    with contextlib.suppress(FileNotFoundError):
        return sum("/c/" in p for p in fs.find(url.removeprefix("s3://") + "/_cqsa/task_done"))
    return 0


def kill_after(server: CountingS3, url: str, groups: int, partials: str, markers: int) -> dict[str, Any]:
    """`cqsa run` as a subprocess (store reached through the AWS_* environment), SIGKILLed with its
    workers once ``markers`` task markers exist."""
    env = {**os.environ, "AWS_ENDPOINT_URL": server.endpoint, "AWS_ACCESS_KEY_ID": KEY,
           "AWS_SECRET_ACCESS_KEY": SECRET, "AWS_REGION": "us-east-1",
           "PYTHONPATH": os.pathsep.join([str(ROOT), os.environ.get("PYTHONPATH", "")])}
    cmd = [sys.executable, "-m", "cqsa_dask", "run", url, "--groups", str(groups), "--budget", "1GB",
           "--partials", partials, "--json"]
    proc = subprocess.Popen(cmd, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
                            start_new_session=True)
    try:
        while (done := _task_markers(server, url)) < markers:
            if proc.poll() is not None:
                raise RuntimeError(f"`cqsa run` ended (status {proc.returncode}) before {markers} tasks")
            time.sleep(1.0)
    finally:
        with contextlib.suppress(ProcessLookupError):
            os.killpg(proc.pid, signal.SIGKILL)
        proc.wait()
    time.sleep(1.0)  # requests already on the wire land
    return {"task_markers_at_kill": done, "task_markers_after": _task_markers(server, url)}


def upload_finished(server: CountingS3, url: str, groups: int, partials: str, seed: int, workdir: Path) -> int:
    """The job computed on a local directory (same engine, same inputs written with plain zarr),
    then every file of it uploaded to ``url`` (boto3, eight at a time); the files uploaded."""
    from concurrent.futures import ThreadPoolExecutor

    import boto3

    import cqsa_dask

    local = workdir / f"finished-{groups}.zarr"
    write_inputs(str(local), None, groups, seed, groups_per_chunk=125)
    cqsa_dask.run(str(local), groups=groups, memory_budget="1GB", partials=partials)
    s3 = boto3.client("s3", endpoint_url=server.endpoint, aws_access_key_id=KEY, aws_secret_access_key=SECRET,
                      region_name="us-east-1")
    prefix = url.removeprefix(f"s3://{BUCKET}/")
    files = [p for p in local.rglob("*") if p.is_file()]
    with ThreadPoolExecutor(8) as pool:
        list(pool.map(lambda p: s3.upload_file(str(p), BUCKET, f"{prefix}/{p.relative_to(local).as_posix()}"), files))
    return len(files)


def measure(small: int, groups: int, partials: str, killed_after: int, window: int, seed: int,
            workdir: Path, save: Callable[[dict[str, Any]], None]) -> dict[str, Any]:
    """Every phase (module docstring); ``save`` gets the results after each."""
    rec: dict[str, Any] = {}

    def done(key: str, value: Any) -> None:
        rec[key] = value
        save(rec)

    with counting_s3((BUCKET,), KEY, SECRET) as server:
        if small:
            full = f"s3://{BUCKET}/full-{small}.zarr"
            write_inputs(full, _options(server), small, seed)
            done(f"w{small}_run", run_counted(server, full, small, partials))
            done(f"w{small}_resume_finished", run_counted(server, full, small, partials))
            half = f"s3://{BUCKET}/half-{small}.zarr"
            write_inputs(half, _options(server), small, seed + 1)
            done(f"w{small}_killed", kill_after(server, half, small, partials, small // 2))
            done(f"w{small}_resume_half_done", run_counted(server, half, small, partials))
        partly = f"s3://{BUCKET}/partly-{groups}.zarr"
        write_inputs(partly, _options(server), groups, seed + 2, groups_per_chunk=125)
        done(f"w{groups}_killed", kill_after(server, partly, groups, partials, killed_after))
        done(f"w{groups}_resume_partly_done", run_counted(server, partly, groups, partials, window=window))
        finished = f"s3://{BUCKET}/finished-{groups}.zarr"
        done(f"w{groups}_finished_files_uploaded", upload_finished(server, finished, groups, partials, seed + 3,
                                                                   workdir))
        done(f"w{groups}_resume_finished", run_counted(server, finished, groups, partials))
    return rec


def table(results: dict[str, Any], small: int, groups: int) -> str:
    """The Markdown table of docs/cluster.md: requests of each phase by type (per task where said)."""
    rows = ["| W | phase | requests | " + " | ".join(TYPES) + " |", "|---|---|---|" + "---|" * len(TYPES)]
    phases = [(small, "whole run, per quorum task (with its merge)", f"w{small}_run", "all", True),
              (small, "resume of the finished job (no task left)", f"w{small}_resume_finished", "all", False),
              (small, "resume of the half-done job, until submitted", f"w{small}_resume_half_done", "startup", False),
              (small, "resume of the half-done job, per quorum task run", f"w{small}_resume_half_done", "all", True),
              (groups, "resume of the finished job (no task left)", f"w{groups}_resume_finished", "all", False),
              (groups, "resume of a partly done job, until submitted", f"w{groups}_resume_partly_done", "startup",
               False),
              (groups, "the resumed job's first tasks, per finished task (quorum or merge)",
               f"w{groups}_resume_partly_done", "window", True)]
    for w, name, key, part, per in phases:
        s = results.get(key, {}).get(part)
        if not s or (per and "per_task_by_type" not in s):  # no task ran
            continue
        by = s["per_task_by_type"] if per else s["by_type"]
        total = s["per_task_total"] if per else s["total"]
        rows.append(f"| {w:,} | {name} | {total:,} | " + " | ".join(f"{by.get(t, 0):,}" for t in TYPES) + " |")
    return "\n".join(rows)


@contextlib.contextmanager
def _quiet_local_cluster() -> Iterator[None]:
    import dask.config

    with dask.config.set({"cqsa.local-cluster.dashboard-address": ":0",
                          "cqsa.local-cluster.silence-logs": "critical"}):
        yield


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0] if __doc__ else None)
    ap.add_argument("--groups", type=int, default=1000, help="token groups W of the large jobs (N = 8 W tokens)")
    ap.add_argument("--small", type=int, default=57, help="W of the job run to its end through S3 (0: none)")
    ap.add_argument("--killed-after", type=int, default=10, help="task markers before the large run is killed")
    ap.add_argument("--window", type=int, default=40, help="finished tasks counted in the large resume")
    ap.add_argument("--partials", choices=("all", "bounded"), default="all")
    ap.add_argument("--seed", type=int, default=None)
    ap.add_argument("--out-dir", default=str(ROOT / "benchmarks" / "results"))
    args = ap.parse_args(argv)
    seed = args.seed if args.seed is not None else int.from_bytes(os.urandom(4), "little")
    t0 = time.perf_counter()
    rec: dict[str, Any] = {
        "benchmark": "s3-requests", "date": now_utc(), "issue": 16,
        "command": "python -m benchmarks.s3_requests " + " ".join(sys.argv[1:] if argv is None else argv),
        "shape": {"batch": 1, "heads": 1, "head_dim": HEAD_DIM, "seq_len": TOKENS_PER_GROUP * args.groups,
                  "dtype": "float32", "groups": args.groups, "small_groups": args.small, "partials": args.partials,
                  "seed": seed, "killed_after": args.killed_after, "window": args.window},
        "hardware": hardware(), "versions": versions(), "git": git_info(), "load_start": load(),
    }
    os.makedirs(args.out_dir, exist_ok=True)
    path = Path(args.out_dir) / f"s3-requests-{rec['date'].replace(':', '').replace('-', '')[:15]}Z.json"

    def save(results: dict[str, Any]) -> None:  # after every phase: a stopped run keeps what it measured
        rec["results"] = results
        rec["load_end"], rec["total_s"] = load(), round(time.perf_counter() - t0, 1)
        path.write_text(json.dumps(rec, indent=2, sort_keys=True) + "\n")

    with _quiet_local_cluster(), tempfile.TemporaryDirectory(prefix="cqsa-s3-requests-") as tmp:
        measure(args.small, args.groups, args.partials, args.killed_after, args.window, seed, Path(tmp), save)
    print(table(rec["results"], args.small, args.groups))
    print(f"wrote {path}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
