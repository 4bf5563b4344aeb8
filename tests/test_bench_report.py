"""benchmarks/report.py: the latest result per case from the result files, the tables of docs/benchmarks.md."""

from __future__ import annotations

import json
import math
import random
from pathlib import Path
from typing import Any

import pytest

from benchmarks import report
from benchmarks.checks import median_ci

ROOT = Path(__file__).resolve().parents[1]


def _result(name: str, date: str, *, seconds: float | None = None, sdpa: float | None = None,
            error: str | None = None, **case: Any) -> dict[str, Any]:
    fig: dict[str, Any] = {}
    if seconds is not None:
        fig["seconds"] = seconds
    if sdpa is not None:
        fig.update(sdpa_seconds=sdpa, ratio=sdpa / seconds if seconds else None)
    return {"case": {"name": name, "n": 4 * 2**20, "h": 4, "hkv": 4, "d": 128, "dtype": "bfloat16", "causal": False,
                     "budget_bytes": 4 * 10**9, "device": "cuda", "mode": "warm", **case},
            "date_utc": date, "figures": fig, "error": error}


def _write(folder: Path, file: str, results: list[dict[str, Any]], **top: Any) -> None:
    doc = {"schema": report.SCHEMA, "suite": "gpu", "date_utc": results[0]["date_utc"], "results": results, **top}
    (folder / file).write_text(json.dumps(doc))


def test_latest_result_per_case_across_files(tmp_path: Path) -> None:
    """The newest result of each name wins by its date, not by file order; a failed attempt does not
    replace a figure; files of other records in the folder are ignored."""
    _write(tmp_path, "z-old.json", [_result("n4M-4GB", "2026-11-28T10:00:00+00:00", seconds=90.0, sdpa=72.0),
                                    _result("n1M-4GB", "2026-11-28T10:05:00+00:00", seconds=6.5, sdpa=4.1)],
           hardware={"gpu": "NVIDIA H200", "gpu_count": 1}, versions={"torch": "2.11.0"}, command="old command")
    _write(tmp_path, "a-new.json", [_result("n4M-4GB", "2026-11-29T05:06:34+00:00", seconds=71.39, sdpa=76.03)],
           git={"commit": "0123456789abcdef"})
    _write(tmp_path, "m-failed.json", [_result("n1M-4GB", "2026-12-01T00:00:00+00:00", error="Traceback ...")])
    (tmp_path / "billion-rows.json").write_text(json.dumps({"part": "rows"}))

    docs = report.load_results(str(tmp_path))
    assert sorted(d["_file"] for d in docs) == ["a-new.json", "m-failed.json", "z-old.json"]
    cur = report.current(docs)
    assert cur["n4M-4GB"][0]["_file"] == "a-new.json"
    assert cur["n1M-4GB"][0]["_file"] == "z-old.json"

    md = report.markdown(docs)
    row = next(line for line in md.splitlines() if line.startswith("| n4M-4GB |"))
    assert "| 76.03 | 71.39 | 1.065 |" in row and "2026-11-29 05:06" in row and "a-new.json" in row
    assert "`--suite gpu --cases n4M-4GB`" in row  # the command that reproduces it, from cases.py
    assert "| 4.10 | 6.50 | 0.631 |" in md
    assert "0123456789" in md and "old command" in md  # the runs table: commit, command as run


@pytest.mark.parametrize("settings", [{"local-cluster.processes": False}, {"tasks-in-flight": 4},
                                      {"query-piece": 0}, {"cuda-turn": "streams"}, {"io-order": "fifo"}],
                         ids=["threads", "flight", "piece", "turn", "io-order"])
def test_an_ab_run_of_another_setting_is_not_current(tmp_path: Path, settings: dict[str, Any]) -> None:
    """A newer run under a setting other than its default (recorded in the file's settings) stays
    out of the current table; the older run under the defaults keeps the case's row."""
    defaults = {"cuda-turn": "auto", "local-cluster.processes": "auto", "tasks-in-flight": "auto",
                "query-piece": "auto"}
    one = {"groups": 1}
    _write(tmp_path, "a.json", [_result("n1M-12GB", "2026-12-03T19:00:00+00:00", seconds=4.8, sdpa=4.4, **one)],
           settings=defaults)
    res = _result("n1M-12GB", "2026-12-03T20:00:00+00:00", seconds=4.1, sdpa=4.4, **one)
    res["figures"]["groups"] = 1
    _write(tmp_path, "b.json", [res], settings={**defaults, **settings})
    assert report.current(report.load_results(str(tmp_path)))["n1M-12GB"][0]["_file"] == "a.json"


def test_missing_fields_render_empty(tmp_path: Path) -> None:
    """A result carrying only a ratio (an old record), or a stopped run, still renders a row."""
    only_ratio = _result("cpu-attention", "2026-12-03", device="cpu", mode="attention", n=32768, h=2)
    only_ratio["figures"] = {"ratio": 0.69}
    stopped = _result("n4M-1GB", "2026-11-29T00:00:00+00:00", budget_bytes=10**9)
    stopped["figures"] = {"stopped_after": 62.8, "quorum_tasks_done": 40, "tasks": 1064}
    _write(tmp_path, "r.json", [only_ratio, stopped])  # no hardware, versions, git, command
    md = report.markdown(report.load_results(str(tmp_path)))
    assert "| cpu-attention | 32k | 2 | no | 4 | attention(), user's client |  |  |  | 0.690 |" in md
    assert "stopped at 63 s (40/1064 tasks)" in md
    assert "not recorded" in md


def test_splice_replaces_only_its_section() -> None:
    md = "# Benchmarks\n\nhand-written method\n"
    once = report.splice(md, report.BEGIN + "\nA\n" + report.END + "\n")
    twice = report.splice(once + "\n## after\n", report.BEGIN + "\nB\n" + report.END + "\n")
    assert twice.startswith(md) and twice.count(report.BEGIN) == 1 and twice.count(report.END) == 1
    assert "\nB\n" in twice and "\nA\n" not in twice and twice.endswith("## after\n")


def test_docs_section_is_current() -> None:
    """docs/benchmarks.md carries exactly the tables the result files give (python -m benchmarks.report)."""
    section = report.markdown(report.load_results())
    assert section in (ROOT / "docs" / "benchmarks.md").read_text()
    for png in report.PLOTS:
        assert (ROOT / "docs" / png).exists(), png


def test_fit_exponent_recovers_a_power_law() -> None:
    pts = [(n, 3e-12 * n**1.9) for n in (2**20, 2**21, 2**22, 2**24)]
    assert report.fit_exponent(pts) == pytest.approx(1.9)
    assert report.fit_exponent(pts[:1]) is None


def test_median_interval_covers_the_median_as_often_as_it_claims() -> None:
    """The order statistics median_ci picks: the exact binomial coverage of the median is
    >= 95 %, and the next narrower pair of order statistics would fall below it."""

    def coverage(n: int, k: int) -> float:  # P(x_(k) <= median <= x_(n+1-k)) = 1 - 2 P(Binomial(n, 1/2) < k)
        return 1 - 2 * sum(math.comb(n, i) for i in range(k)) / 2**n

    rng = random.Random(5)
    for n in range(1, 40):
        xs = [rng.lognormvariate(0, 0.3) for _ in range(n)]
        got = median_ci(xs)
        if got is None:
            assert coverage(n, 1) < 0.95, n
            continue
        v = sorted(xs)
        k = v.index(got[0]) + 1
        assert got[1] == v[n - k], n
        assert coverage(n, k) >= 0.95 > coverage(n, k + 1), n


def test_a_run_under_a_former_default_stays_current(tmp_path: Path) -> None:
    """Worker processes were the default until 2026-12-04 15:45: such a run from before then still
    counts as a default run of its case; one from after it is an A/B run."""
    one = {"groups": 1}
    old = {"cuda-turn": "auto", "local-cluster.processes": True}
    _write(tmp_path, "a.json", [_result("n4M-4GB", "2026-12-03T19:00:00+00:00", seconds=65.0, sdpa=78.0, **one)],
           settings=old)
    assert report.current(report.load_results(str(tmp_path)))["n4M-4GB"][0]["_file"] == "a.json"
    _write(tmp_path, "b.json", [_result("n4M-4GB", "2026-12-04T19:00:00+00:00", seconds=64.0, sdpa=78.0, **one)],
           settings={**old, "local-cluster.processes": "auto"})
    assert report.current(report.load_results(str(tmp_path)))["n4M-4GB"][0]["_file"] == "b.json"
    _write(tmp_path, "c.json", [_result("n4M-4GB", "2026-12-04T20:00:00+00:00", seconds=63.0, sdpa=78.0, **one)],
           settings=old)  # processes after the change: an A/B run
    assert report.current(report.load_results(str(tmp_path)))["n4M-4GB"][0]["_file"] == "b.json"


@pytest.mark.parametrize("device", ["cuda", "cpu"])
def test_a_run_its_notes_call_an_ab_run_is_not_current(tmp_path: Path, device: str) -> None:
    """Session k's fifo runs ran before the files recorded io-order: their notes say "A/B: ..."; so do
    CPU runs of another setting or commit."""
    _write(tmp_path, "a.json", [_result("n1M-12GB", "2026-12-04T18:03:00+00:00", seconds=4.3, sdpa=4.2,
                                        device=device)], notes="io-order tasks")
    _write(tmp_path, "b.json", [_result("n1M-12GB", "2026-12-04T18:04:00+00:00", seconds=4.7, sdpa=4.2,
                                        device=device)], notes="A/B: io-order fifo")
    assert report.current(report.load_results(str(tmp_path)))["n1M-12GB"][0]["_file"] == "a.json"


def test_cuda_turn_counts_as_the_default_of_its_day(tmp_path: Path) -> None:
    """Until 2026-12-04 18:30 "auto" took turns at W = 1 (an explicit "kernels" run there was a default
    run, "streams" an A/B run); since then the default is streams (and "auto" reads as streams)."""
    def current_file(name: str, date: str, turn: str) -> str:
        res = _result("n1M-12GB", date, seconds=4.5, sdpa=4.0, groups=1)
        res["figures"]["groups"] = 1
        _write(tmp_path, name, [res], settings={"cuda-turn": turn})
        return str(report.current(report.load_results(str(tmp_path)))["n1M-12GB"][0]["_file"])

    assert current_file("a.json", "2026-12-04T17:00:00+00:00", "kernels") == "a.json"
    assert current_file("b.json", "2026-12-04T17:30:00+00:00", "streams") == "a.json"  # an A/B run then
    assert current_file("c.json", "2026-12-04T19:00:00+00:00", "streams") == "c.json"
    assert current_file("d.json", "2026-12-04T19:30:00+00:00", "kernels") == "c.json"  # an A/B run now
    assert current_file("e.json", "2026-12-04T20:00:00+00:00", "auto") == "e.json"


def test_a_sampled_run_is_not_current(tmp_path: Path) -> None:
    """A run under the sampler (CQSA_BENCH_SAMPLE=1, benchmarks/sampler.py) is slowed by it: it stays
    in its file, not in the current table."""
    one = {"groups": 1}
    settings = {"cuda-turn": "auto", "local-cluster.processes": "auto"}
    _write(tmp_path, "a.json", [_result("n1M-12GB", "2026-12-04T19:00:00+00:00", seconds=4.6, sdpa=4.0, **one)],
           settings=settings)
    sampled = _result("n1M-12GB", "2026-12-04T20:00:00+00:00", seconds=4.9, sdpa=4.0, **one)
    sampled.setdefault("detail", {})["sample"] = {"cqsa-io": {"samples": 10, "top": []}}
    _write(tmp_path, "b.json", [sampled], settings=settings)
    assert report.current(report.load_results(str(tmp_path)))["n1M-12GB"][0]["_file"] == "a.json"


def test_busy_and_gaps_of_a_gpu_trace() -> None:
    """The union of overlapping kernels (two streams) and the idle gaps of the window, longest first."""
    from benchmarks.gputrace import busy_and_gaps

    spans = [(12.0, 20.0), (15.0, 25.0), (40.0, 50.0), (49.0, 52.0), (0.0, 11.0)]  # the last starts before lo
    busy, gaps = busy_and_gaps(spans, 10.0, 60.0)
    assert busy == pytest.approx(1.0 + 13.0 + 12.0)
    assert gaps == [(15.0, 15.0), (42.0, 8.0), (1.0, 1.0)]
    assert busy_and_gaps([], 0.0, 5.0) == (0.0, [(0.0, 5.0)])
