"""Scale of the Dask graph of an N = 2**30 job (issue 6): build, submit, per-task overhead.

Problem: N = 2**30, B = 1, H = 1, D = 128, bfloat16, budget 12 GB, partials
"bounded" (what "auto" resolves to at this size), for the two planner
settings a user meets and for causal and non-causal jobs::

    cpu-default    tasks_in_flight=1, host_staging=False   W = 3541,  |D| = 60
    cuda-default   tasks_in_flight=2, host_staging=True    W = 11557, |D| = 108

Nothing is computed; three things are measured:

1. build    ``make_plan`` and ``graph.build_graph`` (dummy store path and
            token), each case in a fresh child process: wall time (cold,
            then the median of warm repeats), peak RSS growth (VmHWM reset
            through /proc/self/clear_refs), RSS kept while the graph lives,
            tracemalloc peak (a second fresh child), tasks and dependency
            edges (``HighLevelGraph.get_all_dependencies``).
2. accept   per case a fresh ``dask scheduler`` subprocess (so that its RSS
            figures are the case's own) and one ``dask worker`` subprocess
            (1 process, 1 thread) that does NOT advertise the ``device_mem``
            resource: quorum tasks, which need it, never run, and merges
            wait for them, so the scheduler only has to take the graph
            (``api.run`` would refuse to submit here: ``check_capacity``).
            Unpickling the graph imports ``cqsa_dask.execution.tasks`` (torch, zarr)
            on the scheduler; that import is done first and measured apart.
            The graph is submitted as ``api.run`` does
            (``client.get(graph, keys, sync=False)`` inside the job's span);
            measured: time until ``client.get`` returns, time until the
            scheduler holds all the job's tasks (polled through
            ``run_on_scheduler``, keys whose name starts with "cqsa-"),
            scheduler RSS before and after, then the futures are cancelled
            and the time until the scheduler has forgotten them.
3. overhead the same keys and dependencies with every callable replaced by
            a no-op that returns a tiny dict (merges still receive their
            producers' results as arguments, as the real ones do), no
            annotations (resources, retries, priorities), run on the same
            scheduler with 2 worker processes x 1 thread (a second ``dask
            worker`` joins); results gathered through ``as_completed`` as
            ``api._execute`` does.
            Measured: wall time, and CPU time of the scheduler, the workers
            and the client.  When the rate of the previous case predicts
            more than ``--overhead-limit`` seconds for a whole graph, it is
            cut to its first ``--max-merges`` merges plus all their
            producers (keys and edges of what is kept are unchanged).

Writes ``benchmarks/results/graph-scale-<date>.json`` and prints the JSON
record and a short table.  Usage::

    python benchmarks/graph_scale.py                     # everything: 7.3-10 min on 2 cores
    python benchmarks/graph_scale.py --parts build       # only the client-side build figures
"""

from __future__ import annotations

import argparse
import datetime as _dt
import gc
import json
import os
import platform
import re
import statistics
import subprocess
import sys
import tempfile
import time
import tracemalloc
import warnings
from collections import Counter
from pathlib import Path
from typing import Any

import psutil

ROOT = Path(__file__).resolve().parents[1]
if str(ROOT) not in sys.path:  # run from anywhere, against this checkout
    sys.path.insert(0, str(ROOT))

SHAPE: dict[str, Any] = {
    "seq_len": 2**30, "heads": 1, "head_dim": 128, "batch": 1, "dtype": "bfloat16",
    "budget": "12GB", "partials": "bounded",
}
SETTINGS: dict[str, dict[str, Any]] = {
    "cpu-default": {"tasks_in_flight": 1, "host_staging": False},
    "cuda-default": {"tasks_in_flight": 2, "host_staging": True},
}
CASES = [(s, c) for s in SETTINGS for c in (False, True)]
RESOURCE, RETRIES = "device_mem", 2
STORE, TOKEN = "/nonexistent/graph-scale.zarr", "000000000000"
PREFIX = "cqsa-"


def case_name(setting: str, causal: bool) -> str:
    return f"{setting}{'-causal' if causal else ''}"


def make(setting: str, causal: bool) -> tuple[Any, Any]:
    """(plan, job graph) of one case."""
    from cqsa_dask.core.plan import make_plan
    from cqsa_dask.execution.graph import build_graph

    plan = make_plan(causal=causal, **SHAPE, **SETTINGS[setting])
    return plan, build_graph(STORE, TOKEN, plan, resource=RESOURCE, retries=RETRIES)


# -- 1. build: one fresh child process per case and measure --------------------------------------------------


def _rss() -> int:
    return psutil.Process().memory_info().rss


def _hwm_reset() -> bool:
    try:
        with open("/proc/self/clear_refs", "w") as f:
            f.write("5")  # resets VmHWM, the peak RSS (Linux >= 4.0)
        return True
    except OSError:
        return False


def _hwm() -> int:
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith("VmHWM:"):
                return int(line.split()[1]) * 1024
    raise RuntimeError("no VmHWM in /proc/self/status")


def child_build(setting: str, causal: bool, mode: str, repeats: int) -> dict[str, Any]:
    """In a fresh process: time and memory of make_plan + build_graph."""
    from cqsa_dask.core.plan import make_plan
    from cqsa_dask.execution.graph import build_graph

    kw = {"causal": causal, **SHAPE, **SETTINGS[setting]}
    gc.collect()
    if mode == "tracemalloc":  # cold, under tracemalloc (slower, so not timed)
        tracemalloc.start()
        plan = make_plan(**kw)
        plan_peak = tracemalloc.get_traced_memory()[1]
        tracemalloc.reset_peak()
        jg = build_graph(STORE, TOKEN, plan, resource=RESOURCE, retries=RETRIES)
        cur, peak = tracemalloc.get_traced_memory()
        tracemalloc.stop()
        return {"tracemalloc_plan_peak_bytes": plan_peak, "tracemalloc_build_peak_bytes": peak,
                "tracemalloc_graph_kept_bytes": cur, "tasks": len(jg.keys)}
    rss0, hwm_ok = _rss(), _hwm_reset()
    t0 = time.perf_counter()
    plan = make_plan(**kw)
    t1 = time.perf_counter()
    jg = build_graph(STORE, TOKEN, plan, resource=RESOURCE, retries=RETRIES)
    t2 = time.perf_counter()
    rss1, hwm1 = _rss(), (_hwm() if hwm_ok else None)
    deps = jg.graph.get_all_dependencies()
    edges = sum(len(d) for d in deps.values())
    warm_plan, warm_build = [], []
    for _ in range(repeats):
        del jg
        gc.collect()
        t0w = time.perf_counter()
        plan = make_plan(**kw)
        t1w = time.perf_counter()
        jg = build_graph(STORE, TOKEN, plan, resource=RESOURCE, retries=RETRIES)
        t2w = time.perf_counter()
        warm_plan.append(t1w - t0w)
        warm_build.append(t2w - t1w)
        assert len(jg.keys) == len(deps)
    return {
        "groups": plan.groups, "quorum_size": plan.quorum_size, "task_memory_bytes": plan.task_memory_bytes,
        "partials": plan.partials, "quorum_tasks": len(jg.quorum_keys), "merges": len(jg.merge_keys),
        "tasks": len(jg.keys), "edges": edges,
        "edges_per_merge_max": max(len(deps[k]) for k in jg.merge_keys),
        "make_plan_s_cold": t1 - t0, "build_graph_s_cold": t2 - t1,
        "make_plan_s_warm_median": statistics.median(warm_plan) if warm_plan else None,
        "build_graph_s_warm_median": statistics.median(warm_build) if warm_build else None,
        "rss_peak_growth_bytes": (hwm1 - rss0) if hwm1 is not None else None,
        "rss_kept_growth_bytes": rss1 - rss0,
    }


def measure_builds(repeats: int) -> dict[str, Any]:
    out: dict[str, Any] = {}
    for setting, causal in CASES:
        rec: dict[str, Any] = {}
        for mode in ("time", "tracemalloc"):
            cmd = [sys.executable, __file__, "--child", setting, str(int(causal)), mode, str(repeats)]
            res = subprocess.run(cmd, capture_output=True, text=True, check=True, cwd=ROOT)
            rec.update(json.loads(res.stdout.strip().splitlines()[-1]))
        out[case_name(setting, causal)] = rec
        print(f"  build {case_name(setting, causal)}: {rec['tasks']} tasks, {rec['edges']} edges, "
              f"build_graph {rec['build_graph_s_cold']:.2f} s", file=sys.stderr)
    return out


# -- 2. and 3.: a real scheduler and workers -----------------------------------------------------------------


class Processes:
    """A ``dask scheduler`` subprocess and ``dask worker`` subprocesses, stopped by pid."""

    def __init__(self, logdir: str):
        self.logdir, self.address = logdir, ""
        self.procs: list[tuple[str, subprocess.Popen[bytes], Any]] = []

    def _start(self, name: str, args: list[str]) -> subprocess.Popen[bytes]:
        log = open(os.path.join(self.logdir, f"{name}.log"), "wb")  # noqa: SIM115 (kept open for the child)
        p = subprocess.Popen([sys.executable, "-m", "dask", *args], stdout=log, stderr=subprocess.STDOUT,
                             cwd=ROOT, env={**os.environ, "PYTHONPATH": str(ROOT)})
        self.procs.append((name, p, log))
        return p

    def scheduler(self, timeout: float = 60) -> str:
        self._start("scheduler", ["scheduler", "--host", "127.0.0.1", "--port", "0", "--no-dashboard"])
        path, t0 = os.path.join(self.logdir, "scheduler.log"), time.monotonic()
        while time.monotonic() - t0 < timeout:
            m = re.search(r"Scheduler at:\s+(tcp://\S+)", Path(path).read_text(errors="replace"))
            if m:
                self.address = m.group(1)
                return self.address
            time.sleep(0.2)
        raise RuntimeError(f"no scheduler address in {path} after {timeout} s")

    def worker(self, name: str) -> subprocess.Popen[bytes]:
        return self._start(name, ["worker", self.address, "--nworkers", "1", "--nthreads", "1", "--no-dashboard",
                           "--name", name])

    def stop(self) -> dict[str, int | None]:
        """SIGTERM workers first, then the scheduler; SIGKILL what is left after 30 s."""
        codes: dict[str, int | None] = {}
        for name, p, log in sorted(self.procs, key=lambda t: t[0] == "scheduler"):
            if p.poll() is None:
                p.terminate()
            try:
                codes[name] = p.wait(30)
            except subprocess.TimeoutExpired:
                p.kill()
                codes[name] = p.wait(10)
            log.close()
        return codes


def _scheduler_tasks(dask_scheduler: Any, prefix: str = PREFIX) -> dict[str, int]:
    """Run on the scheduler: the job's tasks by state."""
    states: Counter[str] = Counter()
    for key, ts in dask_scheduler.tasks.items():
        name = key[0] if isinstance(key, tuple) else key
        if isinstance(name, str) and name.startswith(prefix):
            states[ts.state] += 1
    return dict(states)


def _scheduler_import_engine() -> int:
    """Run on the scheduler: import what unpickling the real graph imports; return the pid."""
    import cqsa_dask.execution.graph  # noqa: F401 (torch, zarr via cqsa_dask.tasks)

    return os.getpid()


def _wait_tasks(client: Any, target: int, timeout: float, poll: float, proc: psutil.Process,
                equal: bool = True) -> tuple[dict[str, int], int]:
    """Poll until the scheduler holds ``target`` job tasks (equal) or at most that many; (states, peak RSS)."""
    t0, peak = time.perf_counter(), proc.memory_info().rss
    states: dict[str, int] = {}
    while time.perf_counter() - t0 < timeout:
        states = client.run_on_scheduler(_scheduler_tasks)
        peak = max(peak, proc.memory_info().rss)
        n = sum(states.values())
        if (n == target) if equal else (n <= target):
            return states, peak
        time.sleep(poll)
    raise TimeoutError(f"scheduler holds {states} job tasks, waited for {target}, after {timeout} s")


def _cpu(procs: list[psutil.Process]) -> float:
    """User + system CPU seconds of ``procs`` (gone ones count 0)."""
    total = 0.0
    for p in procs:
        try:
            t = p.cpu_times()
            total += t.user + t.system
        except psutil.NoSuchProcess:
            pass
    return total


def measure_accept(client: Any, proc: psutil.Process, setting: str, causal: bool, poll: float) -> dict[str, Any]:
    """Submit the real graph to a scheduler whose worker lacks the resource; nothing runs."""
    from distributed import span

    _, jg = make(setting, causal)
    n = len(jg.keys)
    gc.collect()
    rss0, cpu0 = proc.memory_info().rss, _cpu([proc])
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        t0 = time.perf_counter()
        with span(f"cqsa-{TOKEN}"):  # as api.run does
            futures = client.get(jg.graph, jg.keys, sync=False)
        t_get = time.perf_counter() - t0
    states, peak = _wait_tasks(client, n, 600, poll, proc)
    t_held = time.perf_counter() - t0
    cpu_held = _cpu([proc]) - cpu0
    time.sleep(1.0)
    rss1 = proc.memory_info().rss
    t1 = time.perf_counter()
    client.cancel(futures)
    del futures
    _wait_tasks(client, 0, 300, poll, proc, equal=False)
    t_cancel = time.perf_counter() - t1
    time.sleep(1.0)
    return {
        "tasks": n, "client_get_s": t_get, "until_held_s": t_held, "poll_s": poll,
        "scheduler_cpu_until_held_s": cpu_held, "states_when_held": states,
        "client_warnings": sorted({str(w.message).splitlines()[0] for w in caught}),
        "scheduler_rss_before_bytes": rss0, "scheduler_rss_held_bytes": rss1,
        "scheduler_rss_peak_bytes": max(peak, rss1), "scheduler_rss_growth_bytes": max(peak, rss1) - rss0,
        "cancel_until_forgotten_s": t_cancel, "scheduler_rss_after_cancel_bytes": proc.memory_info().rss,
    }


def _noop(*args: Any) -> dict[str, Any]:
    return {"kind": "noop", "n": len(args)}


def noop_graph(jg: Any, max_merges: int | None) -> tuple[Any, list[Any], dict[str, Any]]:
    """Same keys and dependencies as ``jg``, no-op callables, no annotations; maybe cut to ``max_merges``."""
    from dask.highlevelgraph import HighLevelGraph, MaterializedLayer

    qname, mname = list(jg.graph.layers)
    quorums, merges = dict(jg.graph.layers[qname]), dict(jg.graph.layers[mname])
    mkeys = sorted(merges, key=lambda k: k[1:])
    if max_merges is not None and len(mkeys) > max_merges:
        mkeys = mkeys[:max_merges]
    keep_m = {k: merges[k] for k in mkeys}
    used = {a for t in keep_m.values() for a in t[1:] if isinstance(a, tuple) and a in quorums}
    keep_q = {k: t for k, t in quorums.items() if k in used} if len(keep_m) < len(merges) else quorums
    edges = sum(1 for t in keep_m.values() for a in t[1:] if isinstance(a, tuple) and a in keep_q)
    layers = {
        qname: MaterializedLayer({k: (_noop, *t[1:]) for k, t in keep_q.items()}),
        mname: MaterializedLayer({k: (_noop, *t[1:]) for k, t in keep_m.items()}),
    }
    hlg = HighLevelGraph(layers, {qname: set(), mname: {qname}})
    keys = list(keep_q) + list(keep_m)
    shape = {"quorum_tasks": len(keep_q), "merges": len(keep_m), "tasks": len(keys), "edges": edges,
             "truncated": len(keep_m) < len(merges)}
    return hlg, keys, shape


def measure_overhead(client: Any, proc: psutil.Process, workers: list[psutil.Process], setting: str,
                     causal: bool, max_merges: int | None) -> dict[str, Any]:
    """Run the no-op graph of the case to the end; results gathered as ``api._execute`` does."""
    from distributed import as_completed

    _, jg = make(setting, causal)
    hlg, keys, shape = noop_graph(jg, max_merges)
    del jg
    gc.collect()
    rss0 = peak = proc.memory_info().rss
    cpu0, wcpu0, ccpu0 = _cpu([proc]), _cpu(workers), time.process_time()
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        t0 = time.perf_counter()
        futures = client.get(hlg, keys, sync=False)
        t_get = time.perf_counter() - t0
    done, errors = 0, 0
    for i, fut in enumerate(as_completed(futures)):
        if fut.status == "error":
            errors += 1
        else:
            fut.result()
            done += 1
        if i % 200 == 0:
            peak = max(peak, proc.memory_info().rss)
    wall = time.perf_counter() - t0
    cpu, wcpu, ccpu = _cpu([proc]) - cpu0, _cpu(workers) - wcpu0, time.process_time() - ccpu0
    client.cancel(futures)
    del futures
    _wait_tasks(client, 0, 300, 0.2, proc, equal=False)
    n = shape["tasks"]
    return {**shape, "client_get_s": t_get, "wall_s": wall, "done": done, "errors": errors,
            "ms_per_task": 1000 * wall / n, "tasks_per_s": n / wall,
            "scheduler_cpu_s": cpu, "scheduler_cpu_ms_per_task": 1000 * cpu / n,
            "workers_cpu_s": wcpu, "client_cpu_s": ccpu,
            "client_warnings": sorted({str(w.message).splitlines()[0] for w in caught}),
            "scheduler_rss_before_bytes": rss0, "scheduler_rss_peak_bytes": peak}


def _tree(p: subprocess.Popen[bytes]) -> list[psutil.Process]:
    """A worker subprocess and its descendants (nanny, worker process)."""
    root = psutil.Process(p.pid)
    return [root, *root.children(recursive=True)]


def run_case(setting: str, causal: bool, parts: set[str], poll: float, max_merges: int | None) -> dict[str, Any]:
    """Parts 2 and 3 of one case on a fresh scheduler (so that its RSS figures are the case's own)."""
    from distributed import Client

    out: dict[str, Any] = {}
    with tempfile.TemporaryDirectory(prefix="graph-scale-") as logdir:
        procs = Processes(logdir)
        try:
            addr = procs.scheduler()
            worker_a = procs.worker("worker-a")
            with Client(addr, timeout=60) as client:
                client.wait_for_workers(1, timeout=120)
                proc = psutil.Process(client.run_on_scheduler(os.getpid))
                out["scheduler_rss_fresh_bytes"] = proc.memory_info().rss
                # Unpickling the real graph imports cqsa_dask.execution.tasks (torch, zarr) on the scheduler:
                # done first, so that the graph's own memory is measured apart.
                t0 = time.perf_counter()
                client.run_on_scheduler(_scheduler_import_engine)
                out["scheduler_engine_import_s"] = time.perf_counter() - t0
                out["scheduler_rss_after_engine_import_bytes"] = proc.memory_info().rss
                if "accept" in parts:
                    out["accept_workers"] = {w["name"]: w.get("resources", {})
                                             for w in client.scheduler_info()["workers"].values()}
                    out["accept"] = measure_accept(client, proc, setting, causal, poll)
                if "overhead" in parts:
                    worker_b = procs.worker("worker-b")
                    client.wait_for_workers(2, timeout=120)
                    out["overhead_workers"] = len(client.scheduler_info()["workers"])
                    out["overhead"] = measure_overhead(client, proc, _tree(worker_a) + _tree(worker_b),
                                                       setting, causal, max_merges)
                out["scheduler_rss_end_bytes"] = proc.memory_info().rss
        finally:
            out["exit_codes"] = procs.stop()
    return out


def run_cluster(parts: set[str], poll: float, max_merges: int, limit_s: float) -> dict[str, Any]:
    """Parts 2 and 3 for every case; a no-op graph is cut to ``max_merges`` merges when the rate
    measured on the previous case predicts more than ``limit_s`` seconds for the whole graph."""
    out: dict[str, Any] = {}
    rate_ms: float | None = None
    for setting, causal in CASES:
        name = case_name(setting, causal)
        tasks = 2 * make(setting, causal)[0].groups  # B = J = 1: W quorum tasks and W merges
        predicted = None if rate_ms is None else rate_ms * tasks / 1000
        cut = max_merges if predicted is not None and predicted > limit_s else None
        rec = run_case(setting, causal, parts, poll, cut)
        rec["overhead_predicted_full_s"] = predicted
        out[name] = rec
        if "overhead" in rec:
            rate_ms = rec["overhead"]["ms_per_task"]
        print(f"  cluster {name}: held after {rec.get('accept', {}).get('until_held_s', float('nan')):.1f} s, "
              f"no-op {rec.get('overhead', {}).get('tasks', 0)} tasks in "
              f"{rec.get('overhead', {}).get('wall_s', float('nan')):.1f} s", file=sys.stderr)
    return out


# -- 4. record ------------------------------------------------------------------------------------------------


def environment() -> dict[str, Any]:
    import dask
    import distributed

    def git(*a: str) -> str:
        r = subprocess.run(["git", *a], check=False, capture_output=True, text=True, cwd=ROOT)
        return r.stdout.strip()

    return {
        "python": platform.python_version(), "dask": dask.__version__, "distributed": distributed.__version__,
        "psutil": psutil.__version__, "platform": platform.platform(), "cpus": os.cpu_count(),
        "memory_bytes": psutil.virtual_memory().total, "load_average": list(os.getloadavg()),
        "git_head": git("rev-parse", "--short", "HEAD"),
        "engine_files_modified": git("status", "--porcelain", "cqsa_dask/graph.py", "cqsa_dask/plan.py",
                                     "cqsa_dask/quorums.py").splitlines(),
    }


def _mb(b: float | None) -> str:
    return "-" if b is None else f"{b / 2**20:,.0f}"


def table(rec: dict[str, Any]) -> str:
    head = ("| case | W | \\|D\\| | tasks | edges | make_plan s | build_graph s (cold / warm) "
            "| client peak RSS +MiB | tracemalloc peak MiB | client.get s | held after s | scheduler RSS +MiB "
            "| no-op tasks | no-op s | ms/task | tasks/s | scheduler CPU ms/task |")
    rows = [head, "|" + "---|" * 17]
    for name, b in rec["build"].items():
        a = rec.get("cluster", {}).get(name, {}).get("accept", {})
        o = rec.get("cluster", {}).get(name, {}).get("overhead", {})
        cut = "*" if o.get("truncated") else ""
        rows.append(
            f"| {name} | {b['groups']} | {b['quorum_size']} | {b['tasks']:,} | {b['edges']:,} "
            f"| {b['make_plan_s_cold']:.3f} | {b['build_graph_s_cold']:.2f} / {b['build_graph_s_warm_median']:.2f} "
            f"| {_mb(b['rss_peak_growth_bytes'])} | {_mb(b['tracemalloc_build_peak_bytes'])} "
            f"| {a.get('client_get_s', float('nan')):.1f} | {a.get('until_held_s', float('nan')):.1f} "
            f"| {_mb(a.get('scheduler_rss_growth_bytes'))} | {o.get('tasks', 0):,}{cut} "
            f"| {o.get('wall_s', float('nan')):.1f} | {o.get('ms_per_task', float('nan')):.2f} "
            f"| {o.get('tasks_per_s', float('nan')):.0f} | {o.get('scheduler_cpu_ms_per_task', float('nan')):.2f} |")
    return "\n".join(rows)


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--child", nargs=4, metavar=("SETTING", "CAUSAL", "MODE", "REPEATS"), help=argparse.SUPPRESS)
    ap.add_argument("--parts", default="build,accept,overhead", help="comma-separated: build, accept, overhead")
    ap.add_argument("--repeats", type=int, default=2, help="warm repeats of make_plan + build_graph")
    ap.add_argument("--poll", type=float, default=0.25, help="seconds between scheduler polls (part 2)")
    ap.add_argument("--overhead-limit", type=float, default=180.0,
                    help="seconds a whole no-op graph may take (predicted from the previous case) before it is cut")
    ap.add_argument("--max-merges", type=int, default=3000, help="merges kept in a cut no-op graph")
    ap.add_argument("--out-dir", default=str(ROOT / "benchmarks" / "results"))
    args = ap.parse_args(argv)
    if args.child:
        setting, causal, mode, repeats = args.child
        print(json.dumps(child_build(setting, bool(int(causal)), mode, int(repeats))))
        return 0
    parts = set(args.parts.split(","))
    date = _dt.date.today().isoformat()
    t0 = time.perf_counter()
    rec: dict[str, Any] = {"benchmark": "graph-scale", "date": date, "issue": 6,
                           "command": "python " + " ".join([os.path.relpath(__file__, ROOT), *sys.argv[1:]]),
                           "shape": SHAPE, "settings": SETTINGS, "resource": RESOURCE, "retries": RETRIES,
                           "environment": environment()}
    rec["build"] = measure_builds(args.repeats)
    if parts & {"accept", "overhead"}:
        rec["overhead_limit_s"], rec["max_merges"] = args.overhead_limit, args.max_merges
        rec["cluster"] = run_cluster(parts, args.poll, args.max_merges, args.overhead_limit)
    rec["load_average_end"] = list(os.getloadavg())
    rec["total_s"] = time.perf_counter() - t0
    print(json.dumps(rec, indent=2, sort_keys=True))
    os.makedirs(args.out_dir, exist_ok=True)
    path = Path(args.out_dir) / f"graph-scale-{date}.json"
    path.write_text(json.dumps(rec, indent=2, sort_keys=True) + "\n")
    print(f"\n{table(rec)}\n\n(* no-op graph cut to the first merges' rows and all their producers)\nwrote {path}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
