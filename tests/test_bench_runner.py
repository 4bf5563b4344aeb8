"""benchmarks/runner.py: a real (tiny) CPU run writes one result file of the schema; the report reads it."""

from __future__ import annotations

import json
import re
from dataclasses import asdict
from pathlib import Path

import dask
import pytest

from benchmarks import bench, report
from benchmarks.cases import SUITES, Case, select
from benchmarks.runner import SCHEMA, Runner, result_path


def test_every_declared_case_is_well_formed() -> None:
    """Names are unique within a suite; the performance issue's cases and the old GPU cases are there."""
    for suite, cases in SUITES.items():
        names = [c.name for c in cases]
        assert len(names) == len(set(names)), suite
    gpu = {c.name: c for c in SUITES["gpu"]}
    assert {f"n4M-{b}GB" for b in (1, 2, 4, 8, 16)} <= set(gpu) and gpu["oom"].cap_bytes == 4 * 10**9
    assert gpu["n16M-4GB"].inputs == "generated" and gpu["n4M-4GB-causal"].causal
    perf = {c.name: c for c in SUITES["gpu-perf"]}
    assert perf["n1M-4GB-cold"].mode == "cold" and perf["n1M-H1-12GB"].h == 1
    assert perf["n1M-12GB-causal"].budget_bytes == 12 * 10**9 and perf["n1M-12GB-causal"].causal
    cpu = {c.name: c for c in SUITES["cpu"]}
    assert cpu["cpu-attention"].mode == "attention" and cpu["cpu-attention"].n == 32768
    tiny = select("gpu", ["n4M-4GB", "oom"], tiny=True)
    assert [c.name for c in tiny] == ["n4M-4GB", "oom"] and all(c.device == "cpu" and c.n <= 4096 for c in tiny)
    with pytest.raises(KeyError, match="no case nope"):
        select("gpu", ["nope"])


def test_cli_rejects_an_unknown_case_in_one_line() -> None:
    with pytest.raises(SystemExit, match="^error: suite 'cpu' has no case n4M-4GB"):
        bench.main(["--suite", "cpu", "--cases", "n4M-4GB", "--out-dir", "/nonexistent"])


def test_result_path_is_suite_and_utc_time() -> None:
    assert result_path("r", "cpu", "2026-12-03T10:05:09+00:00") == "r/cpu-20261203T100509Z.json"


@pytest.mark.integration
def test_tiny_cpu_run_writes_one_result_file_the_report_reads(tmp_path: Path) -> None:
    """Two 2K-token cases (run() on a warm cluster, attention() with the user's client), 2 rounds,
    in-process workers: one file, the schema's fields, exact rows, and the report's rows."""
    base = {"n": 2048, "h": 2, "hkv": 1, "d": 32, "dtype": "float32", "device": "cpu", "budget_bytes": None,
            "min_groups": 3}
    cases = [Case(name="t-run", causal=True, **base), Case(name="t-attention", mode="attention", **base)]  # type: ignore[arg-type]
    out = tmp_path / "results"
    with dask.config.set({"cqsa.local-cluster.processes": False}):
        path = Runner("cpu-test", out_dir=str(out), workdir=str(tmp_path / "work"), rounds=2).run(cases)
    assert [p.name for p in out.iterdir()] == [Path(path).name]
    assert re.fullmatch(r"cpu-test-\d{8}T\d{6}Z\.json", Path(path).name)
    doc = json.loads(Path(path).read_text())
    assert doc["schema"] == SCHEMA and doc["gpus"] == 0 and doc["rounds"] == 2
    assert {"cpu", "cpu_count", "gpu", "gpu_count"} <= set(doc["hardware"])
    assert {"python", "torch", "cuda", "dask", "distributed", "zarr"} <= set(doc["versions"])
    assert "commit" in doc["git"] and doc["date_utc"].endswith("+00:00")
    for res, case in zip(doc["results"], cases):
        assert res["error"] is None, res["error"]
        assert res["gpus"] == 0
        assert {k: v for k, v in res["case"].items() if k != "budget_rule"} == {**asdict(case),
                                                                                 "budget_bytes": res["case"]["budget_bytes"]}
        f = res["figures"]
        assert len(f["seconds_all"]) == 2 and len(f["sdpa_seconds_all"]) == 2
        assert f["ratio"] == pytest.approx(f["sdpa_seconds"] / f["seconds"])
        assert f["tflops"] > 0
        assert {"peak_device_bytes", "paired_median", "paired_median_ci95"} <= set(f)
        assert res["check"]["rows"] >= 2 and res["check"]["max_abs_out"] < 1e-5, res["check"]
    run = doc["results"][0]["figures"]
    assert run["bytes_read"] > 0 and run["bytes_written"] > 0 and run["groups"] >= 3
    prof = doc["results"][0]["profile"]
    assert prof["quorum_count"] > 0  # the per-task profile of a warm run
    assert len(prof["quorum_setup_seconds"]) == len(prof["quorum_first_step_seconds"]) == prof["quorum_count"]
    assert all(0 <= a <= b < prof["quorum_seconds"]  # IO set up, then the first step's inputs in, within the task
               for a, b in zip(prof["quorum_setup_seconds"], prof["quorum_first_step_seconds"]))
    md = report.markdown(report.load_results(str(out)))
    for res in doc["results"]:
        row = next(line for line in md.splitlines() if line.startswith(f"| {res['case']['name']} |"))
        assert f"| {res['figures']['ratio']:.3f} (pairs " in row and Path(path).name in row


@pytest.mark.integration
def test_gpu_suite_tiny_through_the_command(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    """The GPU suite's code path at tiny sizes on the CPU, through the command: --cases order, --box."""
    out = tmp_path / "r"
    with dask.config.set({"cqsa.local-cluster.processes": False}):
        bench.main(["--suite", "gpu", "--tiny", "--cases", "oom", "n4M-4GB", "--box", "oom=100",
                    "--out-dir", str(out), "--workdir", str(tmp_path / "w")])
    (path,) = out.iterdir()
    assert path.name.startswith("gpu-tiny-") and f"wrote {path}" in capsys.readouterr().out
    doc = json.loads(path.read_text())
    assert [r["case"]["name"] for r in doc["results"]] == ["oom", "n4M-4GB"]
    oom, n4m = doc["results"]
    assert oom["case"]["time_box"] == 100 and oom["case"]["cap_bytes"] and n4m["case"]["n"] == 4096
    for r in doc["results"]:
        assert r["error"] is None and r["check"]["max_abs_out"] < 2e-2, r
        assert r["figures"]["groups"] >= 1 and r["figures"]["sdpa_seconds"] > 0
    assert "--box oom=100" in doc["command"]
