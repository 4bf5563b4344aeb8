"""The ``cqsa`` command, run as a user runs it: a subprocess per invocation.

What is checked::

    cqsa plan ...        JSON keys and values equal make_plan's; text lines
    cqsa plan --dtype X  every spelling of the three dtypes
    bad input            exit != 0, exactly one stderr line "cqsa: error: ...",
                         no traceback, nothing written into the store
    cqsa run STORE       JSON progress + "done" line; out/lse == float64
                         reference within 1e-5; inputs left untouched
    cqsa demo            exit 0 and its tokens / memory / exactness lines

Each invocation pays ~5 s of imports and a ``run`` ~10 s more for its local
cluster, so the module fixture starts every command at once in a small
thread pool (longest first) and each test waits only for its own result::

    fixture ──> pool(3) ──> [run e2e] [demo] [scheduler] [plan ...] [errors ...]
                  │
    test_x ───────┴── result("x")   (blocks until that command is done)
"""

from __future__ import annotations

import json
import math
import os
import re
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

from cqsa_dask.client.policy import plan_options
from cqsa_dask.core.plan import make_plan
from cqsa_dask.core.units import parse_budget
from cqsa_dask.store.random_inputs import write_random_inputs

pytestmark = pytest.mark.integration

SPEC_KEYS = {"groups", "quorum_size", "tasks", "task_memory_bytes", "budget_bytes", "flops", "bytes_read",
             "bytes_written"}
BILLION = ["plan", "--seq-len", "1073741824", "--heads", "1", "--head-dim", "128", "--dtype", "bf16",
           "--budget", "12GB"]
DTYPE_SPELLINGS = {"float32": "float32", "float16": "float16", "bfloat16": "bfloat16", "fp32": "float32",
                   "fp16": "float16", "bf16": "bfloat16"}
# Small budgets that still force several groups (every task carries a fixed 2 MiB in the planner's
# memory model); the tests check the planner really picks W >= 7 with them.
RUN_BUDGET = "2.2MB"  # N=600, Hq=2, Hkv=1, D=16, float32 -> W = 13
DEMO_BUDGET = "3.2MB"  # N=4096, Hq=2, Hkv=1, D=32, float32 -> W = 13
E2E = {"seq_len": 600, "heads": 2, "kv_heads": 1, "head_dim": 16, "dtype": "float32"}
SCHEDULER_DEADLINE_S = 40.0  # the spec's "~30 s", plus slack for imports on a loaded 2-core machine




def _seed() -> int:
    return int.from_bytes(os.urandom(4), "little")




@dataclass
class Jobs:
    """The module's ``cqsa`` invocations, running in the background."""

    stores: dict[str, Path]
    before: dict[str, dict[str, str | None]]
    seeds: dict[str, int]
    futures: dict[str, Future[CliResult]] = field(default_factory=dict)

    def result(self, name: str) -> CliResult:
        return self.futures[name].result()


def _store_without_k(path: Path, seed: int) -> None:
    """A Zarr v3 group with q and v (random, never zero) but no k."""
    rng = np.random.default_rng(seed)
    group = zarr.open_group(str(path), mode="w", zarr_format=3)
    for name in ("q", "v"):
        arr = group.create_array(name, shape=(1, 2, 32, 8), chunks=(1, 2, 16, 8), dtype="float32")
        arr[...] = rng.standard_normal((1, 2, 32, 8), dtype=np.float32) + 0.5


def _not_a_group(path: Path, seed: int) -> None:
    path.mkdir()
    (path / "notes.txt").write_bytes(os.urandom(64) + seed.to_bytes(4, "little"))
    (path / "sub").mkdir()


def _commands(stores: dict[str, Path], seeds: dict[str, int]) -> dict[str, tuple[list[str], float, dict[str, str]]]:
    """name -> (arguments, timeout in s, extra environment); longest first."""
    small = ["plan", "--seq-len", "4096", "--heads", "2", "--head-dim", "64"]
    cmds: dict[str, tuple[list[str], float, dict[str, str]]] = {
        "run-e2e": (["run", str(stores["e2e"]), "--json", "--budget", RUN_BUDGET], 240, {}),
        "demo": (["demo", "--seq-len", "4096", "--heads", "2", "--kv-heads", "1", "--head-dim", "32",
                  "--budget", DEMO_BUDGET, "--seed", str(seeds["demo"])], 240, {}),
        "err-scheduler": (["run", str(stores["sched"]), "--scheduler", "tcp://127.0.0.1:1"], 120, {}),
        "run-env-config": (["run", str(stores["env"]), "--json", "--budget", RUN_BUDGET], 240,
                           {"DASK_CQSA__LOCAL_CLUSTER__DASHBOARD_ADDRESS": ":0"}),
        "plan-billion-json": ([*BILLION, "--json"], 120, {}),
        "plan-billion-text": (BILLION, 120, {}),
        "err-budget-parsecs": ([*small, "--budget", "12 parsecs"], 120, {}),
        "err-budget-too-small": ([*small, "--budget", "1kB"], 120, {}),
        "err-heads-kv": (["plan", "--seq-len", "4096", "--heads", "3", "--kv-heads", "2", "--head-dim", "64"], 120, {}),
        "err-dtype-float64": ([*small, "--dtype", "float64"], 120, {}),
        "err-head-dim-512": (["plan", "--seq-len", "4096", "--heads", "2", "--head-dim", "512"], 120, {}),
        "err-unknown-subcommand": (["frobnicate", "--seq-len", "4096"], 120, {}),
        "err-missing-option": (["plan", "--seq-len", "4096", "--head-dim", "64"], 120, {}),
        "err-run-missing-store": (["run", str(stores["missing"])], 120, {}),
        "err-run-not-a-group": (["run", str(stores["not-a-group"])], 120, {}),
        "err-run-no-k": (["run", str(stores["no-k"])], 120, {}),
    }
    for spelling in DTYPE_SPELLINGS:
        cmds[f"dtype-{spelling}"] = ([*small, "--dtype", spelling, "--json"], 120, {})
    return cmds


@pytest.fixture(scope="module")
def jobs(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Jobs]:
    root = tmp_path_factory.mktemp("cli")
    seeds = {name: _seed() for name in ("e2e", "env", "sched", "no-k", "not-a-group", "demo")}
    stores = {name: root / f"{name}.zarr" for name in ("e2e", "env", "sched", "no-k", "not-a-group", "missing")}
    write_random_inputs(stores["e2e"], **E2E, seed=seeds["e2e"])
    write_random_inputs(stores["env"], **E2E, seed=seeds["env"])
    write_random_inputs(stores["sched"], seq_len=64, heads=1, head_dim=8, seed=seeds["sched"])
    _store_without_k(stores["no-k"], seeds["no-k"])
    _not_a_group(stores["not-a-group"], seeds["not-a-group"])
    print(f"cli seeds: {seeds}")
    j = Jobs(stores, {name: snapshot(p) for name, p in stores.items()}, seeds)
    with ThreadPoolExecutor(max_workers=3, thread_name_prefix="cqsa-cli") as pool:
        for name, (args, timeout, env) in _commands(stores, seeds).items():
            j.futures[name] = pool.submit(invoke, args, timeout, env)
        yield j
        for f in j.futures.values():
            f.cancel()


def _assert_one_line_error(r: CliResult) -> str:
    assert r.returncode not in (0, None), f"expected failure:\n{r}"
    assert "Traceback" not in r.stderr and "Traceback" not in r.stdout, f"traceback leaked:\n{r}"
    lines = r.stderr.splitlines()
    assert len(lines) == 1 and lines[0].startswith("cqsa: error:"), f"expected one 'cqsa: error:' line:\n{r}"
    return lines[0]


def _config_plan(**kw: object):  # type: ignore[no-untyped-def]
    """make_plan with the same configuration the CLI reads."""
    return make_plan(**kw, **plan_options())  # type: ignore[arg-type]


# -- cqsa plan -----------------------------------------------------------------


def test_plan_json_for_a_billion_tokens(jobs: Jobs) -> None:
    r = jobs.result("plan-billion-json")
    assert r.returncode == 0 and "Traceback" not in r.stderr, str(r)
    got = json.loads(r.stdout)
    assert SPEC_KEYS <= set(got), f"missing keys {SPEC_KEYS - set(got)}"
    expected = _config_plan(seq_len=2**30, heads=1, head_dim=128, dtype="bf16", budget="12GB").to_dict()
    assert got == expected
    assert got["budget_bytes"] == 12 * 10**9 and got["task_memory_bytes"] <= got["budget_bytes"]
    assert r.seconds < 30, f"`cqsa plan` took {r.seconds:.1f}s (imports included)"


def test_plan_text_mentions_groups_and_tasks(jobs: Jobs) -> None:
    r = jobs.result("plan-billion-text")
    assert r.returncode == 0, str(r)
    p = _config_plan(seq_len=2**30, heads=1, head_dim=128, dtype="bf16", budget="12GB")
    lines = {line.split()[0]: line for line in r.stdout.splitlines() if line.strip()}
    assert f"W={p.groups}" in lines["groups"] and f"|D|={p.quorum_size}" in lines["groups"], r.stdout
    assert f"{p.tasks:,} quorum tasks" in lines["tasks"], r.stdout
    assert "memory" in lines and "1,073,741,824" in r.stdout


@pytest.mark.parametrize("spelling", list(DTYPE_SPELLINGS))
def test_plan_accepts_dtype_spellings(jobs: Jobs, spelling: str) -> None:
    r = jobs.result(f"dtype-{spelling}")
    assert r.returncode == 0, str(r)
    got = json.loads(r.stdout)
    assert got["dtype"] == DTYPE_SPELLINGS[spelling]
    assert got == _config_plan(seq_len=4096, heads=2, head_dim=64, dtype=spelling, budget="12GB").to_dict()


# -- bad input: one line, no traceback, nothing written ------------------------

ERRORS = {
    "err-budget-parsecs": "12 parsecs",
    "err-budget-too-small": "too small",
    "err-heads-kv": "multiple of kv heads",
    "err-dtype-float64": "float64",
    "err-head-dim-512": "512",
    "err-unknown-subcommand": "frobnicate",
    "err-missing-option": "--heads",
    "err-run-missing-store": "does not exist",
    "err-run-not-a-group": "not a Zarr",
    "err-run-no-k": "'k'",
}


@pytest.mark.parametrize("name", list(ERRORS))
def test_bad_input_fails_with_one_line(jobs: Jobs, name: str) -> None:
    line = _assert_one_line_error(jobs.result(name))
    assert ERRORS[name] in line, f"{name}: message should name the problem: {line}"


def test_bad_budget_names_the_smallest_budget_that_works(jobs: Jobs) -> None:
    line = _assert_one_line_error(jobs.result("err-budget-too-small"))
    m = re.search(r"needs ([\d,]+) bytes", line)
    assert m, line
    need = int(m.group(1).replace(",", ""))
    assert _config_plan(seq_len=4096, heads=2, head_dim=64, budget=need).task_memory_bytes <= need


@pytest.mark.parametrize(("store", "name"), [("missing", "err-run-missing-store"),
                                             ("not-a-group", "err-run-not-a-group"), ("no-k", "err-run-no-k")])
def test_bad_store_is_left_untouched(jobs: Jobs, store: str, name: str) -> None:
    _assert_one_line_error(jobs.result(name))
    assert snapshot(jobs.stores[store]) == jobs.before[store]
    if store == "missing":
        assert not jobs.stores[store].exists()


def test_unreachable_scheduler_fails_fast(jobs: Jobs) -> None:
    r = jobs.result("err-scheduler")
    line = _assert_one_line_error(r)
    assert "tcp://127.0.0.1:1" in line, line
    assert r.seconds < SCHEDULER_DEADLINE_S, f"took {r.seconds:.1f}s to give up on the scheduler"
    assert snapshot(jobs.stores["sched"]) == jobs.before["sched"], "a failed run wrote into the store"


# -- cqsa run, end to end ---------------------------------------------------------


def _json_lines(r: CliResult) -> list[dict[str, object]]:
    lines = [line for line in r.stdout.splitlines() if line.strip()]
    try:
        return [json.loads(line) for line in lines]
    except json.JSONDecodeError as e:
        raise AssertionError(f"--json printed a line that is not JSON ({e}):\n{r}") from None


def test_run_end_to_end_matches_float64(jobs: Jobs) -> None:
    r = jobs.result("run-e2e")
    ctx = f"seed {jobs.seeds['e2e']}"
    assert r.returncode == 0 and "Traceback" not in r.stderr, f"{ctx}\n{r}"
    events = _json_lines(r)
    done = events[-1]
    assert done["event"] == "done", f"last line is not the done event: {done}"
    p = _config_plan(seq_len=600, heads=2, kv_heads=1, head_dim=16, dtype="float32", budget=RUN_BUDGET)
    assert p.groups >= 7, f"the budget should force several groups: {p}"
    assert done["tokens"] == 600 and done["resumed"] is False
    assert done["budget_bytes"] == parse_budget(RUN_BUDGET) == p.budget_bytes
    assert done["task_memory_bytes"] == p.task_memory_bytes <= p.budget_bytes
    assert (done["quorum_tasks_run"], done["merges_run"]) == (p.tasks, p.merges)
    progress = [e for e in events[:-1] if e.get("event") == "progress"]
    assert progress == events[:-1] and progress, f"{ctx}: unexpected lines before done: {events[:-1]}"
    assert progress[-1]["done"] == progress[-1]["total"] == p.tasks + p.merges

    group = zarr.open_group(str(jobs.stores["e2e"]), mode="r")
    q, k, v = (torch.from_numpy(np.asarray(group[n][...])) for n in ("q", "k", "v"))
    assert q.shape == (1, 2, 600, 16) and k.shape == v.shape == (1, 1, 600, 16)
    ref_out, ref_lse = reference_attention(q, k, v, causal=False, scale=None)
    # the same reference, spelled out for the GQA mapping: q head h reads kv head h // (Hq / Hkv)
    for h in range(2):
        logits = q[0, h].double() @ k[0, h // 2].double().T / math.sqrt(16)  # (N, N)
        assert torch.allclose(torch.logsumexp(logits, -1), ref_lse[0, h], atol=1e-12, rtol=0)
    out = torch.from_numpy(np.asarray(group["out"][...]))
    lse = torch.from_numpy(np.asarray(group["lse"][...]))
    assert out.shape == (1, 2, 600, 16) and out.dtype == torch.float32, f"{ctx}: out {out.shape} {out.dtype}"
    assert lse.shape == (1, 2, 600) and lse.dtype == torch.float32, f"{ctx}: lse {lse.shape} {lse.dtype}"
    out_err = (out.double() - ref_out).abs().max().item()
    lse_err = (lse.double() - ref_lse).abs().max().item()
    assert out_err <= 1e-5 and lse_err <= 1e-5, f"{ctx}: max |out err| {out_err:.2e}, max |lse err| {lse_err:.2e}"

    def inputs(snap: dict[str, str | None]) -> dict[str, str | None]:  # all but what the engine may write
        return {k: h for k, h in snap.items() if k.split("/")[0] not in ("out", "lse", "_cqsa")}

    assert inputs(snapshot(jobs.stores["e2e"])) == inputs(jobs.before["e2e"]), f"{ctx}: inputs were modified"


def test_run_honours_local_cluster_environment_variables(jobs: Jobs) -> None:
    r = jobs.result("run-env-config")
    assert r.returncode == 0 and "Traceback" not in r.stderr, str(r)
    assert _json_lines(r)[-1]["event"] == "done"


# -- cqsa demo ----------------------------------------------------------------------


def test_demo_runs_and_reports(jobs: Jobs) -> None:
    r = jobs.result("demo")
    assert r.returncode == 0 and "Traceback" not in r.stderr, f"seed {jobs.seeds['demo']}\n{r}"
    assert "\r" not in r.stderr and "tasks" not in r.stderr, f"a progress bar without a terminal:\n{r.stderr}"
    heads = [line.split()[0] for line in r.stdout.splitlines() if line.strip()]
    for word in ("tokens", "memory", "exactness"):
        assert word in heads, f"no line starting with {word!r}:\n{r.stdout}"
    tokens = next(line for line in r.stdout.splitlines() if line.startswith("tokens"))
    assert "4,096 x 2 heads" in tokens, tokens
    exact = next(line for line in r.stdout.splitlines() if line.startswith("exactness"))
    m = re.search(r"max \|out err\| ([0-9.e+-]+)", exact)
    assert m and float(m.group(1)) < 1e-4, exact


@pytest.mark.parametrize("command", [["plan", "--seq-len", "1024", "--heads", "2", "--head-dim", "64"],
                                     ["run", "s.zarr"], ["analyze", "s.zarr"], ["demo"]])
def test_memory_budget_is_another_spelling_of_budget(command: list[str]) -> None:
    """``--memory-budget`` (the Python API's name) and ``--budget`` set the same option."""
    from cqsa_dask.tools.cli import _parser

    for flag in ("--budget", "--memory-budget"):
        assert _parser().parse_args([*command, flag, "3.5GB"]).budget == "3.5GB"


def test_progress_without_a_terminal_is_a_line_every_ten_seconds(capsys: pytest.CaptureFixture[str]) -> None:
    """`--progress` into a log (stderr not a terminal): whole lines, rate-limited, the last one always."""
    from cqsa_dask.tools.cli import _Progress

    bar = _Progress(True, False)
    for done in range(1, 41):
        bar(done, 40)
    err = capsys.readouterr().err
    assert "\r" not in err, repr(err)
    lines = err.splitlines()
    assert len(lines) == 2 and lines[0].startswith("progress    1/40 tasks") and \
        lines[1].startswith("progress    40/40 tasks"), lines
