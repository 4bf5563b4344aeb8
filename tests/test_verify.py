"""``cqsa verify`` and ``cqsa run --synthetic``: a user's commands, plus the two references behind verify.

What is checked::

    references      token counts (synthetic fast path) == streamed keys to ~1e-12, and both ==
                    tests/reference.py's float64 attention (independent of the code under test)
    verify passes   on a correct stored job and on a synthetic job made by `cqsa run --synthetic`
    verify fails    exit 1, naming the row, when one sampled row of out is corrupted
    partial jobs    only rows of merged groups are checked; none merged: one-line error
    bad arguments   exit 2 with exactly one "cqsa: error:" line, nothing written

The module fixture makes the jobs, then starts every command at once in a
small thread pool; each test waits only for its own result::

    fixture ─> stored job (run in-process) ─> copies: corrupted, partial, unmerged
            ─> `cqsa run --synthetic` (subprocess)
            ─> pool(3) ─> [verify ...] [errors ...]
"""

from __future__ import annotations

import json
import math
import os
import shutil
from collections.abc import Iterator
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import pytest
import torch
import zarr
from clitools import CliResult, invoke, snapshot
from reference import reference_attention

import cqsa_dask
from cqsa_dask.core.plan import Plan
from cqsa_dask.store.generated import SyntheticSource
from cqsa_dask.store.random_inputs import write_random_inputs
from cqsa_dask.tools.reference import streamed_reference
from cqsa_dask.tools.verify import _GeneratedInputs, counted_references, sample_rows, verify

pytestmark = pytest.mark.integration

STORED = {"seq_len": 700, "heads": 2, "kv_heads": 1, "head_dim": 16, "dtype": "float32"}
STORED_BUDGET = "2.2MB"  # N=700, Hq=2, Hkv=1, D=16, float32: several groups
SYNTHETIC = ["--synthetic", "1500", "--heads", "4", "--kv-heads", "2", "--head-dim", "32", "--dtype", "bf16",
             "--causal", "--budget", "2.6MB", "--vocab", "300"]
ROWS = 12  # rows sampled by each verify (plus the first and the last token)


def _seed() -> int:
    return int.from_bytes(os.urandom(4), "little")


# -- the references, in-process ---------------------------------------------------------


@pytest.mark.parametrize("causal", [False, True])
@pytest.mark.parametrize("vocab", [7, 4096])
def test_token_counts_agree_with_streamed_keys_and_float64(causal: bool, vocab: int) -> None:
    seed = _seed()
    src = SyntheticSource(seq_len=2500, heads_q=4, heads_kv=2, head_dim=24, dtype="bfloat16", batch=2, seed=seed,
                          vocab=vocab, gain=1.0 + seed % 7)
    ctx = f"seed {seed}, vocab {vocab}, gain {src.gain}, causal {causal}"
    rng = np.random.default_rng(seed)
    rows = sorted({(0, 0, 0), (1, 3, 2499)} | {(int(rng.integers(2)), int(rng.integers(4)), int(rng.integers(2500)))
                                                for _ in range(10)})
    scale = 24**-0.5
    fast = counted_references(src, rows, causal=causal, scale=scale, chunk=int(rng.integers(100, 1000)))
    q, k, v = (torch.stack([getattr(src, n)(b, slice(None), slice(None)) for b in range(2)]) for n in "qkv")
    ref_out, ref_lse = reference_attention(q, k, v, causal, scale)
    for row in rows:
        slow = streamed_reference(_GeneratedInputs(src), 2, 2500, row, causal=causal, scale=scale, chunk=333)
        f = fast[row]
        assert np.abs(f.out - slow.out).max() <= 1e-12 * max(1.0, np.abs(slow.out).max()), f"{ctx}, row {row}"
        assert abs(f.lse - slow.lse) <= 1e-12 * max(1.0, abs(slow.lse)), f"{ctx}, row {row}"
        assert f.v_max == slow.v_max and math.isclose(f.logit_bound, slow.logit_bound, rel_tol=1e-12)
        want = ref_out[row].numpy()
        assert np.abs(f.out - want).max() <= 1e-12 * max(1.0, np.abs(want).max()), f"{ctx}, row {row}"
        assert abs(f.lse - float(ref_lse[row])) <= 1e-12 * max(1.0, abs(float(ref_lse[row]))), f"{ctx}, row {row}"


# -- the commands --------------------------------------------------------------------------




@dataclass
class Jobs:
    stores: dict[str, Path]
    seeds: dict[str, int]
    corrupted_row: tuple[int, int, int]
    before: dict[str, dict[str, str | None]] = field(default_factory=dict)
    futures: dict[str, Future[CliResult]] = field(default_factory=dict)

    def result(self, name: str) -> CliResult:
        return self.futures[name].result()


def _plan(path: Path) -> Plan:
    return Plan.from_dict(dict(zarr.open_group(str(path), mode="r")["_cqsa"].attrs["plan"]))  # type: ignore[arg-type]


def _group_of(plan: Plan, row: tuple[int, int, int]) -> int:
    return row[2] // plan.group_size


def _corrupt(path: Path, seed: int) -> tuple[int, int, int]:
    """Add 0.5 to one sampled row of out (not the first or last); return it."""
    group = zarr.open_group(str(path), mode="r+")
    rows = sample_rows(group, ROWS, seed)
    row = rows[len(rows) // 2]
    group["out"][row] = np.asarray(group["out"][row]) + 0.5
    return row


def _unmerge(path: Path, seed: int) -> None:
    """Clear the merge markers of the groups of two sampled rows."""
    group = zarr.open_group(str(path), mode="r+")
    plan = _plan(path)
    rows = sample_rows(group, ROWS, seed)
    groups = {_group_of(plan, rows[1]), _group_of(plan, rows[-2])}
    done = group["_cqsa/merge_done"]
    for g in groups:
        done[g] = 0


@pytest.fixture(scope="module")
def jobs(tmp_path_factory: pytest.TempPathFactory, client) -> Iterator[Jobs]:  # type: ignore[no-untyped-def]
    root = tmp_path_factory.mktemp("verify")
    seeds = {n: _seed() for n in ("stored", "synthetic", "verify")}
    print(f"verify seeds: {seeds}")
    stores = {n: root / f"{n}.zarr" for n in ("stored", "synthetic", "corrupted", "partial", "unmerged",
                                              "no-job", "missing", "occupied")}
    with ThreadPoolExecutor(max_workers=3, thread_name_prefix="cqsa-verify") as pool:
        synthetic = pool.submit(invoke, ["run", str(stores["synthetic"]), *SYNTHETIC, "--seed",
                                          str(seeds["synthetic"]), "--json"], 300)
        write_random_inputs(stores["stored"], **STORED, seed=seeds["stored"])
        write_random_inputs(stores["no-job"], **STORED, seed=seeds["stored"])
        res = cqsa_dask.run(stores["stored"], memory_budget=STORED_BUDGET, client=client)
        assert res.plan.groups >= 7, f"the budget should force several groups: {res.plan}"
        for name in ("corrupted", "partial", "unmerged"):
            shutil.copytree(stores["stored"], stores[name])
        row = _corrupt(stores["corrupted"], seeds["verify"])
        _unmerge(stores["partial"], seeds["verify"])
        zarr.open_group(str(stores["unmerged"]), mode="r+")["_cqsa/merge_done"][...] = 0
        stores["occupied"].mkdir()
        (stores["occupied"] / "notes.txt").write_text("mine")
        j = Jobs(stores, seeds, row)
        j.before = {n: snapshot(p) for n, p in stores.items()}
        verify_args = ["--rows", str(ROWS), "--seed", str(seeds["verify"]), "--json"]
        commands: dict[str, tuple[list[str], Future[CliResult] | None]] = {
            "verify-stored": (["verify", str(stores["stored"]), *verify_args], None),
            "verify-stored-text": (["verify", str(stores["stored"]), "--rows", "3"], None),
            "verify-corrupted": (["verify", str(stores["corrupted"]), *verify_args], None),
            "verify-partial": (["verify", str(stores["partial"]), *verify_args], None),
            "verify-synthetic": (["verify", str(stores["synthetic"]), *verify_args], synthetic),
            "err-unmerged": (["verify", str(stores["unmerged"]), *verify_args], None),
            "err-rows-0": (["verify", str(stores["stored"]), "--rows", "0"], None),
            "err-seed-negative": (["verify", str(stores["stored"]), "--seed", "-1"], None),
            "err-missing": (["verify", str(stores["missing"])], None),
            "err-no-job": (["verify", str(stores["no-job"])], None),
            "err-heads-without-synthetic": (["run", str(stores["missing"]), "--heads", "2"], None),
            "err-synthetic-zero": (["run", str(stores["missing"]), "--synthetic", "0"], None),
            "err-synthetic-occupied": (["run", str(stores["occupied"]), "--synthetic", "100"], None),
            "err-synthetic-bad-heads": (["run", str(stores["missing"]), "--synthetic", "100", "--heads", "3",
                                         "--kv-heads", "2"], None),
        }

        def after(args: list[str], dep: Future[CliResult] | None) -> CliResult:
            if dep is not None:
                dep.result()
            return invoke(args, 240)

        j.futures["run-synthetic"] = synthetic
        for name, (args, dep) in commands.items():
            j.futures[name] = pool.submit(after, args, dep)
        yield j
        for f in j.futures.values():
            f.cancel()


def _summary(r: CliResult) -> dict[str, object]:
    try:
        return dict(json.loads(r.stdout.strip().splitlines()[-1]))
    except (json.JSONDecodeError, IndexError) as e:
        raise AssertionError(f"no JSON summary ({e}):\n{r}") from None


def _one_line_error(r: CliResult, status: int) -> str:
    assert r.returncode == status, f"expected exit {status}:\n{r}"
    assert "Traceback" not in r.stderr + r.stdout, f"traceback leaked:\n{r}"
    lines = r.stderr.splitlines()
    assert len(lines) == 1 and lines[0].startswith("cqsa: error:"), f"expected one 'cqsa: error:' line:\n{r}"
    return lines[0]


def test_verify_passes_on_a_correct_stored_job(jobs: Jobs) -> None:
    r = jobs.result("verify-stored")
    assert r.returncode == 0 and r.stderr == "", f"seeds {jobs.seeds}\n{r}"
    s = _summary(r)
    assert s["passed"] is True and s["method"] == "streamed keys" and s["dtype"] == "float32"
    assert s["rows_checked"] == ROWS + 2 and s["rows_skipped"] == 0, s
    assert float(s["max_rel_out"]) < 1e-5 and float(s["max_abs_lse"]) < 1e-4, s  # type: ignore[arg-type]


def test_verify_prints_readable_lines(jobs: Jobs) -> None:
    r = jobs.result("verify-stored-text")
    assert r.returncode == 0, str(r)
    heads = [line.split()[0] for line in r.stdout.splitlines() if line.strip()]
    assert heads == ["rows", "out", "lse", "worst", "result"], r.stdout
    assert "5 checked" in r.stdout and r.stdout.rstrip().endswith("passed"), r.stdout


def test_run_synthetic_then_verify_passes(jobs: Jobs) -> None:
    run = jobs.result("run-synthetic")
    assert run.returncode == 0, f"seeds {jobs.seeds}\n{run}"
    done = _summary(run)
    assert done["event"] == "done" and done["tokens"] == 1500, done
    group = zarr.open_group(str(jobs.stores["synthetic"]), mode="r")
    assert sorted(group) == ["_cqsa", "lse", "out"], sorted(group)
    src = SyntheticSource.from_attrs(dict(group.attrs["cqsa_source"]))
    assert (src.seq_len, src.heads_q, src.heads_kv, src.head_dim, src.dtype, src.seed, src.vocab) == \
        (1500, 4, 2, 32, "bfloat16", jobs.seeds["synthetic"], 300)
    r = jobs.result("verify-synthetic")
    assert r.returncode == 0, f"seeds {jobs.seeds}\n{r}"
    s = _summary(r)
    assert s["passed"] is True and s["method"] == "token counts" and s["dtype"] == "bfloat16", s
    assert s["rows_checked"] == ROWS + 2 and s["rows_skipped"] == 0, s


def test_verify_fails_and_names_the_corrupted_row(jobs: Jobs) -> None:
    r = jobs.result("verify-corrupted")
    line = _one_line_error(r, 1)
    b, h, n = jobs.corrupted_row
    assert f"b={b} h={h} n={n}" in line, f"the message should name row {jobs.corrupted_row}: {line}"
    s = _summary(r)
    assert s["passed"] is False and float(s["max_abs_out"]) >= 0.4, s  # type: ignore[arg-type]
    worst = s["worst_row"]
    assert isinstance(worst, dict) and (worst["b"], worst["h"], worst["n"]) == jobs.corrupted_row, s


def test_verify_checks_only_rows_of_merged_groups(jobs: Jobs) -> None:
    r = jobs.result("verify-partial")
    assert r.returncode == 0, str(r)
    s = _summary(r)
    v = verify(jobs.stores["partial"], rows=ROWS, seed=jobs.seeds["verify"])
    group = zarr.open_group(str(jobs.stores["partial"]), mode="r")
    plan, done = _plan(jobs.stores["partial"]), np.asarray(group["_cqsa/merge_done"][...])  # (W, B, J)
    assert not done.all() and done.any()
    for res in v.results:
        b, h, _ = res.row
        assert done[_group_of(plan, res.row), b, h // plan.q_heads_per_task], f"row {res.row} is not merged"
    assert v.passed and len(v.results) >= ROWS // 2, f"{len(v.results)} rows checked"
    assert (s["rows_checked"], s["rows_skipped"]) == (len(v.results), v.skipped), s


ERRORS = {
    "err-unmerged": (2, "none of the"),
    "err-rows-0": (2, "rows"),
    "err-seed-negative": (2, "seed"),
    "err-missing": (2, "does not exist"),
    "err-no-job": (2, "no cqsa job"),
    "err-heads-without-synthetic": (2, "--synthetic"),
    "err-synthetic-zero": (2, "seq_len"),
    "err-synthetic-occupied": (2, "not empty"),
    "err-synthetic-bad-heads": (2, "multiple of kv heads"),
}


@pytest.mark.parametrize("name", list(ERRORS))
def test_bad_input_fails_with_one_line(jobs: Jobs, name: str) -> None:
    status, words = ERRORS[name]
    line = _one_line_error(jobs.result(name), status)
    assert words in line, f"{name}: the message should say {words!r}: {line}"


def test_failed_commands_write_nothing(jobs: Jobs) -> None:
    for name in ERRORS:
        jobs.result(name)
    for store in ("unmerged", "no-job", "occupied", "stored"):
        assert snapshot(jobs.stores[store]) == jobs.before[store], f"{store} was modified"
    assert not jobs.stores["missing"].exists()
    assert (jobs.stores["occupied"] / "notes.txt").read_text() == "mine"
