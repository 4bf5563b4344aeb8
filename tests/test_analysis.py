"""Exact attention analytics (``cqsa_dask.analysis``) against a dense float64 reference.

Every case runs a real job on a threaded local cluster, then ``analyze``, and
compares with the definition computed densely in float64 from the stored
inputs::

    P = softmax(scale q k^T)   (j <= i when causal)      (B, Hq, N, N)
    key_mass[j] = sum_i P_ij     entropy[i] = -sum_j P_ij ln P_ij     block_mass[x, y] = sum over the block

Tolerances, per element: key mass 1e-4 relative, also for bfloat16 jobs
(the lse feature is split into three exact bfloat16 parts); entropy 1e-4
relative (1e-4 nats near 0) with the entropy pass in float32 (the default on
the CPU); with ``cqsa.analysis-precision: job`` on a bfloat16 job (the GPU
default) the kernel rounds P to bfloat16, and the bound is 2^-7 (1 + max_j
|logit_ij|) nats per row.
"""

from __future__ import annotations

import importlib.util
import json
import math
from collections.abc import Iterator
from pathlib import Path

import dask.config
import numpy as np
import pytest
import torch
import zarr
from distributed import Client, LocalCluster

import cqsa_dask
from cqsa_dask.analysis.graph import build_analysis_graph
from cqsa_dask.analysis.layout import create_analysis
from cqsa_dask.analysis.spec import parse_resolution
from cqsa_dask.analysis.tasks import analysis_task
from cqsa_dask.core.errors import InvalidInputError, StoreError
from cqsa_dask.core.plan import Plan
from cqsa_dask.dashboard.state import parse_key
from cqsa_dask.store.generated import SyntheticSource, create_synthetic_store
from cqsa_dask.store.layout import read_block, write_tensor
from cqsa_dask.tools import cli
from tests.conftest import RESOURCE, draw_inputs


@pytest.fixture(scope="module")
def aclient() -> Iterator[Client]:
    with LocalCluster(n_workers=1, threads_per_worker=2, processes=False, resources={RESOURCE: 4e9},
                      dashboard_address=":0") as cluster, Client(cluster) as c:
        yield c


def dense(q: torch.Tensor, k: torch.Tensor, causal: bool, scale: float) -> torch.Tensor:
    """P (B, Hq, N, N) float64 from q (B, Hq, N, D), k (B, Hkv, N, D)."""
    n = q.shape[2]
    kk = k.double().repeat_interleave(q.shape[1] // k.shape[1], dim=1)
    s = scale * q.double() @ kk.transpose(-1, -2)
    if causal:
        s = s.masked_fill(~torch.ones(n, n, dtype=torch.bool).tril(), -math.inf)
    return torch.softmax(s, dim=-1)


def reference(p: torch.Tensor, resolution: int | None) -> dict[str, torch.Tensor]:
    n = p.shape[-1]
    plogp = torch.where(p > 0, p * torch.log(torch.where(p > 0, p, 1.0)), 0.0)
    out = {"key_mass": p.sum(-2), "entropy": -plogp.sum(-1)}
    if resolution:
        bs = -(-n // resolution)
        idx = torch.arange(n) // bs
        onehot = torch.nn.functional.one_hot(idx, resolution).double()  # (N, R)
        out["block_mass"] = onehot.T @ p @ onehot  # (B, Hq, R, R)
    return out


def stored(path: Path, name: str) -> torch.Tensor:
    return read_block(zarr.open_group(str(path), mode="r")[f"analysis/{name}"], (...,), "float32").double()


def rel_err(got: torch.Tensor, ref: torch.Tensor, floor: float) -> float:
    return float(((got - ref).abs() / ref.abs().clamp_min(floor)).max())


CASES = [  # (B, Hq, Hkv, N, D, dtype, causal, groups, magnitude, resolution)
    (1, 2, 2, 61, 16, torch.float32, False, 7, 1.0, 5),
    (1, 4, 2, 45, 16, torch.float32, True, 13, 1.0, 7),  # W G > N: group 12 is empty
    (2, 2, 1, 45, 32, torch.float32, True, 7, 6.0, None),  # large logits: scale q.k ~ N(0, 36)
    (1, 4, 2, 57, 16, torch.bfloat16, True, 7, 1.0, 4),
    (1, 2, 2, 40, 16, torch.bfloat16, False, 3, 4.0, None),
]


@pytest.mark.parametrize("case", CASES, ids=lambda c: f"{c[5]}-{'causal' if c[6] else 'full'}-W{c[7]}-m{c[8]}")
def test_analysis_matches_float64(tmp_path: Path, aclient: Client, case: tuple) -> None:  # type: ignore[type-arg]
    b, hq, hkv, n, d, dtype, causal, groups, mag, res = case
    inp = draw_inputs(b, hq, hkv, n, d, dtype, magnitude=mag)
    path = tmp_path / "s.zarr"
    inp.store(path, chunk_tokens=16)
    cqsa_dask.run(path, causal=causal, client=aclient, groups=groups, memory_budget="1GB")
    r = cqsa_dask.analyze(path, resolution=res, client=aclient)
    assert r.tasks_run == groups * b * r.plan.head_blocks and not r.resumed
    ref = reference(dense(inp.q, inp.k, causal, r.plan.scale), res)
    km, ent = stored(path, "key_mass"), stored(path, "entropy")
    assert rel_err(km, ref["key_mass"], 0.0) < 1e-4, inp.ctx
    assert rel_err(ent, ref["entropy"], 1.0) < 1e-4, inp.ctx
    if res:
        bm = stored(path, "block_mass")
        bs = -(-n // res)
        sizes = torch.tensor([min(n, (x + 1) * bs) - x * bs for x in range(res)], dtype=torch.float64)
        tol = 1e-5 if dtype == torch.float32 else 1e-2
        assert torch.allclose(bm.sum(-1), sizes.expand_as(bm.sum(-1)), rtol=tol), inp.ctx
        assert torch.allclose(bm, ref["block_mass"], rtol=tol, atol=tol * n / res), inp.ctx
    # a finished analysis keeps only its results
    leftovers = [p for nm in ("_entropy_part", "_mass_part", "_block_part")
                 for p in (path / "analysis" / nm).rglob("*") if p.is_file() and p.name != "zarr.json"]
    assert leftovers == []


def test_bfloat16_entropy_in_the_jobs_dtype(tmp_path: Path, aclient: Client) -> None:
    """The fast (GPU default) entropy pass of a bfloat16 job: within 2^-7 (1 + max |logit|) nats per row."""
    inp = draw_inputs(1, 2, 1, 48, 16, torch.bfloat16, magnitude=4.0)
    path = tmp_path / "s.zarr"
    inp.store(path, chunk_tokens=16)
    cqsa_dask.run(path, causal=True, client=aclient, groups=7, memory_budget="1GB")
    with dask.config.set({"cqsa.analysis-precision": "job"}):
        r = cqsa_dask.analyze(path, client=aclient)
    p = dense(inp.q, inp.k, True, r.plan.scale)
    kk = inp.k.double().repeat_interleave(2, dim=1)
    logits = (r.plan.scale * inp.q.double() @ kk.transpose(-1, -2)).tril()  # masked entries 0: no effect on the max
    bound = 2**-7 * (1 + logits.abs().amax(-1))
    err = (stored(path, "entropy") - reference(p, None)["entropy"]).abs()
    assert bool((err <= bound).all()), (float((err / bound).max()), inp.ctx)
    assert rel_err(stored(path, "key_mass"), p.sum(-2), 0.0) < 1e-4, inp.ctx


def test_refusals(tmp_path: Path, aclient: Client) -> None:
    """Not a job store, an incomplete job, a resolution outside 1..N: typed errors, nothing written."""
    inp = draw_inputs(1, 2, 2, 30, 16, torch.float32)
    path = tmp_path / "s.zarr"
    inp.store(path, chunk_tokens=16)
    with pytest.raises(StoreError, match="no cqsa job"):
        cqsa_dask.analyze(path, client=aclient)
    cqsa_dask.run(path, client=aclient, groups=3, memory_budget="1GB")
    for bad in (0, 31, 2.5):
        with pytest.raises(InvalidInputError, match="resolution must be an integer in 1..30"):
            cqsa_dask.analyze(path, resolution=bad, client=aclient)  # type: ignore[arg-type]
    zarr.open_group(str(path), mode="r+")["_cqsa/merge_done"][1, 0, 0] = 0
    with pytest.raises(InvalidInputError, match="not complete"):
        cqsa_dask.analyze(path, client=aclient)
    assert not (path / "analysis").exists()


def test_generated_inputs_and_resume(tmp_path: Path, aclient: Client) -> None:
    """A synthetic store (q, k generated by the tasks); an analysis stopped with some tasks done
    resumes: only the rest run, and the result is the dense reference's."""
    src = SyntheticSource(seq_len=52, heads_q=2, heads_kv=1, head_dim=16, dtype="float32", seed=7, vocab=9)
    path = tmp_path / "gen.zarr"
    create_synthetic_store(path, src)
    cqsa_dask.run(path, causal=True, client=aclient, groups=7, memory_budget="1GB")
    group = zarr.open_group(str(path), mode="r+")
    eng = group["_cqsa"]
    plan = Plan.from_dict(dict(eng.attrs["plan"]))
    ana = create_analysis(group, plan, str(eng.attrs["token"]), parse_resolution(4, plan.seq_len))
    for i in (0, 3, 5):  # a stop after three tasks
        analysis_task(str(path), str(eng.attrs["token"]), str(ana.attrs["token"]), i, 0, 0, 4, None)
    r = cqsa_dask.analyze(path, resolution=4, client=aclient)
    assert r.resumed and r.tasks_run == 7 - 3 and r.reductions_run == 7
    q, k = src.q(0, slice(0, 2), slice(0, 52))[None], src.k(0, slice(0, 1), slice(0, 52))[None]
    ref = reference(dense(q, k, True, plan.scale), 4)
    assert rel_err(stored(path, "key_mass"), ref["key_mass"], 0.0) < 1e-4
    assert rel_err(stored(path, "entropy"), ref["entropy"], 1.0) < 1e-4
    assert torch.allclose(stored(path, "block_mass"), ref["block_mass"], rtol=1e-5, atol=1e-5)
    again = cqsa_dask.analyze(path, resolution=4, client=aclient)  # finished: nothing to do
    assert again.resumed and again.tasks_run == 0 and again.reductions_run == 0


def test_cli_analyze_and_plot(tmp_path: Path, aclient: Client, capsys: pytest.CaptureFixture[str]) -> None:
    """`cqsa analyze STORE --resolution R --plot FILE` on a scheduler; bad input: one line, exit 2."""
    inp = draw_inputs(1, 2, 2, 33, 16, torch.float32)
    path = tmp_path / "s.zarr"
    inp.store(path, chunk_tokens=16)
    addr = aclient.scheduler.address
    assert cli.main(["analyze", str(path), "--scheduler", addr]) == 2
    assert capsys.readouterr().err.strip().count("\n") == 0
    cqsa_dask.run(path, client=aclient, groups=3, memory_budget="1GB")
    for bad in ("0", "34"):
        assert cli.main(["analyze", str(path), "--resolution", bad, "--scheduler", addr]) == 2
        err = capsys.readouterr().err
        assert err.startswith("cqsa: error: resolution must be") and err.count("\n") == 1
    png = tmp_path / "a.png"
    assert cli.main(["analyze", str(path), "--resolution", "3", "--plot", str(png), "--scheduler", addr]) == 0
    assert "block_mass" in capsys.readouterr().out
    assert png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n" and png.stat().st_size > 10_000
    ref = reference(dense(inp.q, inp.k, False, 16**-0.5), 3)
    assert rel_err(stored(path, "key_mass"), ref["key_mass"], 0.0) < 1e-4


def test_gpu_workflow_script_at_tiny_size(tmp_path: Path, aclient: Client, capsys: pytest.CaptureFixture[str]) -> None:
    """workflows/analyze_gpu.py end to end on the CPU: its sampled checks pass and it prints one JSON line."""
    spec = importlib.util.spec_from_file_location("analyze_gpu", Path(__file__).parents[1] / "workflows/analyze_gpu.py")
    assert spec is not None and spec.loader is not None
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    assert mod.main(["--seq-len", "96", "--heads", "2", "--head-dim", "16", "--budget", "64MB", "--causal", "--groups", "7",
                     "--samples", "3", "--workdir", str(tmp_path), "--scheduler", aclient.scheduler.address]) == 0
    line = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    assert line["groups"] > 1 and line["analysis_s"] > 0
    assert line["max_rel_key_mass_err"] < 1e-4 and line["max_abs_entropy_err"] < 1e-4


def test_fine_block_map_with_narrow_values(tmp_path: Path, aclient: Client) -> None:
    """R = N: a group of 20 tokens spans 20 block columns, more than one kernel call's values carry (16
    with a kernel that takes narrow values, as the reference kernel does), so they take two calls."""
    inp = draw_inputs(1, 2, 1, 40, 16, torch.float32, magnitude=2.0)
    path = tmp_path / "s.zarr"
    inp.store(path, chunk_tokens=16)
    cqsa_dask.run(path, causal=True, client=aclient, groups=2, memory_budget="1GB")
    with dask.config.set({"cqsa.kernel": "reference"}):
        r = cqsa_dask.analyze(path, resolution=40, client=aclient)
    ref = reference(dense(inp.q, inp.k, True, r.plan.scale), 40)
    assert torch.allclose(stored(path, "block_mass"), ref["block_mass"], rtol=1e-5, atol=1e-6), inp.ctx
    assert rel_err(stored(path, "key_mass"), ref["key_mass"], 0.0) < 1e-4, inp.ctx


def test_object_store_and_dashboard_keys(aclient: Client) -> None:
    """A store behind a URL (fsspec's in-memory file system, shared by the threaded workers): the job,
    then its analysis; the analysis's task keys are ones the /cqsa page tracks as a job of their own."""
    inp = draw_inputs(1, 2, 1, 40, 16, torch.float32)
    url = f"memory://cqsa-analysis-{inp.seed}/s.zarr"
    g = zarr.open_group(url, mode="w", zarr_format=3)
    for name, t in (("q", inp.q), ("k", inp.k), ("v", inp.v)):
        write_tensor(g, name, t, (1, t.shape[1], 16, 16))
    cqsa_dask.run(url, causal=True, client=aclient, groups=7, memory_budget="1GB")
    active = zarr.open_group(url, mode="r")["_cqsa"].attrs["active_s"]
    r = cqsa_dask.analyze(url, resolution=4, client=aclient)
    ref = reference(dense(inp.q, inp.k, True, r.plan.scale), 4)
    ana = zarr.open_group(url, mode="r")["analysis"]
    km = read_block(ana["key_mass"], (...,), "float32").double()
    assert rel_err(km, ref["key_mass"], 0.0) < 1e-4, inp.ctx
    assert zarr.open_group(url, mode="r")["_cqsa"].attrs["active_s"] == active  # the job's own time
    token, grid = str(ana.attrs["token"]), (7, 1, 1)
    ag = build_analysis_graph(url, "job", token, r.plan, resolution=4, resource=RESOURCE, task_bytes=1, retries=0,
                              task_done=np.zeros(grid), reduce_done=np.zeros(grid), block_done=np.zeros((1, 1)),
                              options={})
    assert {parse_key(k)[:2] for k in ag.task_keys} == {("quorum", token)}  # type: ignore[index]
    assert {parse_key(k)[:2] for k in ag.reduce_keys} == {("merge", token)}  # type: ignore[index]
    assert len(ag.task_keys) == 7 and len(ag.reduce_keys) == 7 and len(ag.block_keys) == 1


@pytest.mark.gpu
@pytest.mark.parametrize("causal", [False, True])
def test_analysis_on_cuda(tmp_path: Path, causal: bool) -> None:
    """The CUDA kernels (D + 8 features, narrow values where accepted, the reversed causal diagonal):
    a bfloat16 job with GQA on a local cluster whose tasks run on the GPU."""
    inp = draw_inputs(1, 4, 2, 3000, 64, torch.bfloat16, magnitude=2.0)
    path = tmp_path / "s.zarr"
    inp.store(path, chunk_tokens=512)
    with LocalCluster(n_workers=1, threads_per_worker=2, processes=False, resources={RESOURCE: 4e9},
                      dashboard_address=":0") as cluster, Client(cluster) as c:
        cqsa_dask.run(path, causal=causal, client=c, groups=7, memory_budget="1GB")
        r = cqsa_dask.analyze(path, resolution=30, client=c)
    p = dense(inp.q, inp.k, causal, r.plan.scale)
    ref = reference(p, 30)
    assert rel_err(stored(path, "key_mass"), ref["key_mass"], 0.0) < 1e-4, inp.ctx
    kk = inp.k.double().repeat_interleave(2, dim=1)
    logits = r.plan.scale * inp.q.double() @ kk.transpose(-1, -2)
    bound = 2**-7 * (1 + (logits.tril() if causal else logits).abs().amax(-1))
    assert bool(((stored(path, "entropy") - ref["entropy"]).abs() <= bound).all()), inp.ctx
    assert torch.allclose(stored(path, "block_mass"), ref["block_mass"], rtol=1e-2, atol=1e-2), inp.ctx
