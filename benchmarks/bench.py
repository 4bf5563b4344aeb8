"""The benchmark command: run a suite's cases, write one result file, print a summary.

    python -m benchmarks.bench --suite cpu                      # this machine, 3 rounds
    python -m benchmarks.bench --suite cpu --cases cpu-attention --rounds 7
    python -m benchmarks.bench --suite gpu --cases n4M-4GB n4M-4GB-causal   # on the H200
    python -m benchmarks.bench --suite gpu --tiny --out-dir /tmp/r   # the GPU code path, CPU, tiny sizes
    python -m benchmarks.bench --list                            # every suite and case

The cases are declared in benchmarks/cases.py, the measurement in
runner.py; the result goes to ``--out-dir`` (default benchmarks/results/)
as <suite>-<UTC timestamp>.json.  ``python -m benchmarks.report`` then
rewrites the tables and plots of docs/benchmarks.md from every result file.
"""

from __future__ import annotations

import argparse
import dataclasses
import logging
import os
import shlex
import shutil
import sys
import tempfile
import time

if not __package__:  # run as a script (python benchmarks/bench.py): import this checkout's benchmarks package
    sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from benchmarks import cases as _cases

__all__ = ["main"]

RESULTS = os.path.join(os.path.dirname(os.path.abspath(__file__)), "results")


def _parse(argv: list[str] | None) -> argparse.Namespace:
    ap = argparse.ArgumentParser(prog="python -m benchmarks.bench", description=__doc__.split("\n")[0])
    ap.add_argument("--suite", choices=sorted(_cases.SUITES), help="which cases (benchmarks/cases.py)")
    ap.add_argument("--cases", nargs="*", metavar="NAME", help="only these cases of the suite, in this order")
    ap.add_argument("--rounds", type=int, default=None,
                    help="SDPA / cqsa pairs per case, alternating (default: 3 for cpu, 1 otherwise)")
    ap.add_argument("--tiny", action="store_true", help="the cases scaled down to run on the CPU in seconds")
    ap.add_argument("--out-dir", default=RESULTS, help="where the result file goes (default: benchmarks/results)")
    ap.add_argument("--workdir", default=None, help="directory for the Zarr stores (default: a temporary one)")
    ap.add_argument("--deadline", type=float, default=None, metavar="S",
                    help="start no case after S seconds that would not finish by then")
    ap.add_argument("--box", action="append", default=[], metavar="CASE=S",
                    help="stop CASE's cqsa run after S seconds, keeping its finished tasks' figures (repeatable)")
    ap.add_argument("--notes", help="a line kept in the result file (e.g. what else ran on the machine)")
    ap.add_argument("--record-dashboard", metavar="JSON",
                    help="record the /cqsa page's inputs (benchmarks/dashboard_replay.py replays them)")
    ap.add_argument("--list", action="store_true", help="print the suites and their cases, then exit")
    args = ap.parse_args(argv)
    if not args.list and not args.suite:
        ap.error("--suite is required (or --list)")
    return args


def _boxes(specs: list[str]) -> dict[str, float]:
    out: dict[str, float] = {}
    for spec in specs:
        name, _, sec = spec.partition("=")
        try:
            out[name] = float(sec)
        except ValueError:
            out[name] = 0.0
        if not out[name] > 0:
            raise SystemExit(f"error: --box {spec!r}: expected CASE=SECONDS with seconds > 0")
    return out


def _print_suites() -> None:
    for suite, cs in _cases.SUITES.items():
        print(f"{suite}:")
        for c in cs:
            budget = "W>=7" if c.budget_bytes is None else f"{c.budget_bytes / 1e9:g} GB"
            print(f"  {c.name:20s} N={c.n:>9,} H={c.h}/{c.hkv} D={c.d} {c.dtype:8s} causal={int(c.causal)} "
                  f"{budget:>6s} {c.device:4s} {c.mode:9s} {c.inputs}{'' if c.sdpa else ' (cqsa alone)'}")


def _summary(doc: dict) -> str:
    lines = []
    for r in doc["results"]:
        f, name = r["figures"], r["case"]["name"]
        if r.get("error"):
            lines.append(f"{name:20s} ERROR {r['error'].strip().splitlines()[-1]}")
        elif "stopped_after" in f:
            lines.append(f"{name:20s} stopped after {f['stopped_after']:.0f} s, {f.get('quorum_tasks_done')} tasks done")
        else:
            ratio = f.get("ratio")
            err = (r.get("check") or {}).get("max_abs_out")
            lines.append(f"{name:20s} cqsa {f['seconds']:9.3f} s  SDPA {f.get('sdpa_seconds') or float('nan'):9.3f} s"
                         f"  SDPA/cqsa {ratio if ratio is None else f'{ratio:.3f}'}  max|dout| {err}")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> None:
    args = _parse(argv)
    if args.list:
        _print_suites()
        return
    try:
        chosen = _cases.select(args.suite, args.cases, tiny=args.tiny)
    except KeyError as e:
        raise SystemExit(f"error: {e.args[0]}") from None
    boxes = _boxes(args.box)
    chosen = [dataclasses.replace(c, time_box=boxes[c.name]) if c.name in boxes else c for c in chosen]
    if args.record_dashboard:
        from benchmarks.cluster import DashboardRecording

        DashboardRecording.path = args.record_dashboard
    t0 = time.perf_counter()
    from benchmarks.runner import Runner  # imports distributed, which sets its loggers' levels

    logging.basicConfig(level=logging.WARNING, stream=sys.stdout, format="[%(relativeCreated)7.0f ms] %(message)s")
    logging.getLogger("benchmarks").setLevel(logging.INFO)
    logging.getLogger("distributed").setLevel(logging.WARNING)

    own_tmp = args.workdir is None
    workdir = args.workdir or tempfile.mkdtemp(prefix="cqsa-bench-")
    os.makedirs(workdir, exist_ok=True)
    rounds = args.rounds if args.rounds is not None else (3 if args.suite == "cpu" else 1)
    runner = Runner(args.suite + ("-tiny" if args.tiny else ""), out_dir=args.out_dir, workdir=workdir,
                    rounds=rounds, deadline=args.deadline, notes=args.notes,
                    command="python -m benchmarks.bench " + shlex.join(sys.argv[1:] if argv is None else argv))
    try:
        path = runner.run(chosen)
    finally:
        if own_tmp:
            shutil.rmtree(workdir, ignore_errors=True)
    print(_summary(runner.doc))
    print(f"wrote {path} in {time.perf_counter() - t0:.0f} s")


if __name__ == "__main__":
    main()
