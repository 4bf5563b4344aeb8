"""Billion-token runs: generated inputs at N = 2**30, stopped, resumed and verified.

Every step drives the ``cqsa`` command as a user would (subprocesses, local
Dask cluster, Zarr store on local disk) and reads the figures back from the
store (``_cqsa/task_stats``: per-task wall, compute and IO seconds, bytes,
device peak).  Parts::

    smoke   a small generated job (default N = 65,536) end to end, plus the
            generator's CPU/CUDA bit equality when CUDA is present
    full    the plan's full task set submitted at N; stopped (kill -9 of the
            whole `cqsa run` session) after --seconds, resumed for
            --resume-seconds and stopped again: finished tasks give the
            per-task time, device memory and IO, and the extrapolated job
            time on 1 and 8 GPUs; the resume must not redo finished tasks
    rows    only --groups query rows (their producers restricted to those
            rows, ``--query-groups``): run, killed after --kill-after of the
            tasks, resumed to completion, then ``cqsa verify --rows R``
            against float64 over all N keys

Usage (GPU machine; each part within one 10-minute command)::

    python benchmarks/billion.py --part smoke --out $OUT/billion-smoke.json
    python benchmarks/billion.py --part full --n 1073741824 --seconds 200 --resume-seconds 100 --out $OUT/bf.json
    python benchmarks/billion.py --part rows --n 1073741824 --groups 0,-1 --out $OUT/br.json

The JSON record has the commands, the plan, every task's figures, the
verification and the extrapolation; docs/benchmarks.md quotes it.
"""

from __future__ import annotations

import argparse
import datetime as _dt
import json
import os
import platform
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from typing import Any

import numpy as np

PAPER_TOKENS_PER_S = {"1M": 1.2e3, "1B": 0.8e3}  # Stream-CQSA, A100, 12 GB budget
LEASE_S = 6


def _cqsa() -> list[str]:
    exe = shutil.which("cqsa", path=os.path.dirname(sys.executable))
    return [exe] if exe else [sys.executable, "-m", "cqsa_dask"]


def _versions() -> dict[str, Any]:
    import dask
    import torch
    import zarr

    import cqsa_dask

    v: dict[str, Any] = {"python": platform.python_version(), "torch": torch.__version__, "dask": dask.__version__,
                         "zarr": zarr.__version__, "cqsa_dask": cqsa_dask.__version__, "host": platform.node(),
                         "cpus": os.cpu_count()}
    if torch.cuda.is_available():
        v["gpu"] = torch.cuda.get_device_name(0)
        v["cudnn"] = torch.backends.cudnn.version()
    try:
        v["commit"] = subprocess.run(["git", "rev-parse", "--short", "HEAD"], capture_output=True, text=True,
                                     check=False).stdout.strip() or None
    except OSError:
        v["commit"] = None
    return v


class Run:
    """One `cqsa` subprocess in its own session (so kill -9 takes its local cluster along)."""

    def __init__(self, args: list[str], log: str):
        self.args, self.log = args, log
        self.t0 = time.time()
        self._f = open(log, "wb")  # noqa: SIM115 (closed in wait/kill)
        env = {**os.environ, "DASK_CQSA__LEASE_SECONDS": str(LEASE_S)}  # a killed run's lease expires soon
        self.proc = subprocess.Popen([*_cqsa(), *args], stdout=self._f, stderr=subprocess.STDOUT,
                                     start_new_session=True, env=env)

    def events(self) -> list[dict[str, Any]]:
        out = []
        with open(self.log, "rb") as f:
            for line in f.read().decode(errors="replace").splitlines():
                if line.startswith("{"):
                    try:
                        out.append(json.loads(line))
                    except ValueError:
                        pass
        return out

    def kill(self) -> float:
        """kill -9 of the whole session; returns the seconds it ran."""
        if self.proc.poll() is None:
            os.killpg(self.proc.pid, signal.SIGKILL)
        self.proc.wait()
        self._f.close()
        ran = time.time() - self.t0
        time.sleep(LEASE_S + 1)  # until the killed run's lease has expired
        return ran

    def wait(self, timeout: float) -> int:
        try:
            rc = self.proc.wait(timeout=timeout)
        except subprocess.TimeoutExpired:
            self.kill()
            raise
        self._f.close()
        return rc

    def tail(self) -> str:
        with open(self.log, "rb") as f:
            return f.read().decode(errors="replace")[-3000:]


def _engine(store: str):  # type: ignore[no-untyped-def]
    import zarr

    return zarr.open_group(store, mode="r")["_cqsa"]


def _done(store: str, name: str = "task_done") -> int:
    try:
        return int(np.asarray(_engine(store)[name][...]).sum())
    except (KeyError, FileNotFoundError):
        return 0


def _task_records(store: str) -> list[dict[str, Any]]:
    """Figures of every finished quorum task (task_stats rows that are set)."""
    from cqsa_dask.store.layout import STAT_FIELDS

    stats = np.asarray(_engine(store)["task_stats"][...])  # (W, B, J, F)
    recs = []
    for idx in zip(*np.nonzero(~np.isnan(stats[..., 1]))):
        row = stats[idx]
        recs.append({"task": int(idx[0]), **{f: (None if np.isnan(x) else float(x)) for f, x in zip(STAT_FIELDS, row)}})
    return recs


def _wait_for(cond, timeout: float, poll: float = 1.0) -> bool:  # type: ignore[no-untyped-def]
    end = time.time() + timeout
    while time.time() < end:
        if cond():
            return True
        time.sleep(poll)
    return cond()


def _plan(store: str) -> dict[str, Any]:
    return dict(_engine(store).attrs["plan"])


def _synthetic_args(a: argparse.Namespace, n: int) -> list[str]:
    return ["--synthetic", str(n), "--heads", "1", "--head-dim", "128", "--dtype", "bf16", "--seed", str(a.seed),
            "--budget", a.budget, "--json"]


def _summary(tasks: list[dict[str, Any]], plan: dict[str, Any]) -> dict[str, Any]:
    """Per-task means and the extrapolated job time from finished full tasks."""
    if not tasks:
        return {}
    secs = [t["seconds"] for t in tasks]
    comp = [t["compute_seconds"] for t in tasks]
    mean = float(np.mean(secs))
    in_flight = int(plan.get("tasks_in_flight", 1))
    starts = sorted(t["start"] for t in tasks)
    ends = sorted(t["start"] + t["seconds"] for t in tasks)
    # throughput: tasks finished per second of wall time while tasks ran (overlapping in flight)
    span = max(ends) - min(starts)
    rate = len(tasks) / span if span > 0 and len(tasks) > 1 else in_flight / mean
    total_1 = plan["tasks"] / rate
    flops_task = plan["flops"] / plan["tasks"]
    return {
        "tasks_measured": len(tasks), "task_seconds_mean": mean, "task_seconds_min": float(min(secs)),
        "task_seconds_max": float(max(secs)), "compute_seconds_mean": float(np.mean(comp)),
        "task_tflops": flops_task / float(np.mean(comp)) / 1e12,
        "peak_device_bytes_max": max((t["peak_device_bytes"] or 0) for t in tasks),
        "bytes_read_mean": float(np.mean([t["bytes_read"] for t in tasks])),
        "bytes_written_mean": float(np.mean([t["bytes_written"] for t in tasks])),
        "tasks_per_second": rate,
        "extrapolated_seconds_1gpu": total_1, "extrapolated_days_1gpu": total_1 / 86400,
        "extrapolated_seconds_8gpu": total_1 / 8, "extrapolated_days_8gpu": total_1 / 8 / 86400,
        "tokens_per_second_1gpu": plan["seq_len"] / total_1,
        "ratio_to_paper_1B": plan["seq_len"] / total_1 / PAPER_TOKENS_PER_S["1B"],
    }


# -- parts ------------------------------------------------------------------------------------------
def part_smoke(a: argparse.Namespace, work: str) -> dict[str, Any]:
    rec: dict[str, Any] = {}
    import torch

    from cqsa_dask.store.generated import SyntheticSource

    if torch.cuda.is_available():  # the generator gives the same bits on both devices
        src = SyntheticSource(seq_len=2**30, heads_q=2, heads_kv=1, head_dim=128, dtype="bfloat16", seed=a.seed)
        same = True
        for start in (0, 12345, 2**29 + 7, 2**30 - 4096):
            sl = slice(start, start + 4096)
            for which in ("q", "k", "v"):
                fn = getattr(src, which)
                heads = slice(0, 2) if which == "q" else slice(0, 1)
                same &= bool(torch.equal(fn(0, heads, sl, "cpu"), fn(0, heads, sl, "cuda").cpu()))
        rec["generator_cpu_cuda_bitwise_equal"] = same
    store = os.path.join(work, "smoke.zarr")
    r = Run(["run", store, *_synthetic_args(a, a.n), "--groups", "57", "--partials", "bounded"],
            os.path.join(work, "smoke.log"))
    rc = r.wait(600)
    rec["run"] = {"rc": rc, "seconds": time.time() - r.t0, "done": r.events()[-1:] or r.tail()}
    v = subprocess.run([*_cqsa(), "verify", store, "--rows", str(a.rows), "--json"], capture_output=True, text=True,
                       check=False)
    rec["verify"] = {"rc": v.returncode, **(json.loads(v.stdout) if v.stdout.startswith("{") else {"out": v.stdout,
                                                                                                   "err": v.stderr})}
    return rec


def part_full(a: argparse.Namespace, work: str) -> dict[str, Any]:
    store = os.path.join(work, "full.zarr")
    rec: dict[str, Any] = {"n": a.n, "budget": a.budget}
    first = Run(["run", store, *_synthetic_args(a, a.n)], os.path.join(work, "full-1.log"))
    _wait_for(lambda: first.proc.poll() is not None or _done(store) >= a.min_tasks, a.seconds)
    rec["first"] = {"seconds": first.kill(), "tasks_done": _done(store), "events": first.events()[:2],
                    "log_tail": first.tail()[-800:]}
    plan = _plan(store)
    rec["plan"] = plan
    before = {t["task"] for t in _task_records(store)}
    second = Run(["resume", store, "--json"], os.path.join(work, "full-2.log"))
    _wait_for(lambda: second.proc.poll() is not None or _done(store) >= len(before) + a.min_tasks, a.resume_seconds)
    rec["second"] = {"seconds": second.kill(), "tasks_done": _done(store), "events": second.events()[:2],
                     "log_tail": second.tail()[-800:]}
    tasks = _task_records(store)
    redone = [t["task"] for t in tasks if t["task"] in before and t["start"] > second.t0]
    rec["tasks"] = tasks
    rec["redone_after_resume"] = redone
    rec["summary"] = _summary(tasks, plan)
    return rec


def part_rows(a: argparse.Namespace, work: str) -> dict[str, Any]:
    store = os.path.join(work, "rows.zarr")
    rec: dict[str, Any] = {"n": a.n, "budget": a.budget, "groups": a.groups}
    args = ["run", store, *_synthetic_args(a, a.n), "--query-groups", a.groups, "--partials", a.partials]
    first = Run(args, os.path.join(work, "rows-1.log"))
    _wait_for(lambda: first.proc.poll() is not None or os.path.exists(os.path.join(store, "_cqsa", "zarr.json")),
              300)
    plan = _plan(store)
    target = max(1, int(plan["tasks"] * a.kill_after))
    _wait_for(lambda: first.proc.poll() is not None or _done(store) >= target, 600)
    rec["first"] = {"seconds": first.kill(), "tasks_done": _done(store), "merges_done": _done(store, "merge_done"),
                    "log_tail": first.tail()[-800:]}
    rec["plan"] = plan
    done_first = _done(store)
    second = Run(["resume", store, "--json"], os.path.join(work, "rows-2.log"))
    rc = second.wait(900)
    ev = second.events()
    rec["second"] = {"rc": rc, "seconds": time.time() - second.t0, "done": ev[-1] if ev else second.tail()}
    run_again = ev[-1].get("quorum_tasks_run") if ev else None
    rec["executed_in_all"] = done_first + (run_again or 0)
    t0 = time.time()
    v = subprocess.run([*_cqsa(), "verify", store, "--rows", str(a.rows), "--json"], capture_output=True, text=True,
                       check=False)
    rec["verify"] = {"rc": v.returncode, "seconds": time.time() - t0,
                     **(json.loads(v.stdout) if v.stdout.startswith("{") else {"out": v.stdout, "err": v.stderr})}
    tasks = _task_records(store)
    rec["tasks"] = tasks
    rec["slot_seconds_mean"] = float(np.mean([t["compute_seconds"] for t in tasks])) if tasks else None
    if tasks:  # a restricted task computes one or two of a full task's |D| slots
        rec["full_task_seconds_from_slots"] = rec["slot_seconds_mean"] * plan["quorum_size"]
    return rec


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--part", choices=("smoke", "full", "rows"), required=True)
    ap.add_argument("--n", type=int, default=None, help="tokens (smoke: 65536, else 2**30)")
    ap.add_argument("--budget", default="12GB")
    ap.add_argument("--seed", type=int, default=1)
    ap.add_argument("--seconds", type=float, default=200, help="full: run this long before the stop")
    ap.add_argument("--resume-seconds", type=float, default=100, help="full: resume this long before the stop")
    ap.add_argument("--min-tasks", type=int, default=10**9, help="full: stop earlier once this many tasks are done")
    ap.add_argument("--groups", default="0,-1", help="rows: query groups to complete")
    ap.add_argument("--partials", default="bounded", help="rows: partials policy of the job")
    ap.add_argument("--kill-after", type=float, default=0.4, help="rows: stop after this share of the tasks")
    ap.add_argument("--rows", type=int, default=16, help="rows checked by cqsa verify")
    ap.add_argument("--workdir", default=None)
    ap.add_argument("--out", required=True)
    a = ap.parse_args()
    a.n = a.n or (65536 if a.part == "smoke" else 2**30)
    work = a.workdir or tempfile.mkdtemp(prefix="cqsa-billion-")
    os.makedirs(work, exist_ok=True)
    t0 = time.time()
    rec = {"part": a.part, "date": _dt.datetime.now(_dt.UTC).isoformat(timespec="seconds"),
           "versions": _versions(), "argv": sys.argv[1:]}
    rec.update({"smoke": part_smoke, "full": part_full, "rows": part_rows}[a.part](a, work))
    rec["wall_seconds"] = time.time() - t0
    with open(a.out, "w") as f:
        json.dump(rec, f, indent=1, default=str)
    brief = {k: v for k, v in rec.items() if k not in ("tasks",)}
    print(json.dumps(brief, indent=1, default=str)[:6000])
    return 0


if __name__ == "__main__":
    sys.exit(main())
