"""``cqsa_dask.attention`` is exact: it matches float64 as well as torch's SDPA does.

Criterion (``reference.check_exact``): max |out - ref64| is at most 4x the
error of ``scaled_dot_product_attention`` on the same inputs plus a tiny
floor, lse is within a small relative tolerance of the float64 lse, out has
q's dtype and shape, nothing is NaN/Inf.

The matrix varies one thing at a time around a few shapes, always through
the session's Dask cluster::

    shape         what it stresses
    ragged        N=257 not divisible by W=7 (last group short)
    n<w           N=5 < W=13: empty groups, quorums that own nothing
    n1            a single token
    gqa / mqa     Hq=4 over Hkv=2 / Hkv=1
    d80 / d128    head dims other than 64
    even-w        W=8 (relaxed set; the difference W/2 is its own negative)
    planner       a budget so small that the planner itself picks W >= 13

then custom scales, large (1e3) and huge (1e5) logits, key groups whose
values cancel (v = +-64: the kernels' own rounding, the one allowance beyond
the criterion), strided inputs, and a few hypothesis-drawn shapes with any W
(also W > N, even, non-Singer).
"""

from __future__ import annotations

import math
from dataclasses import dataclass, replace

import dask
import pytest
import torch
from conftest import draw_inputs
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from reference import check_exact, reference_attention

import cqsa_dask
from cqsa_dask.client.policy import plan_options
from cqsa_dask.core.plan import Plan, make_plan

DTYPES = {"fp32": torch.float32, "fp16": torch.float16, "bf16": torch.bfloat16}
MANY_GROUPS = 13


@dataclass(frozen=True)
class Case:
    """One attention problem: q (b, hq, n, d), k and v (b, hkv, n, d)."""

    b: int
    hq: int
    hkv: int
    n: int
    d: int
    groups: int | None = None
    budget: int | str = "1GB"
    scale: float | None = None
    magnitude: float = 1.0


def plan_of(case: Case, dtype: torch.dtype, budget: int | str) -> Plan:
    """The plan ``attention`` makes for ``case`` (same planner options from dask.config)."""
    return make_plan(seq_len=case.n, heads=case.hq, kv_heads=case.hkv, head_dim=case.d, batch=case.b,
                     dtype=str(dtype), budget=budget, **plan_options())


PLANNER = "planner"  # budget sentinel: the largest budget at which the planner picks W >= MANY_GROUPS


def planner_budget(case: Case, dtype: torch.dtype, min_groups: int = MANY_GROUPS) -> int:
    """The largest budget (bytes, on a 3% grid) at which the planner itself picks W >= min_groups.

    Computed, not hard-coded, so the test follows the planner's memory model.
    """
    budget = 1 << 30
    while budget > 1 << 16:
        if plan_of(case, dtype, budget).groups >= min_groups:
            return budget
        budget = int(budget * 0.97)
    raise AssertionError(f"no budget makes the planner choose {min_groups} groups for {case}")


SHAPES = {
    "ragged": Case(2, 2, 2, 257, 64, groups=7),
    "n<w": Case(1, 4, 2, 5, 64, groups=13),
    "n1": Case(1, 2, 2, 1, 64),
    "n1-w7": Case(2, 4, 2, 1, 32, groups=7),
    "gqa": Case(1, 4, 2, 200, 64, groups=7),
    "mqa": Case(1, 4, 1, 200, 128, groups=7),
    "d80": Case(1, 2, 2, 150, 80, groups=3),
    "d128": Case(1, 4, 2, 300, 128, groups=13),
    "even-w": Case(1, 2, 2, 100, 64, groups=8),
    "w2": Case(2, 2, 1, 64, 64, groups=2),
    "planner": Case(1, 4, 2, 600, 64, budget=PLANNER),
}


def _run(case: Case, dtype: torch.dtype, causal: bool, client, make_inputs):  # type: ignore[no-untyped-def]
    inp = make_inputs(case.b, case.hq, case.hkv, case.n, case.d, dtype, magnitude=case.magnitude, scale=case.scale)
    budget = planner_budget(case, dtype) if case.budget == PLANNER else case.budget
    out, lse = cqsa_dask.attention(inp.q, inp.k, inp.v, causal=causal, scale=case.scale, memory_budget=budget,
                                   return_lse=True, client=client, groups=case.groups)
    return inp, out, lse


# float16 and bfloat16 take the same code paths; float16 runs on a subset to save time.
ALL_DTYPES = {"ragged", "n<w", "gqa", "d80", "planner"}
EXACT_MATRIX = [
    pytest.param(case, DTYPES[dt], id=f"{name}-{dt}")
    for name, case in SHAPES.items()
    for dt in DTYPES
    if dt != "fp16" or name in ALL_DTYPES
]


@pytest.mark.parametrize("causal", [False, True], ids=["full", "causal"])
@pytest.mark.parametrize(("case", "dtype"), EXACT_MATRIX)
def test_exact(case: Case, dtype: torch.dtype, causal: bool, client, make_inputs) -> None:  # type: ignore[no-untyped-def]
    inp, out, lse = _run(case, dtype, causal, client, make_inputs)
    check_exact(inp.q, inp.k, inp.v, out, lse, causal=causal, scale=case.scale, context=inp.ctx)


@pytest.mark.parametrize("dtype", list(DTYPES.values()), ids=list(DTYPES))
def test_planner_picks_many_groups(dtype: torch.dtype) -> None:
    """The ``planner`` case really runs with W >= 13 chosen by the planner (no ``groups``)."""
    c = SHAPES["planner"]
    budget = planner_budget(c, dtype)
    plan = plan_of(c, dtype, budget)
    assert plan.groups >= MANY_GROUPS, plan
    assert plan.task_memory_bytes <= plan.budget_bytes == budget
    # the budget is what forces W: with the default budget of attention() the planner takes few groups
    big = plan_of(c, dtype, "1GB")
    assert big.groups < MANY_GROUPS, big


@pytest.mark.parametrize("causal", [False, True], ids=["full", "causal"])
@pytest.mark.parametrize("scale", [0.3, 2.5], ids=["s0.3", "s2.5"])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=["fp32", "bf16"])
def test_custom_scale(scale: float, dtype: torch.dtype, causal: bool, client, make_inputs) -> None:  # type: ignore[no-untyped-def]
    case = replace(SHAPES["gqa"], groups=7, scale=scale)
    inp, out, lse = _run(case, dtype, causal, client, make_inputs)
    check_exact(inp.q, inp.k, inp.v, out, lse, causal=causal, scale=scale, context=inp.ctx)


@pytest.mark.parametrize("causal", [False, True], ids=["full", "causal"])
@pytest.mark.parametrize("dtype", list(DTYPES.values()), ids=list(DTYPES))
def test_large_logits(dtype: torch.dtype, causal: bool, client, make_inputs) -> None:  # type: ignore[no-untyped-def]
    """Logits ~ N(0, 1e3^2) (max ~ 3e3): exp of raw logits would overflow even float64."""
    case = replace(SHAPES["ragged"], b=1, hq=4, hkv=2, magnitude=1e3)
    inp, out, lse = _run(case, dtype, causal, client, make_inputs)
    e = check_exact(inp.q, inp.k, inp.v, out, lse, causal=causal, scale=None, context=inp.ctx)
    assert lse.abs().max() > 500, f"logits not large: max |lse| {lse.abs().max():.3g}; {inp.ctx}; {e}"


@pytest.mark.parametrize("causal", [False, True], ids=["full", "causal"])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=["fp32", "bf16"])
def test_huge_logits(dtype: torch.dtype, causal: bool, client, make_inputs) -> None:  # type: ignore[no-untyped-def]
    """Logits ~ N(0, 1e5^2): finite results, exact lse, out limited only by float32 lse.

    Partial lse values are float32, so each merge weight exp(L_i - L) carries
    a relative error up to ~eps32 * |L| (~0.03 at |L| = 3e5): out may then
    exceed 4x SDPA's error on near-tie rows, but not eps32 * |lse| * |v|.
    """
    case = replace(SHAPES["ragged"], b=1, hq=4, hkv=2, magnitude=1e5)
    inp, out, lse = _run(case, dtype, causal, client, make_inputs)
    assert torch.isfinite(out).all() and torch.isfinite(lse).all(), inp.ctx
    assert lse.abs().max() > 5e4, inp.ctx
    floor = torch.finfo(torch.float32).eps * lse.abs().max().item() * inp.v.abs().max().item()
    check_exact(inp.q, inp.k, inp.v, out, lse, causal=causal, scale=None, context=inp.ctx, extra_floor=floor)


CANCEL = replace(SHAPES["ragged"], b=1, hq=4, hkv=2, magnitude=0.05)


def _cancelling(dtype: torch.dtype, make_inputs):  # type: ignore[no-untyped-def]
    """Inputs of ``CANCEL`` whose v is +64 on the first half of the tokens and -64 on the second
    (plus N(0, 1)), the logits small: (inputs, v, the kernels' rounding allowance)."""
    inp = make_inputs(CANCEL.b, CANCEL.hq, CANCEL.hkv, CANCEL.n, CANCEL.d, dtype, magnitude=CANCEL.magnitude)
    sign = torch.ones(CANCEL.n, 1, dtype=torch.float64)
    sign[CANCEL.n // 2:] = -1.0
    v = (inp.v.double() + 64.0 * sign).to(dtype)
    ref, _ = reference_attention(inp.q, inp.k, v, False, None)
    assert ref[..., -1, :].abs().max() < 8, f"the last row does not cancel: {ref[..., -1, :].abs().max():.3g}"
    return inp, v, 0.5 * torch.finfo(dtype).eps * v.double().abs().max().item()


@pytest.mark.parametrize("causal", [False, True], ids=["full", "causal"])
@pytest.mark.parametrize("partials", ["all", "bounded"])
@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16], ids=["fp16", "bf16"])
def test_partials_that_cancel(dtype: torch.dtype, partials: str, causal: bool, client, make_inputs) -> None:  # type: ignore[no-untyped-def]
    """The key groups' partial results are near +-64 while a late row's out is near 0
    (``_cancelling``).

    The kernels return each key group's result in the job dtype (as SDPA does), rounded at its
    own magnitude: up to half an ulp of 64 for the share of the row it carries, which one fused
    kernel, rounding once at the row's magnitude, does not have.  That is the allowance here
    (0.5 eps max|v|, on top of the usual bound): the engine's error model (docs/design.md,
    "Partials stored in float32").  Partials are float32, so nothing rounds a task's merged
    result again."""
    inp, v, allowance = _cancelling(dtype, make_inputs)
    with dask.config.set({"cqsa.partials": partials}):
        out, lse = cqsa_dask.attention(inp.q, inp.k, v, causal=causal, return_lse=True, client=client,
                                       groups=CANCEL.groups)
    check_exact(inp.q, inp.k, v, out, lse, causal=causal, scale=None, extra_floor=allowance,
                context=f"{inp.ctx}; partials {partials}")


def test_out_only(client, make_inputs) -> None:  # type: ignore[no-untyped-def]
    """return_lse=False returns just the tensor."""
    inp = make_inputs(2, 2, 2, 33, 16, torch.float32)
    out = cqsa_dask.attention(inp.q, inp.k, inp.v, client=client, groups=3)
    assert isinstance(out, torch.Tensor)
    check_exact(inp.q, inp.k, inp.v, out, None, causal=False, scale=None, context=inp.ctx)


def test_non_contiguous_inputs(client, make_inputs) -> None:  # type: ignore[no-untyped-def]
    """Strided views (here (B, N, H, D) memory read as (B, H, N, D)) give the same exact result."""
    base = make_inputs(2, 4, 2, 40, 16, torch.float32)
    q, k, v = (t.transpose(1, 2).contiguous().transpose(1, 2) for t in (base.q, base.k, base.v))
    assert not q.is_contiguous()
    out, lse = cqsa_dask.attention(q, k, v, causal=True, return_lse=True, client=client, groups=7)
    check_exact(base.q, base.k, base.v, out, lse, causal=True, scale=None, context=base.ctx)


@settings(max_examples=6, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(b=st.integers(1, 2), hkv=st.integers(1, 3), rep=st.integers(1, 3), n=st.integers(1, 150),
       d=st.sampled_from([8, 24, 40, 96]), groups=st.integers(1, 24), causal=st.booleans(),
       dtype=st.sampled_from(list(DTYPES.values())), seed=st.integers(0, 2**32 - 1))
def test_exact_any_shape(client, b: int, hkv: int, rep: int, n: int, d: int, groups: int, causal: bool,  # type: ignore[no-untyped-def]
                         dtype: torch.dtype, seed: int) -> None:
    """Any shape, any W (also W > N, even W, non-Singer W), either mask, any dtype."""
    inp = draw_inputs(b, hkv * rep, hkv, n, d, dtype, seed=seed)
    out, lse = cqsa_dask.attention(inp.q, inp.k, inp.v, causal=causal, return_lse=True, client=client, groups=groups)
    check_exact(inp.q, inp.k, inp.v, out, lse, causal=causal, scale=None, context=inp.ctx)


def test_inputs_not_degenerate(make_inputs) -> None:  # type: ignore[no-untyped-def]
    """The helper draws non-zero data whose logits have the requested spread."""
    inp = make_inputs(1, 2, 2, 128, 64, torch.float32, magnitude=1e3)
    logits = (inp.q.double() @ inp.k.double().transpose(-1, -2)) / math.sqrt(64)
    assert 5e2 < logits.std().item() < 2e3
    for t in (inp.q, inp.k, inp.v):
        assert t.count_nonzero() == t.numel()


@pytest.mark.parametrize("magnitude", [1.0, 1e3])
def test_check_exact_rejects_an_output_off_by_more_than_rounding(magnitude: float, make_inputs) -> None:  # type: ignore[no-untyped-def]
    """The checker itself: SDPA's own output passes, the same output with one element moved by
    four times the bound it allows fails (ordinary and large logits)."""
    inp = make_inputs(1, 2, 2, 257, 64, torch.float32, magnitude=magnitude)
    out = torch.nn.functional.scaled_dot_product_attention(inp.q, inp.k, inp.v, is_causal=True)
    e = check_exact(inp.q, inp.k, inp.v, out, None, causal=True, scale=None, context=inp.ctx)
    _, ref_lse = reference_attention(inp.q, inp.k, inp.v, True, None)
    bound = 4.0 * e.sdpa + 1e-6 + torch.finfo(torch.float32).eps * float(ref_lse.abs().max() * inp.v.abs().max())
    bad = out.clone()
    bad[0, 1, 100, 7] += 4 * bound
    with pytest.raises(AssertionError, match="out not exact"):
        check_exact(inp.q, inp.k, inp.v, bad, None, causal=True, scale=None, context=inp.ctx)


@pytest.mark.gpu
@pytest.mark.parametrize("causal", [False, True], ids=["full", "causal"])
@pytest.mark.parametrize("turn", ["kernels", "streams"])
def test_exact_on_cuda_under_either_turn(turn: str, causal: bool, make_inputs) -> None:  # type: ignore[no-untyped-def]
    """``cqsa.cuda-turn``: two tasks in flight on one GPU, taking turns for their kernels or not,
    through a local cluster of per-GPU workers (GQA, uneven groups, several slots per task)."""
    case = Case(1, 4, 2, 3001, 128, groups=13)
    inp = make_inputs(case.b, case.hq, case.hkv, case.n, case.d, torch.bfloat16)
    with dask.config.set({"cqsa.cuda-turn": turn, "cqsa.tasks-in-flight": 2}):
        out, lse = cqsa_dask.attention(inp.q.cuda(), inp.k.cuda(), inp.v.cuda(), causal=causal, return_lse=True,
                                       memory_budget="1GB", groups=case.groups)
    assert out.is_cuda
    check_exact(inp.q, inp.k, inp.v, out.cpu(), lse.cpu(), causal=causal, scale=None, context=f"{turn} {inp.ctx}")


@pytest.mark.gpu
@pytest.mark.parametrize("partials", ["all", "bounded"])
def test_partials_that_cancel_on_cuda(partials: str, make_inputs) -> None:  # type: ignore[no-untyped-def]
    """``test_partials_that_cancel`` on the GPU's kernels (bfloat16, full), through a local cluster of
    per-GPU workers: the same allowance holds."""
    inp, v, allowance = _cancelling(torch.bfloat16, make_inputs)
    with dask.config.set({"cqsa.partials": partials}):
        out, lse = cqsa_dask.attention(inp.q.cuda(), inp.k.cuda(), v.cuda(), return_lse=True, memory_budget="1GB",
                                       groups=CANCEL.groups)
    check_exact(inp.q, inp.k, v, out.cpu(), lse.cpu(), causal=False, scale=None, extra_floor=allowance,
                context=f"{inp.ctx}; partials {partials}")
