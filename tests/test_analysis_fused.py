"""The fused analysis kernel (``cqsa_dask.analysis.fused``) against float64.

On machines without a GPU the kernel runs under Triton's interpreter
(``TRITON_INTERPRET=1``, set by conftest.py before triton is imported): the
same kernel source, its masks, rotations and atomic adds, executed with
NumPy; bfloat16 tiles are widened to float32 before the product there
(the interpreter's bfloat16 product is wrong; products of bfloat16 values are
exact in float32, so the sums are the same).  On CUDA (``-m gpu``) the
compiled kernel, with bfloat16 tensor-core products.

Reference: P = exp(scale q k^T - lse) in float64 with an lse that includes
mass from keys outside the pair (as a pair of a larger job sees it), so P's
rows sum to less than 1.  Tolerances: key mass 5e-5 relative, entropy 5e-5
relative with a floor of 1 nat (5e-5 nats near 0).  The logits are float32
numbers, so with logits of standard deviation 6 (|t| up to about 40) their
rounding alone reaches 1e-5 relative in P (measured over 40 seeds: 7.7e-6
for key mass, 1.1e-5 for entropy); the analysis bar is 1e-4.
"""

from __future__ import annotations

import math
from collections.abc import Iterator
from pathlib import Path

import dask.config
import pytest
import torch
from distributed import Client, LocalCluster
from hypothesis import given, settings
from hypothesis import strategies as st

import cqsa_dask
from cqsa_dask.analysis import fused
from cqsa_dask.analysis.tasks import _Kernels, analysis_options
from cqsa_dask.core.errors import InvalidInputError
from cqsa_dask.core.plan import make_plan
from tests.conftest import RESOURCE, draw_inputs
from tests.test_analysis import dense, reference, rel_err, stored

triton = pytest.importorskip("triton", reason="the fused kernel needs triton (the test extra installs it)")


def device() -> str:
    return "cuda" if torch.cuda.is_available() else "cpu"


def pair_reference(q: torch.Tensor, lse: torch.Tensor, k: torch.Tensor, scale: float, causal: bool
                   ) -> tuple[torch.Tensor, torch.Tensor]:
    """entropy (1, hq, L) and mass (1, hq, S) in float64 of q (1, hq, L, D), lse (1, hq, L), k (1, hk, S, D)."""
    kk = k.double().repeat_interleave(q.shape[1] // k.shape[1], 1)
    s = torch.einsum("bhld,bhsd->bhls", q.double(), kk) * scale
    p = torch.exp(s - lse.double()[..., None])
    if causal:
        p = p * torch.ones(s.shape[-2:], dtype=torch.bool).tril()
    plogp = torch.where(p > 0, p * torch.log(torch.where(p > 0, p, 1.0)), 0.0)
    return -plogp.sum(-1), p.sum(-2)


def draw_pair(n_q: int, n_k: int, hq: int, hk: int, d: int, dtype: torch.dtype, causal: bool, magnitude: float,
              seed: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, float]:
    """q, lse, k of one pair, with scale q.k ~ N(0, magnitude^2) and lse over this pair's keys plus
    outside mass of up to e^6."""
    inp = draw_inputs(1, hq, hk, max(n_q, n_k), d, dtype, magnitude=magnitude, seed=seed)
    q, k = inp.q[:, :, :n_q], inp.k[:, :, :n_k]
    scale = d**-0.5
    s = torch.einsum("bhld,bhsd->bhls", q.double(), k.double().repeat_interleave(hq // hk, 1)) * scale
    if causal:
        s = s.masked_fill(~torch.ones(n_q, n_k, dtype=torch.bool).tril(), -math.inf)
    g = torch.Generator().manual_seed(seed)
    outside = torch.rand(1, hq, n_q, generator=g, dtype=torch.float64) * 12 - 6
    lse = torch.logaddexp(torch.logsumexp(s, -1), outside).float()
    return q, lse, k, scale


def check_pair(n_q: int, n_k: int, hq: int, hk: int, d: int, dtype: torch.dtype, causal: bool, magnitude: float,
               seed: int, config: dict[str, int] | None = None) -> None:
    q, lse, k, scale = draw_pair(n_q, n_k, hq, hk, d, dtype, causal, magnitude, seed)
    dev = device()
    ent, mass = fused.fused_terms(q.to(dev), lse.to(dev), k.to(dev), scale=scale, diagonal_causal=causal,
                                  config=config)
    assert ent.shape == (1, hq, n_q) and mass.shape == (1, hq, n_k)
    assert ent.dtype == mass.dtype == torch.float32
    ent_ref, mass_ref = pair_reference(q, lse, k, scale, causal)
    ctx = (n_q, n_k, hq, hk, d, dtype, causal, magnitude, seed)
    assert rel_err(mass.cpu().double(), mass_ref, 1e-30) < 5e-5, ctx
    assert rel_err(ent.cpu().double(), ent_ref, 1.0) < 5e-5, ctx


HARD = [  # (L, S, hq, hk, D, dtype, causal, magnitude)
    (100, 77, 2, 1, 64, torch.float32, False, 1.0),  # uneven, GQA
    (130, 130, 4, 2, 40, torch.bfloat16, True, 3.0),  # causal diagonal, D not a power of two
    (96, 96, 2, 2, 128, torch.float32, True, 6.0),  # large logits
    (33, 200, 2, 1, 16, torch.bfloat16, False, 4.0),  # fewer queries than one tile
    (64, 64, 1, 1, 32, torch.float16, True, 2.0),  # exact multiples of the tiles
    (1, 1, 1, 1, 16, torch.float32, True, 1.0),  # one token: P = exp(s - lse) on one key
]


@pytest.mark.parametrize("case", HARD, ids=lambda c: f"{c[0]}x{c[1]}-h{c[2]}/{c[3]}-d{c[4]}-{c[5]}-c{int(c[6])}")
def test_pair_matches_float64(case: tuple) -> None:  # type: ignore[type-arg]
    check_pair(*case, seed=int.from_bytes(__import__("os").urandom(4), "little"))


@settings(max_examples=12, deadline=None)
@given(n_q=st.integers(1, 90), n_k=st.integers(1, 90), rep=st.sampled_from([1, 2]), hk=st.integers(1, 2),
       d=st.sampled_from([16, 24, 64]), dtype=st.sampled_from([torch.float32, torch.bfloat16]),
       causal=st.booleans(), block=st.sampled_from([(16, 16), (32, 16), (64, 32)]), seed=st.integers(0, 2**31))
def test_pair_any_shape_and_tiles(n_q: int, n_k: int, rep: int, hk: int, d: int, dtype: torch.dtype, causal: bool,
                                  block: tuple[int, int], seed: int) -> None:
    """Any sizes against any tile shape (the rotation, the partial last tiles, the diagonal tiles)."""
    if causal:
        n_k = n_q
    check_pair(n_q, n_k, rep * hk, hk, d, dtype, causal, 2.0, seed, config={"BLOCK_M": block[0], "BLOCK_N": block[1]})


def test_refuses_where_it_cannot_run(monkeypatch: pytest.MonkeyPatch) -> None:
    """A CPU without the interpreter: FusedUnavailable from the kernel; analyze() on such workers picks the
    attention kernels by default and refuses ``cqsa.analysis-kernel: fused`` with one line."""
    monkeypatch.setenv("TRITON_INTERPRET", "0")
    assert not fused.fused_available(torch.device("cpu"))
    q, lse, k, scale = draw_pair(8, 8, 1, 1, 16, torch.float32, False, 1.0, 0)
    with pytest.raises(fused.FusedUnavailable, match="does not run on cpu"):
        fused.fused_terms(q, lse, k, scale=scale, diagonal_causal=False)
    plan = make_plan(seq_len=64, heads=2, head_dim=16, dtype="float32", budget="1GB", groups=3)
    opts = {**analysis_options(), "analysis-kernel": "auto"}
    assert not _Kernels.choose(plan, torch.device("cpu"), opts).fused
    with pytest.raises(InvalidInputError, match="does not run on cpu here"):
        _Kernels.choose(plan, torch.device("cpu"), {**opts, "analysis-kernel": "fused"})
    with pytest.raises(InvalidInputError, match="must be auto, fused or attention"):
        _Kernels.choose(plan, torch.device("cpu"), {**opts, "analysis-kernel": "fast"})


@pytest.fixture(scope="module")
def fclient() -> Iterator[Client]:
    with LocalCluster(n_workers=1, threads_per_worker=2, processes=False, resources={RESOURCE: 4e9},
                      dashboard_address=":0") as cluster, Client(cluster) as c:
        yield c


@pytest.mark.parametrize("case", [
    (1, 4, 2, 57, 16, torch.bfloat16, True, 7, 3.0, None),
    (2, 2, 1, 45, 32, torch.float32, False, 7, 6.0, 5),  # with a block map: its terms from the attention calls
], ids=["bf16-causal-gqa", "fp32-full-b2-blocks"])
def test_analyze_with_the_fused_kernel(tmp_path: Path, fclient: Client, case: tuple) -> None:  # type: ignore[type-arg]
    """A whole analysis with ``cqsa.analysis-kernel: fused``: key mass and entropy within 1e-4 of float64,
    also the entropy of a bfloat16 job (P is never rounded to bfloat16)."""
    b, hq, hkv, n, d, dtype, causal, groups, mag, res = case
    inp = draw_inputs(b, hq, hkv, n, d, dtype, magnitude=mag)
    path = tmp_path / "s.zarr"
    inp.store(path, chunk_tokens=16)
    cqsa_dask.run(path, causal=causal, client=fclient, groups=groups, memory_budget="1GB")
    with dask.config.set({"cqsa.analysis-kernel": "fused", "cqsa.device": device()}):
        r = cqsa_dask.analyze(path, resolution=res, client=fclient)
    assert r.kernels == ("fused",)
    ref = reference(dense(inp.q, inp.k, causal, r.plan.scale), res)
    assert rel_err(stored(path, "key_mass"), ref["key_mass"], 0.0) < 1e-4, inp.ctx
    assert rel_err(stored(path, "entropy"), ref["entropy"], 1.0) < 1e-4, inp.ctx
    if res:
        assert torch.allclose(stored(path, "block_mass"), ref["block_mass"], rtol=1e-5, atol=1e-5 * n / res)


def test_a_bad_kernel_setting_is_refused_before_any_work(tmp_path: Path, fclient: Client) -> None:
    inp = draw_inputs(1, 2, 1, 40, 16, torch.float32)
    path = tmp_path / "s.zarr"
    inp.store(path, chunk_tokens=16)
    cqsa_dask.run(path, client=fclient, groups=3, memory_budget="1GB")
    with dask.config.set({"cqsa.analysis-kernel": "fast"}), pytest.raises(InvalidInputError, match="auto, fused or"):
        cqsa_dask.analyze(path, client=fclient)
    assert not (path / "analysis").exists()


def test_launches_split_by_kv_head_and_large_pairs_fall_back(monkeypatch: pytest.MonkeyPatch, tmp_path: Path,
                                                             fclient: Client) -> None:
    """Offsets stay below the 32-bit limit: with a small limit each kv head gets its own launch (same
    results), a pair over it for one kv head is refused, and analyze() takes the attention calls for it."""
    monkeypatch.setattr(fused, "OFFSET_LIMIT", 2 * (64 + 1024) * 16 + 1)  # one kv head of 2 query heads
    check_pair(60, 64, 4, 2, 16, torch.float32, False, 2.0, seed=7)  # two launches
    q, lse, k, scale = draw_pair(60, 64, 4, 1, 16, torch.float32, False, 2.0, 7)  # 4 query heads on one kv head
    assert not fused.fused_fits(q, k)
    with pytest.raises(ValueError, match="32-bit offsets"):
        fused.fused_terms(q, lse, k, scale=scale, diagonal_causal=False)
    inp = draw_inputs(1, 4, 1, 48, 16, torch.float32, magnitude=2.0)
    path = tmp_path / "s.zarr"
    inp.store(path, chunk_tokens=16)
    cqsa_dask.run(path, client=fclient, groups=3, memory_budget="1GB")
    with dask.config.set({"cqsa.analysis-kernel": "fused"}):
        r = cqsa_dask.analyze(path, client=fclient)
    ref = reference(dense(inp.q, inp.k, False, r.plan.scale), None)
    assert rel_err(stored(path, "key_mass"), ref["key_mass"], 0.0) < 1e-4, inp.ctx
    assert rel_err(stored(path, "entropy"), ref["entropy"], 1.0) < 1e-4, inp.ctx
