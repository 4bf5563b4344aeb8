"""The ``cqsa`` command: plan, run, resume, status, verify, dashboard and demo.  The only module that prints.

Every expected failure (a :class:`CQSAError`, a bad option) ends with one
line ``cqsa: error: ...`` on stderr and exit status 2; no traceback.  A
check that ran and failed (``verify``, ``demo``) exits with status 1.
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import resource as _resource
import signal
import sys
import tempfile
import threading
import time
import warnings
from collections.abc import Sequence
from typing import Any, NoReturn

import dask.config

from cqsa_dask import __version__, config
from cqsa_dask.core.dtypes import TOLERANCES, parse_dtype
from cqsa_dask.core.errors import CQSAError, InvalidInputError
from cqsa_dask.core.plan import Plan, make_plan
from cqsa_dask.core.units import format_bytes, parse_budget

__all__ = ["main"]


class _Parser(argparse.ArgumentParser):
    def error(self, message: str) -> NoReturn:
        raise InvalidInputError(f"{message} (see `{self.prog} --help`)")


def _plan_lines(p: Plan) -> list[str]:
    return [
        (f"problem     B={p.batch} Hq={p.heads_q} Hkv={p.heads_kv} N={p.seq_len:,} D={p.head_dim} "
         f"{p.dtype}{' causal' if p.causal else ''}"),
        f"groups      W={p.groups} of {p.group_size:,} tokens, quorum size |D|={p.quorum_size}",
        f"tasks       {p.tasks:,} quorum tasks ({p.heads_per_task} kv heads each) + {p.merges:,} merges",
        (f"memory      {format_bytes(p.task_memory_bytes)} per task, {p.tasks_in_flight} in flight, "
         f"budget {format_bytes(p.budget_bytes)}"),
        (f"work        {p.flops / 1e12:,.3g} TFLOP, reads {format_bytes(p.bytes_read)}, "
         f"writes {format_bytes(p.bytes_written)}"),
        (f"partials    {p.partials}: peak {format_bytes(p.partial_bytes)} on disk "
         f"({p.partial_bytes / p.output_bytes:.2f} x the output, {format_bytes(p.output_bytes)})"),
        *([f"rows        only query groups {', '.join(map(str, p.query_groups))}"] if p.query_groups else []),
        *([(f"keys        k, v streamed from host memory in blocks of {p.query_piece:,} tokens "
           f"({format_bytes(2 * p.seq_len * p.heads_per_task * p.head_dim * p.itemsize)} a task)")]
          if p.stream_keys else []),
    ]


class _Progress:
    """A one-line progress bar with ETA on a terminal (stderr); without one (``--progress`` into a
    log file, a batch job's output) a plain line every ``LOG_EVERY`` seconds instead."""

    LOG_EVERY = 10.0

    def __init__(self, enabled: bool, as_json: bool):
        self.enabled, self.as_json, self.t0 = enabled, as_json, time.perf_counter()
        self.tty = sys.stderr.isatty()
        self.last = float("-inf")  # the first call shows
        self.done = self.total = 0

    def __call__(self, done: int, total: int) -> None:
        now = time.perf_counter()
        self.done, self.total = done, total
        every = 0.2 if self.as_json or self.tty else self.LOG_EVERY
        if not (self.enabled or self.as_json) or (now - self.last < every and done < total):
            return
        self.last = now
        el = now - self.t0
        eta = el / done * (total - done) if done else float("nan")
        if self.as_json:
            print(json.dumps({"event": "progress", "done": done, "total": total,
                              "elapsed_s": round(el, 3), "eta_s": round(eta, 3)}), flush=True)
            return
        if not self.tty:
            sys.stderr.write(f"progress    {done}/{total} tasks, {el:.1f}s elapsed, eta {eta:.1f}s\n")
            sys.stderr.flush()
            return
        width = 30
        fill = int(width * done / max(total, 1))
        sys.stderr.write(f"\r[{'#' * fill}{'.' * (width - fill)}] {done}/{total} tasks  "
                         f"{el:6.1f}s elapsed  eta {eta:6.1f}s")
        if done == total:
            sys.stderr.write("\n")
        sys.stderr.flush()


def _groups_list(text: str) -> list[int]:
    """'0,5,-1' -> [0, 5, -1] (negative: from the last group)."""
    try:
        return [int(x) for x in text.split(",") if x.strip()]
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected comma-separated group numbers such as 0,5,-1, got {text!r}") from None


def _json_object(text: str) -> dict[str, Any]:
    """--storage-options: a JSON object, e.g. '{"endpoint_url": "http://127.0.0.1:9000"}'."""
    try:
        value = json.loads(text)
    except json.JSONDecodeError as e:
        raise argparse.ArgumentTypeError(f"expected a JSON object, got {text!r} ({e})") from None
    if not isinstance(value, dict):
        raise argparse.ArgumentTypeError(f"expected a JSON object such as '{{\"anon\": true}}', got {text!r}")
    return value


def _store_options(p: argparse.ArgumentParser) -> None:
    p.add_argument("--storage-options", type=_json_object, default=None, metavar="JSON",
                   help="fsspec options of a store URL as a JSON object, e.g. '{\"endpoint_url\": "
                        "\"http://host:9000\", \"key\": \"...\", \"secret\": \"...\"}' (default: an s3:// URL "
                        "uses the AWS_* environment variables)")


def _budget_option(p: argparse.ArgumentParser, default: str | None, text: str) -> None:
    """``--budget``, also spelled ``--memory-budget`` (the Python API's name)."""
    p.add_argument("--budget", "--memory-budget", dest="budget", default=default, help=text)


def _job_options(p: argparse.ArgumentParser) -> None:
    p.add_argument("--partials", choices=("auto", "all", "bounded"), default=None,
                   help="partial results: all (|D| x the output on disk, fastest), bounded (folded into each "
                        "row as they arrive, about half the output), auto (default: cqsa.partials)")
    p.add_argument("--query-groups", type=_groups_list, default=None, metavar="A,B,...",
                   help="compute only these query groups' rows (negative counts from the last group)")


def _cmd_plan(a: argparse.Namespace) -> int:
    """Print the plan; sized for this machine's device, or for the workers of ``--scheduler``."""
    from cqsa_dask.client.policy import local_device_kind, plan_options

    budget = a.budget or config.get("memory-budget")
    if a.scheduler is None:
        kind = local_device_kind()
    else:  # what the workers will run: their device kind, and the budget they advertise
        from cqsa_dask.client.cluster import connect, resolve_budget
        from cqsa_dask.client.policy import workers_device_kind

        resource = str(config.get("resource"))
        with connect(None, a.scheduler, budget_bytes=0, resource=resource) as c:
            kind = workers_device_kind(c)
            budget = resolve_budget(a.budget, c, resource, config.get("memory-budget"))
    p = make_plan(seq_len=a.seq_len, heads=a.heads, kv_heads=a.kv_heads, head_dim=a.head_dim,
                  batch=a.batch, dtype=a.dtype, causal=a.causal, scale=a.scale,
                  budget=budget, groups=a.groups,
                  query_groups=a.query_groups,
                  **{**plan_options(kind), **({"partials": a.partials} if a.partials else {})})
    print(p.to_json() if a.json else "\n".join([*_plan_lines(p), f"device      {kind} workers"]))
    return 0


def _run_summary(res: Any, extra: dict[str, Any] | None = None) -> dict[str, Any]:
    p = res.plan
    d = {
        "tokens": p.seq_len, "seconds": round(res.seconds, 3), "tflops": round(res.tflops, 4),
        "tokens_per_s": round(p.seq_len * p.batch / max(res.seconds, 1e-9), 1),
        "quorum_tasks_run": res.quorum_tasks_run, "quorum_tasks_skipped": res.quorum_tasks_skipped,
        "merges_run": res.merges_run, "resumed": res.resumed,
        "task_memory_bytes": p.task_memory_bytes, "budget_bytes": p.budget_bytes,
        "peak_device_bytes": res.peak_device_bytes, "bytes_read": res.bytes_read,
        "bytes_written": res.bytes_written, "kernels": list(res.kernels),
    }
    d.update(extra or {})
    return d


def _start_printer(quiet: bool):  # type: ignore[no-untyped-def]
    def on_start(plan: Plan, link: str | None) -> None:
        if not quiet:
            print("\n".join(_plan_lines(plan)))
            print(f"dashboard   {link or 'n/a'}", flush=True)
    return on_start


_SYNTHETIC_OPTIONS = ("heads", "kv_heads", "head_dim", "dtype", "batch", "seed", "vocab", "gain")


def _synthetic_store(a: argparse.Namespace) -> None:
    """Create the synthetic store of ``run --synthetic N`` (or keep one holding the same source)."""
    from cqsa_dask.store.generated import SyntheticSource, create_synthetic_store, source_of
    from cqsa_dask.store.location import parse_store

    def opt(name: str, default: Any) -> Any:
        value = getattr(a, name)
        return default if value is None else value

    heads = opt("heads", 1)
    src = SyntheticSource(seq_len=a.synthetic, heads_q=heads, heads_kv=opt("kv_heads", heads),
                          head_dim=opt("head_dim", 128), dtype=opt("dtype", "bfloat16"), batch=opt("batch", 1),
                          seed=opt("seed", 0), vocab=opt("vocab", 4096), gain=opt("gain", 2.0))
    location = parse_store(a.store, a.storage_options)
    if location.has_group():
        have = source_of(location.open_group("r"))
        if have == src:
            return  # the same job again: run resumes it
        if have is not None:
            changed = [f"{k} {v!r} -> {src.to_attrs()[k]!r}" for k, v in have.to_attrs().items()
                       if src.to_attrs()[k] != v]
            raise InvalidInputError(f"{location.describe()} holds another synthetic source "
                                    f"({'; '.join(changed)}); give a new path for another job")
    create_synthetic_store(location, src)
    if not a.json:
        print(f"inputs      generated (synthetic-v1, seed {src.seed}, vocab {src.vocab}, gain {src.gain:g}) "
              f"in {a.store}", flush=True)


def _cmd_run(a: argparse.Namespace) -> int:
    from cqsa_dask.client.api import run

    if getattr(a, "gpus", None) is not None:  # the local cluster's workers: one per GPU listed
        dask.config.set({"cqsa.local-cluster.gpus": a.gpus})

    if getattr(a, "synthetic", None) is not None:
        _synthetic_store(a)
    else:
        given = [f"--{n.replace('_', '-')}" for n in _SYNTHETIC_OPTIONS if getattr(a, n, None) is not None]
        if given:
            raise InvalidInputError(f"{', '.join(given)}: only for generated inputs, add --synthetic N")
    tty = sys.stderr.isatty()
    a.progress_bar = _Progress(tty or a.progress, a.json)  # read by _interrupted: how far the job got
    res = run(a.store, storage_options=a.storage_options, causal=a.causal, scale=a.scale, memory_budget=a.budget,
              scheduler=a.scheduler, groups=a.groups, restart=a.restart, progress=a.progress_bar,
              force=getattr(a, "force", False),
              on_start=_start_printer(a.json), partials=a.partials, query_groups=a.query_groups)
    s = _run_summary(res)
    if a.json:
        print(json.dumps({"event": "done", **s}))
    else:
        print(f"done        {s['seconds']}s, {s['tflops']} TFLOP/s, {s['quorum_tasks_run']} tasks, "
              f"{s['merges_run']} merges{' (resumed)' if res.resumed else ''}")
    return 0


def _cmd_resume(a: argparse.Namespace) -> int:
    from cqsa_dask.store.jobstate import status

    p = status(a.store, a.storage_options).plan
    a.causal, a.scale, a.budget, a.groups, a.restart = p["causal"], p["scale"], p["budget_bytes"], p["groups"], False
    a.partials, a.query_groups = p.get("partials", "all"), p.get("query_groups") or None
    return _cmd_run(a)


def _cmd_status(a: argparse.Namespace) -> int:
    from cqsa_dask.store.jobstate import status

    st = status(a.store, a.storage_options)
    if a.json:
        d = {k: getattr(st, k) for k in ("tasks_done", "tasks_total", "merges_done", "merges_total",
                                          "bytes_written", "elapsed_s", "running", "tasks_per_s", "eta_s")}
        print(json.dumps({**d, "complete": st.complete, "plan": st.plan}))
        return 0
    state = "complete" if st.complete else ("running" if st.running else "stopped (resume with `cqsa resume`)")
    eta = f"{st.eta_s:.0f}s" if st.eta_s is not None and not st.complete else "-"
    print(f"state       {state}")
    print(f"tasks       {st.tasks_done:,} / {st.tasks_total:,} quorum tasks, {st.merges_done:,} / "
          f"{st.merges_total:,} merges")
    # a stopped run's active time is what its last lease renewal recorded (a run killed before its
    # first renewal recorded none)
    known = "" if st.running or st.complete else " (as of its last lease renewal)"
    print(f"time        {st.elapsed_s:.1f}s active{known}, {st.tasks_per_s:.2f} tasks/s, eta {eta}")
    print(f"written     ~{format_bytes(st.bytes_written)} (estimated from the plan)")
    return 0


def _cmd_verify(a: argparse.Namespace) -> int:
    from cqsa_dask.tools.verify import verify

    v = verify(a.store, rows=a.rows, seed=a.seed, storage_options=a.storage_options)
    w = v.worst
    if a.json:
        print(json.dumps(v.to_dict()))
    else:
        d = v.to_dict()
        print(f"rows        {d['rows_checked']} checked, {v.skipped} skipped (query group not merged yet); "
              f"float64 reference by {v.method}, {v.seconds:.1f}s")
        print(f"out         max |err| {d['max_abs_out']:.3e}, max |err| / max|v| {d['max_rel_out']:.3e} "
              f"(tolerance {TOLERANCES[v.dtype].out:.3g} for {v.dtype}, plus the logit term)")
        print(f"lse         max |err| {d['max_abs_lse']:.3e}")
        print(f"worst       row b={w.row[0]} h={w.row[1]} n={w.row[2]}: {w.ratio:.3g} of its tolerance")
        print(f"result      {'passed' if v.passed else 'FAILED'}")
    if v.passed:
        return 0
    print(f"cqsa: error: row b={w.row[0]} h={w.row[1]} n={w.row[2]} differs from float64: |out err| {w.abs_out:.3g} "
          f"(allowed {w.allowed_out:.3g}), |lse err| {w.abs_lse:.3g} (allowed {w.allowed_lse:.3g})", file=sys.stderr)
    return 1


def _cmd_analyze(a: argparse.Namespace) -> int:
    from cqsa_dask.analysis.api import analyze
    from cqsa_dask.analysis.plot import plot_analysis, require_matplotlib

    if a.plot:
        require_matplotlib()  # before the work: a missing extra is one line, not a lost run
    r = analyze(a.store, resolution=a.resolution, scheduler=a.scheduler, memory_budget=a.budget)
    print(f"analysis    {r.tasks_run:,} tasks, {r.reductions_run:,} reductions{' (resumed)' if r.resumed else ''}, "
          f"{r.seconds:.1f}s, {format_bytes(r.task_memory_bytes)} per task"
          + (f", kernel {', '.join(r.kernels)}" if r.kernels else ""))
    print(f"written     {a.store}/analysis/key_mass, entropy" + (", block_mass" if r.resolution else ""))
    if a.plot:
        print(f"plot        {plot_analysis(a.store, a.plot)}")
    return 0


def _cmd_dashboard(a: argparse.Namespace) -> int:
    from cqsa_dask.dashboard.summary import write_report

    out = a.out or f"{os.path.splitext(os.path.basename(os.path.normpath(a.store)))[0] or 'cqsa'}-report.html"
    path = write_report(a.store, out, storage_options=a.storage_options)
    print(f"report      {os.path.abspath(path)}")
    return 0


def _cmd_demo(a: argparse.Namespace) -> int:
    from cqsa_dask.client.api import run
    from cqsa_dask.store.random_inputs import write_random_inputs
    from cqsa_dask.tools.verify import check_rows, sample_rows

    budget = parse_budget(a.budget)
    with tempfile.TemporaryDirectory(prefix="cqsa-demo-") as tmp:
        path = os.path.join(tmp, "demo.zarr")
        print(f"creating    a synthetic job in {path}", flush=True)
        group = write_random_inputs(path, seq_len=a.seq_len, heads=a.heads, kv_heads=a.kv_heads,
                                     head_dim=a.head_dim, dtype=a.dtype, seed=a.seed)
        res = run(path, causal=a.causal, memory_budget=budget,
                  progress=_Progress(sys.stderr.isatty(), False), on_start=_start_printer(False))
        rows = sample_rows(group, a.rows, seed=a.seed)
        chk = check_rows(group, rows, causal=a.causal, scale=res.plan.scale)
    rss = _resource.getrusage(_resource.RUSAGE_CHILDREN).ru_maxrss * 1024
    print(f"tokens      {a.seq_len:,} x {a.heads} heads in {res.seconds:.2f}s "
          f"({res.tflops * 1e3:.1f} GFLOP/s, {a.seq_len / res.seconds:,.0f} tokens/s)")
    print(f"memory      predicted task peak {format_bytes(res.plan.task_memory_bytes)} of budget "
          f"{format_bytes(budget)}; device peak {format_bytes(res.peak_device_bytes)}"
          f"{'' if res.peak_device_bytes else f' (cpu: no device counter; worker peak RSS {format_bytes(rss)})'}")
    print(f"exactness   {chk.rows} sampled rows vs float64: max |out err| {chk.max_abs_out:.2e} "
          f"(rel {chk.max_rel_out:.2e}), max |lse err| {chk.max_abs_lse:.2e}")
    tol = TOLERANCES[parse_dtype(a.dtype)].sampled
    if not chk.max_rel_out <= tol:
        print(f"cqsa: error: sampled rows differ from float64 by more than {tol}", file=sys.stderr)
        return 1
    return 0


def _parser() -> argparse.ArgumentParser:
    p = _Parser(prog="cqsa", description="Exact attention beyond device memory (CQS + Dask + Zarr).")
    p.add_argument("--version", action="version", version=f"cqsa-dask {__version__}")
    p.add_argument("-v", "--verbose", action="store_true", help="show Dask's and the engine's logs")
    sub = p.add_subparsers(dest="cmd", required=True, parser_class=_Parser)

    pl = sub.add_parser("plan", help="print the plan of a job without running it")
    pl.add_argument("--seq-len", type=int, required=True, help="tokens N")
    pl.add_argument("--heads", type=int, required=True, help="query heads Hq")
    pl.add_argument("--kv-heads", type=int, default=None, help="kv heads Hkv (default Hq)")
    pl.add_argument("--head-dim", type=int, required=True, help="head dim D (<= 256)")
    pl.add_argument("--batch", type=int, default=1)
    pl.add_argument("--dtype", default="bfloat16", help="float32|float16|bfloat16 (fp32, fp16, bf16)")
    _budget_option(pl, None, "memory budget per worker, e.g. 12GB (default: config)")
    pl.add_argument("--causal", action="store_true")
    pl.add_argument("--scale", type=float, default=None)
    pl.add_argument("--groups", type=int, default=None, help="force the number of token groups W")
    pl.add_argument("--scheduler", default=None,
                    help="size the plan for this Dask scheduler's workers (their device and advertised budget)")
    pl.add_argument("--json", action="store_true", help="machine-readable output")
    _job_options(pl)
    pl.set_defaults(fn=_cmd_plan)

    r = sub.add_parser("run", help="run (or resume) the job of a Zarr store")
    r.add_argument("store", help="path or URL of a Zarr v3 group with arrays q, k, v")
    _store_options(r)
    r.add_argument("--causal", action="store_true")
    r.add_argument("--scale", type=float, default=None)
    _budget_option(r, None, "memory budget per worker (default: workers' resource or config)")
    r.add_argument("--scheduler", default=None, help="address of a Dask scheduler (default: a local cluster)")
    r.add_argument("--gpus", default=None, metavar="all|none|0,1,...",
                    help="GPUs of the local cluster, one worker each (default: cqsa.local-cluster.gpus, all)")
    r.add_argument("--groups", type=int, default=None, help="force the number of token groups W")
    r.add_argument("--restart", action="store_true", help="discard a stored job with a different plan")
    r.add_argument("--json", action="store_true", help="print JSON progress lines and summary")
    r.add_argument("--progress", action="store_true", help="show the progress bar even without a terminal")
    _job_options(r)
    syn = r.add_argument_group("generated inputs (docs/synthetic.md)")
    syn.add_argument("--synthetic", type=int, default=None, metavar="N",
                     help="create STORE as a synthetic store of N tokens (q, k, v generated by the tasks), then run")
    syn.add_argument("--heads", type=int, default=None, help="query heads Hq (default 1)")
    syn.add_argument("--kv-heads", type=int, default=None, help="kv heads Hkv (default Hq)")
    syn.add_argument("--head-dim", type=int, default=None, help="head dim D (default 128)")
    syn.add_argument("--dtype", default=None, help="float32|float16|bfloat16 (default bfloat16)")
    syn.add_argument("--batch", type=int, default=None, help="batch B (default 1)")
    syn.add_argument("--seed", type=int, default=None, help="seed of the generated values (default 0)")
    syn.add_argument("--vocab", type=int, default=None, help="distinct token ids (default 4096)")
    syn.add_argument("--gain", type=float, default=None, help="query scale (default 2.0)")
    r.set_defaults(fn=_cmd_run)

    rs = sub.add_parser("resume", help="finish the unfinished job of a store with its stored plan")
    rs.add_argument("store", help="path or URL of the job's Zarr store")
    _store_options(rs)
    rs.add_argument("--scheduler", default=None, help="address of a Dask scheduler (default: a local cluster)")
    rs.add_argument("--gpus", default=None, metavar="all|none|0,1,...",
                    help="GPUs of the local cluster, one worker each (default: cqsa.local-cluster.gpus, all)")
    rs.add_argument("--force", action="store_true",
                    help="take over the lease of a run on another host (make sure that run is gone first)")
    rs.add_argument("--json", action="store_true", help="print JSON progress lines and summary")
    rs.add_argument("--progress", action="store_true", help="show the progress bar even without a terminal")
    rs.set_defaults(fn=_cmd_resume)

    st = sub.add_parser("status", help="progress of the job in a store (while it runs or after)")
    st.add_argument("store", help="path or URL of the job's Zarr store")
    _store_options(st)
    st.add_argument("--json", action="store_true")
    st.set_defaults(fn=_cmd_status)

    vf = sub.add_parser("verify", help="check sampled rows of a job's out and lse against a float64 reference")
    vf.add_argument("store", help="path or URL of the job's Zarr store (finished, or partly: unmerged rows are "
                                  "skipped)")
    _store_options(vf)
    vf.add_argument("--rows", type=int, default=16, help="random rows checked, plus the first and the last token")
    vf.add_argument("--seed", type=int, default=0, help="seed of the row sample")
    vf.add_argument("--json", action="store_true", help="machine-readable output")
    vf.set_defaults(fn=_cmd_verify)

    an = sub.add_parser("analyze", help="key mass, entropy and block map of a finished job (docs/analysis.md)")
    an.add_argument("store", help="path or URL of the store of a complete job")
    an.add_argument("--resolution", type=int, default=None, metavar="R", help="also the R x R block map")
    an.add_argument("--plot", default=None, metavar="FILE.png", help="draw the results (needs matplotlib)")
    _budget_option(an, None, "memory budget per worker (default: workers' resource or the job's)")
    an.add_argument("--scheduler", default=None, help="address of a Dask scheduler (default: a local cluster)")
    an.set_defaults(fn=_cmd_analyze)

    db = sub.add_parser("dashboard", help="write a static HTML report of a job: time per task, memory curve")
    db.add_argument("store", help="path or URL of the job's Zarr store (finished or stopped)")
    _store_options(db)
    db.add_argument("--out", default=None, help="output HTML file (default: STORE-NAME-report.html here)")
    db.set_defaults(fn=_cmd_dashboard)

    d = sub.add_parser("demo", help="run a synthetic job on a local cluster and check it against float64")
    d.add_argument("--seq-len", type=int, default=32768)
    d.add_argument("--heads", type=int, default=4)
    d.add_argument("--kv-heads", type=int, default=2)
    d.add_argument("--head-dim", type=int, default=64)
    d.add_argument("--dtype", default="float32")
    _budget_option(d, "48MB", "memory budget (default forces several groups)")
    d.add_argument("--causal", action="store_true")
    d.add_argument("--rows", type=int, default=16, help="sampled rows checked against float64")
    d.add_argument("--seed", type=int, default=0)
    d.set_defaults(fn=_cmd_demo)
    return p


class _Terminated(KeyboardInterrupt):
    """SIGTERM, raised in the main thread like Ctrl-C's KeyboardInterrupt (exit status 143)."""


def _on_sigterm(signum: int, frame: Any) -> None:
    raise _Terminated()


def _quiet() -> None:
    """Only cqsa speaks: Dask's and bokeh's logs off, whenever distributed is imported (it is
    imported lazily, after this, and sets its loggers from dask.config when it is)."""
    for handler in logging.getLogger().handlers:  # cqsa's own warnings (a lease taken over) stay
        handler.setLevel(logging.WARNING)
    for name in ("distributed", "bokeh", "tornado"):
        logging.getLogger(name).setLevel(logging.CRITICAL)
    loggers = ("distributed", "distributed.client", "bokeh", "tornado", "tornado.application")
    dask.config.set({"logging": dict.fromkeys(loggers, "critical"), "cqsa.local-cluster.silence-logs": "critical"})
    warnings.simplefilter("ignore")
    # the local cluster's multiprocessing resource tracker (started with these -W options) outlives a
    # run killed with kill -9 and would warn on the terminal about the semaphores it then cleans up
    tracker = "ignore::UserWarning:multiprocessing.resource_tracker"
    if tracker not in sys.warnoptions:  # once, however often main() runs in a process
        sys.warnoptions.append(tracker)


def _interrupted(e: KeyboardInterrupt, args: argparse.Namespace | None) -> int:
    """One line for Ctrl-C / SIGTERM: how far the job got and how to go on; 130 or 143."""
    progress: _Progress | None = getattr(args, "progress_bar", None)
    store = getattr(args, "store", None)
    what = "terminated" if isinstance(e, _Terminated) else "interrupted"
    got = f" after {progress.done:,} of {progress.total:,} tasks" if progress is not None and progress.total else ""
    then = f"; resume with `cqsa resume {store}`" if store and args is not None and args.cmd in ("run", "resume") \
        else ""
    sys.stderr.write(f"\ncqsa: {what}{got}{then}\n")
    return 143 if isinstance(e, _Terminated) else 130


def main(argv: Sequence[str] | None = None) -> int:
    """Entry point of the ``cqsa`` command; returns the exit status."""
    args: argparse.Namespace | None = None
    if threading.current_thread() is threading.main_thread():
        signal.signal(signal.SIGTERM, _on_sigterm)
    try:
        args = _parser().parse_args(argv)
        logging.basicConfig(level=logging.INFO if args.verbose else logging.WARNING,
                            format="%(name)s: %(message)s" if args.verbose else "cqsa: %(message)s")
        if not args.verbose:
            _quiet()
        return int(args.fn(args))
    except CQSAError as e:
        print(f"cqsa: error: {e}", file=sys.stderr)
        return 2
    except BrokenPipeError:  # output piped into a command that stopped reading
        return 0
    except KeyboardInterrupt as e:
        return _interrupted(e, args)


if __name__ == "__main__":  # pragma: no cover
    sys.exit(main())
