"""Partials policies (``cqsa_dask.execution.partials``): one object per policy.

What each policy decides, and where it shows::

    store     the arrays under _cqsa (names, shapes, chunks: the store format, unchanged)
    planner   Plan.bytes_written / partial_bytes / folds delegate to it; import-pure
    graph     the quorum tasks' priority (bounded: index order)
"""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import zarr

from cqsa_dask.core.errors import InvalidInputError
from cqsa_dask.core.plan import make_plan
from cqsa_dask.execution.graph import build_graph
from cqsa_dask.execution.partials import AllPartials, BoundedPartials, policy_for, policy_names
from cqsa_dask.execution.partials.bounded import journal_bytes, state_bytes
from cqsa_dask.store.layout import create_outputs, open_job


def test_policies_by_name() -> None:
    assert policy_names() == ("all", "bounded")
    assert isinstance(policy_for("all"), AllPartials) and isinstance(policy_for("bounded"), BoundedPartials)
    with pytest.raises(InvalidInputError, match="partials must be one of") as info:
        policy_for("some")
    assert isinstance(info.value, ValueError)
    with pytest.raises(InvalidInputError, match="'all', 'bounded', 'auto'"):
        make_plan(seq_len=100, heads=1, head_dim=8, partials="some")


@pytest.mark.parametrize("causal", [False, True])
@pytest.mark.parametrize("name", ["all", "bounded"])
def test_the_plan_delegates_its_partial_figures(name: str, causal: bool) -> None:
    p = make_plan(seq_len=3001, heads=4, kv_heads=2, head_dim=32, budget="3MB", causal=causal, partials=name)
    pol = policy_for(name)
    assert p.policy is pol
    assert (p.bytes_written, p.partial_bytes, p.folds) == (pol.bytes_written(p), pol.partial_bytes(p), pol.folds(p))
    d = p.to_dict()
    assert (d["bytes_written"], d["partial_bytes"], d["folds"]) == (p.bytes_written, p.partial_bytes, p.folds)
    assert (p.folds > 0) == (name == "bounded")


def test_planning_loads_neither_torch_nor_zarr() -> None:
    """``cqsa plan`` must stay light: the policies' byte figures are import-pure."""
    code = ("import sys, cqsa_dask\n"
            "for part in ('all', 'bounded', 'auto'):\n"
            "    p = cqsa_dask.make_plan(seq_len=10**6, heads=4, head_dim=64, budget='1GB', partials=part)\n"
            "    p.to_json(), p.policy\n"
            "print(sorted(m for m in ('torch', 'zarr', 'distributed') if m in sys.modules))\n")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout
    assert out.strip() == "[]", out


def _arrays(group: zarr.Group, prefix: str = "") -> dict[str, tuple[tuple[int, ...], tuple[int, ...], str]]:
    found = {}
    for name, node in group.members():
        if isinstance(node, zarr.Array):
            found[prefix + name] = (node.shape, node.chunks, str(node.dtype))
        else:
            found.update(_arrays(node, prefix + name + "/"))
    return found


@pytest.mark.parametrize("name", ["all", "bounded"])
def test_the_store_format_is_unchanged(tmp_path: Path, name: str) -> None:
    """Every array of a new job, written out from the store format (docs/store-format.md):
    bounded jobs keep the (unwritten) partial arrays beside their fold arrays."""
    p = make_plan(seq_len=301, heads=4, kv_heads=2, head_dim=32, dtype="bf16", budget="2.2MB", groups=13,
                  partials=name)
    b, hq, n, d, ht, g, s = p.batch, p.heads_q, p.seq_len, p.head_dim, p.q_heads_per_task, p.group_size, p.quorum_size
    grid = (p.groups, b, p.head_blocks)
    want = {
        "out": ((b, hq, n, d), (1, ht, g, d), "uint16"), "lse": ((b, hq, n), (1, ht, g), "float32"),
        "_cqsa/partial_out": ((s, b, hq, n, d), (1, 1, ht, g, d), "float32"),
        "_cqsa/partial_lse": ((s, b, hq, n), (1, 1, ht, g), "float32"),
        "_cqsa/task_done": (grid, (1, 1, 1), "uint8"), "_cqsa/merge_done": (grid, (1, 1, 1), "uint8"),
        "_cqsa/task_stats": ((*grid, 9), (1, 1, 1, 9), "float64"),
        "_cqsa/merge_stats": ((*grid, 9), (1, 1, 1, 9), "float64"),
    }
    if name == "bounded":
        sb, jb = state_bytes(p), journal_bytes(p)
        assert sb == 16 + 8 + ht * g * (d + 4) and jb == 8 + ht * g * d * 2
        want |= {"_cqsa/fold_state": ((*grid, sb), (1, 1, 1, sb), "uint8"),
                 "_cqsa/fold_journal": ((*grid, jb), (1, 1, 1, jb), "uint8"),
                 "_cqsa/fold_journal_head": ((*grid, 2), (1, 1, 1, 2), "int64")}
    group = zarr.open_group(str(tmp_path / "s.zarr"), mode="w", zarr_format=3)
    for inp in ("q", "k", "v"):
        group.create_array(inp, shape=(b, hq if inp == "q" else 2, n, d), dtype="float32")
    create_outputs(group, p, "tok")
    got = {k: v for k, v in _arrays(group).items() if k not in ("q", "k", "v")}
    assert got == want
    job = open_job(str(tmp_path / "s.zarr"), "tok")
    opened = {"all": {"partial_out", "partial_lse"}, "bounded": {"fold_state", "fold_journal", "fold_journal_head"}}
    assert set(job.partials) == opened[name]


@pytest.mark.parametrize("name", ["all", "bounded"])
def test_the_quorum_tasks_priority_is_the_policys(name: str) -> None:
    """Bounded jobs run quorum tasks in index order (rows fill up early); "all" leaves Dask's order."""
    p = make_plan(seq_len=900, heads=2, head_dim=16, groups=13, budget="1GB", partials=name)
    jg = build_graph("/nowhere", "tok", p, resource="device_mem", retries=0)
    layer = jg.graph.layers["cqsa-quorum-tok"]
    priority = layer.annotations["priority"]
    keys = sorted(layer.keys(), key=lambda k: k[1])
    assert len(keys) == p.tasks
    got = [priority(k) if callable(priority) else priority for k in keys]
    assert got == ([-k[1] for k in keys] if name == "bounded" else [0] * len(keys))
    assert np.all(np.diff(got) <= 0)


@pytest.mark.parametrize("causal", [False, True], ids=["full", "causal"])
@pytest.mark.parametrize("name", ["all", "bounded"])
def test_tasks_called_directly_run_each_policy_end_to_end(tmp_path: Path, name: str, causal: bool) -> None:
    """Every quorum task, then every merge, called in this process (a process-local runtime,
    no Dask): exact against float64 (GQA, a short last group, two kv-head blocks), and the
    finished job keeps nothing of its policy's arrays.  Merges run again (a rerun after their
    markers) change nothing."""
    import torch
    from conftest import draw_inputs
    from reference import check_exact

    from cqsa_dask.execution.options import RunOptions
    from cqsa_dask.execution.tasks import merge_task, quorum_task
    from cqsa_dask.store.layout import read_block

    inp = draw_inputs(1, 4, 2, 301, 32, torch.bfloat16)
    path = tmp_path / "s.zarr"
    g = inp.store(path, 64)
    p = make_plan(seq_len=301, heads=4, kv_heads=2, head_dim=32, dtype="bf16", budget="2.2MB", groups=13,
                  causal=causal, partials=name)
    assert p.head_blocks == 2 and p.group_size * p.groups > p.seq_len
    token = f"direct-{name}-{causal}-{inp.seed}"  # the host cache is the process's: one token per job
    create_outputs(g, p, token)
    opts = RunOptions.from_config(device="cpu", host_cache="64MB")
    cells = [(b, j) for b in range(p.batch) for j in range(p.head_blocks)]
    written = sum(quorum_task(str(path), token, t, b, j, opts)["bytes_written"] for t in p.task_ids for b, j in cells)
    for rerun in (False, True):
        for a in p.merge_groups:
            for b, j in cells:
                rec = merge_task(str(path), token, a, b, j, opts)
                written += 0 if rerun else rec["bytes_written"]
                assert not rerun or rec["bytes_written"] == 0
    out = read_block(g["out"], (slice(None),) * 4, "bfloat16")  # type: ignore[arg-type]
    lse = torch.from_numpy(np.asarray(g["lse"][...]))
    check_exact(inp.q, inp.k, inp.v, out, lse, causal=causal, scale=None, context=f"{name} seed {inp.seed}")
    assert written == p.bytes_written if not causal else 0 < written <= p.bytes_written, (written, p.bytes_written)
    left = [f for n in ("partial_out", "partial_lse", "fold_state", "fold_journal", "fold_journal_head")
            for f in (path / "_cqsa" / n).rglob("*") if f.is_file() and f.name != "zarr.json"]
    assert left == [], left


def test_a_job_started_with_partials_in_its_dtype_finishes_in_it(tmp_path: Path) -> None:
    """A store written before partials were float32 holds partial_out in the job dtype (bfloat16
    as uint16): a resumed job writes and reads its partials so (not as float32 bits), exact."""
    import torch
    from conftest import draw_inputs
    from reference import check_exact

    from cqsa_dask.execution.options import RunOptions
    from cqsa_dask.execution.tasks import merge_task, quorum_task
    from cqsa_dask.store.layout import ENGINE, create_array, logical_dtype, read_block

    inp = draw_inputs(1, 2, 2, 150, 32, torch.bfloat16)
    path = tmp_path / "s.zarr"
    g = inp.store(path, 64)
    p = make_plan(seq_len=150, heads=2, head_dim=32, dtype="bf16", budget="1GB", groups=7, partials="all")
    token = f"earlier-{inp.seed}"
    create_outputs(g, p, token)
    eng = g[ENGINE]
    b, hq, n, d, ht, gs, s = p.batch, p.heads_q, p.seq_len, p.head_dim, p.q_heads_per_task, p.group_size, p.quorum_size
    create_array(eng, "partial_out", (s, b, hq, n, d), (1, 1, ht, gs, d), "bfloat16", nan_fill=True)  # as before
    assert logical_dtype(eng["partial_out"]) == "bfloat16"
    opts = RunOptions.from_config(device="cpu", host_cache="0")  # the merges read the partials back
    written = sum(quorum_task(str(path), token, t, 0, 0, opts)["bytes_written"] for t in p.task_ids)
    assert written == p.shared_rows[3] * b * hq * (d * 2 + 4)  # partials of 2-byte values (not 4) and lse
    for a in p.merge_groups:
        merge_task(str(path), token, a, 0, 0, opts)
    out = read_block(g["out"], (slice(None),) * 4, "bfloat16")  # type: ignore[arg-type]
    lse = torch.from_numpy(np.asarray(g["lse"][...]))
    check_exact(inp.q, inp.k, inp.v, out, lse, causal=False, scale=None, context=f"seed {inp.seed}")
