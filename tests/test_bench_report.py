"""benchmarks/bench.py --report: the generated tables of docs/benchmarks.md, from the JSON record."""

from __future__ import annotations

import json
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "benchmarks"))
import bench

DOCS = Path(__file__).resolve().parents[1] / "docs"


def test_report_replaces_only_its_section_and_lists_every_run(tmp_path: Path) -> None:
    record = json.loads((DOCS / "benchmarks.json").read_text())
    md = tmp_path / "b.md"
    md.write_text("# Benchmarks\n\nhand-written analysis\n")
    for _ in range(2):  # a second run replaces the section instead of appending another
        bench.write_report(str(DOCS / "benchmarks.json"), str(md))
    text = md.read_text()
    assert text.startswith("# Benchmarks\n\nhand-written analysis\n")
    assert text.count(bench.REPORT_BEGIN) == 1 and text.count(bench.REPORT_END) == 1
    for label, suite in record["suites"].items():
        assert f"### `{label}`:" in text, label
        for case in suite.get("cases", []):
            if "seconds" in case.get("cqsa", {}):
                assert f"| {case['name']} | {case['n']:,} |" in text, (label, case["name"])


def test_docs_section_is_current() -> None:
    """docs/benchmarks.md carries exactly the tables its JSON record gives (regenerate with --report)."""
    record = json.loads((DOCS / "benchmarks.json").read_text())
    assert bench.report(record) in (DOCS / "benchmarks.md").read_text()


def test_median_interval_covers_the_median_as_often_as_it_claims() -> None:
    """The order statistics median_ci picks: the exact binomial coverage of the median is
    >= 95 %, and the next narrower pair of order statistics would fall below it."""
    import math
    import random

    def coverage(n: int, k: int) -> float:  # P(x_(k) <= median <= x_(n+1-k)) = 1 - 2 P(Binomial(n, 1/2) < k)
        return 1 - 2 * sum(math.comb(n, i) for i in range(k)) / 2**n

    rng = random.Random(5)
    for n in range(1, 40):
        xs = [rng.lognormvariate(0, 0.3) for _ in range(n)]
        got = bench.median_ci(xs)
        if got is None:
            assert coverage(n, 1) < 0.95, n
            continue
        v = sorted(xs)
        k = v.index(got[0]) + 1
        assert got[1] == v[n - k], n
        assert coverage(n, k) >= 0.95 > coverage(n, k + 1), n
