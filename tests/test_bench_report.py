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
