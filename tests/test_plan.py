"""The planner: budgets and dtypes parsed at the boundary, plans that fit.

Contract of ``make_plan`` under test (``cqsa_dask.core.plan``)::

    candidates W = 1, 2, 3, q^2+q+1 (q prime), W <= N     ascending
    plan = first W, largest kv-head divisor hk, with
           task_memory(W, hk) <= budget // tasks_in_flight
    none fits -> BudgetError naming  min_W task_memory(W, 1) * tasks_in_flight
                 (that budget succeeds, one byte less fails)

Shapes: q (B, Hq, N, D), k and v (B, Hkv, N, D).  Sizes in bytes.
"""

from __future__ import annotations

import json
import math
import re
import time

import pytest
from hypothesis import assume, given, settings
from hypothesis import strategies as st

from cqsa_dask.core.dtypes import DTYPES, parse_dtype
from cqsa_dask.core.errors import BudgetError, CQSAError, InvalidInputError
from cqsa_dask.core.plan import Plan, budget_for, capped_bytes, make_plan, resource_bytes, task_memory
from cqsa_dask.core.quorums import base_set, base_set_size, is_prime, singer_prime
from cqsa_dask.core.units import parse_budget

SPEC_KEYS = {"groups", "quorum_size", "tasks", "task_memory_bytes", "budget_bytes", "flops", "bytes_read",
             "bytes_written"}
MARGIN = 1.10  # make_plan's default safety factor

# -- parse_budget ------------------------------------------------------------


@pytest.mark.parametrize(
    ("text", "expected"),
    [
        ("512MB", 512 * 10**6),
        ("12GB", 12 * 10**9),
        ("1.5GiB", 3 * 2**29),
        ("512MiB", 512 * 2**20),
        ("4096", 4096),
        ("2e9", 2 * 10**9),
        ("1kB", 1000),
        ("3KiB", 3 * 1024),
        ("2TB", 2 * 10**12),
        ("1TiB", 2**40),
        ("12 GB", 12 * 10**9),
        (" 7gb ", 7 * 10**9),
        (".5GB", 5 * 10**8),
        ("100b", 100),
    ],
)
def test_parse_budget_strings(text: str, expected: int) -> None:
    got = parse_budget(text)
    assert got == expected and type(got) is int


@settings(max_examples=200)
@given(n=st.integers(1, 2**52))
def test_parse_budget_ints_are_bytes(n: int) -> None:
    assert parse_budget(n) == n
    assert parse_budget(str(n)) == n


@settings(max_examples=100)
@given(mantissa=st.integers(1, 9999), unit=st.sampled_from(["KB", "MB", "GB", "KiB", "MiB", "GiB"]))
def test_parse_budget_units(mantissa: int, unit: str) -> None:
    factor = {"KB": 10**3, "MB": 10**6, "GB": 10**9, "KiB": 2**10, "MiB": 2**20, "GiB": 2**30}[unit]
    assert parse_budget(f"{mantissa}{unit}") == mantissa * factor
    assert parse_budget(f"{mantissa}{unit.lower()}") == mantissa * factor


@pytest.mark.parametrize(
    "bad", ["12 parsecs", "", "   ", "-1GB", "0", "0GB", "GB", "12GB extra", "1,000", "nan", "inf", True, False,
            0, -1, -2.5, float("nan"), float("inf")]
)
def test_parse_budget_rejects(bad: object) -> None:
    with pytest.raises(BudgetError) as info:
        parse_budget(bad)  # type: ignore[arg-type]
    assert isinstance(info.value, ValueError) and isinstance(info.value, InvalidInputError)
    assert isinstance(info.value, CQSAError)
    assert repr(bad) in str(info.value), f"message should show the given value: {info.value}"


@pytest.mark.parametrize("bad", ["0.5", 0.5, "0.4B"])
def test_parse_budget_never_returns_zero(bad: object) -> None:
    try:
        got = parse_budget(bad)  # type: ignore[arg-type]
    except BudgetError:
        return
    assert got > 0, f"parse_budget({bad!r}) returned {got} bytes"


# -- parse_dtype -------------------------------------------------------------


@pytest.mark.parametrize(
    ("alias", "name"),
    [
        ("float32", "float32"), ("fp32", "float32"), ("f32", "float32"), ("float", "float32"),
        ("torch.float32", "float32"), ("FP32", "float32"),
        ("float16", "float16"), ("fp16", "float16"), ("f16", "float16"), ("half", "float16"),
        ("torch.float16", "float16"),
        ("bfloat16", "bfloat16"), ("bf16", "bfloat16"), ("torch.bfloat16", "bfloat16"), ("BF16", "bfloat16"),
    ],
)
def test_parse_dtype_aliases(alias: str, name: str) -> None:
    assert parse_dtype(alias) == name
    assert name in DTYPES


@pytest.mark.parametrize("bad", ["float64", "torch.float64", "double", "int8", "torch.int8", "uint16", "fp8", "", "bf"])
def test_parse_dtype_rejects(bad: str) -> None:
    with pytest.raises(InvalidInputError, match="not supported") as info:
        parse_dtype(bad)
    assert isinstance(info.value, ValueError) and repr(bad) in str(info.value)


def test_parse_dtype_accepts_torch_dtypes() -> None:
    torch = pytest.importorskip("torch")
    assert [parse_dtype(str(t)) for t in (torch.float32, torch.float16, torch.bfloat16)] == list(DTYPES)
    with pytest.raises(InvalidInputError):
        parse_dtype(str(torch.float64))


# -- make_plan: properties over random shapes and budgets ---------------------


def _candidates(seq_len: int) -> list[int]:
    """The planner's documented candidate group counts, ascending."""
    small = [w for w in (1, 2, 3) if w <= max(1, seq_len)]
    singer = [q * q + q + 1 for q in range(2, math.isqrt(seq_len) + 1) if is_prime(q) and q * q + q + 1 <= seq_len]
    return small + singer


def _needed(message: str) -> int:
    m = re.search(r"needs ([\d,]+) bytes", message)
    assert m, f"BudgetError does not name the smallest budget: {message}"
    return int(m.group(1).replace(",", ""))


shapes = st.fixed_dictionaries({
    "seq_len": st.one_of(st.integers(1, 4096), st.integers(1, 2**31)),
    "kv_heads": st.integers(1, 8),
    "rep": st.integers(1, 4),
    "head_dim": st.integers(1, 256),
    "batch": st.integers(1, 4),
    "dtype": st.sampled_from(["float32", "fp16", "bf16"]),
    "causal": st.booleans(),
})
# Budgets in bytes, log-uniform; half of them just above the 8 MiB fixed overhead of a task,
# where the planner has to choose between many group counts.
budgets = st.one_of(st.floats(6.0, 12.5).map(lambda e: int(10**e)),
                    st.floats(2.0, 10.0).map(lambda e: 8 * 2**20 + int(10**e)))


def _plan(shape: dict[str, object], budget: int | str, **kw: object) -> Plan:
    s = dict(shape)
    rep = s.pop("rep")
    s["heads"] = s["kv_heads"] * rep  # type: ignore[operator]
    return make_plan(**s, budget=budget, **kw)  # type: ignore[arg-type]


def _edge_budget(data: st.DataObject, shape: dict[str, object], in_flight: int) -> int:
    """A budget within a few bytes of what one candidate (W, hk) needs: the planner's decision edges."""
    n, hkv, rep = shape["seq_len"], shape["kv_heads"], shape["rep"]
    w = data.draw(st.sampled_from(_candidates(n)), label="edge W")  # type: ignore[arg-type]
    hk = data.draw(st.sampled_from([h for h in range(1, hkv + 1) if hkv % h == 0]), label="edge hk")  # type: ignore[operator]
    need = task_memory(group_size=-(-n // w), quorum_size=base_set_size(w), heads_kv=hk, heads_q=hk * rep,
                       head_dim=shape["head_dim"], itemsize=DTYPES[parse_dtype(shape["dtype"])], margin=MARGIN)
    return need * in_flight + data.draw(st.integers(-2, 2), label="edge offset")


def _any_budget(data: st.DataObject, shape: dict[str, object], in_flight: int = 1) -> int:
    if data.draw(st.booleans(), label="budget at an edge"):
        return _edge_budget(data, shape, in_flight)
    return data.draw(budgets, label="budget")


@settings(max_examples=300, deadline=None)
@given(shape=shapes, in_flight=st.integers(1, 4), data=st.data())
def test_plan_fits_budget_or_names_the_smallest_budget(shape: dict[str, object], in_flight: int,
                                                       data: st.DataObject) -> None:
    budget = _any_budget(data, shape, in_flight)
    try:
        p = _plan(shape, budget, tasks_in_flight=in_flight)
    except BudgetError as e:
        need = _needed(str(e))
        assert need > budget, f"budget {budget} raised BudgetError although {need} suffices: {e}"
        ok = _plan(shape, need, tasks_in_flight=in_flight)
        assert ok.task_memory_bytes * in_flight <= need
        with pytest.raises(BudgetError):
            _plan(shape, need - 1, tasks_in_flight=in_flight)
        return
    per_task = budget // in_flight
    n, hkv, rep = p.seq_len, p.heads_kv, p.heads_q // p.heads_kv
    ctx = f"{p}"
    assert p.budget_bytes == budget and p.heads_q == hkv * shape["rep"]  # type: ignore[operator]
    assert p.task_memory_bytes <= per_task, ctx
    assert hkv % p.heads_per_task == 0 and p.q_heads_per_task == p.heads_per_task * rep, ctx
    assert p.groups in (1, 2, 3) or singer_prime(p.groups) is not None, ctx
    assert p.groups <= max(1, n), ctx
    assert p.quorum_size == base_set_size(p.groups), ctx
    if p.groups <= 400:
        assert p.quorum_size == len(base_set(p.groups)), ctx
    assert p.tasks == p.groups * p.batch * (hkv // p.heads_per_task), ctx
    assert p.group_size * p.groups >= n > (p.group_size - 1) * p.groups, ctx
    # first fit: every smaller candidate W needs more than the per-task budget, even with one kv head
    for w in _candidates(n):
        if w >= p.groups:
            break
        with pytest.raises(BudgetError):
            _plan(shape, budget, tasks_in_flight=in_flight, groups=w)
    # largest fitting head block: the next larger divisor of Hkv would not fit
    args = {"group_size": p.group_size, "quorum_size": p.quorum_size, "head_dim": p.head_dim,
            "itemsize": p.itemsize, "margin": MARGIN}
    assert task_memory(heads_kv=p.heads_per_task, heads_q=p.q_heads_per_task, **args) == p.task_memory_bytes
    bigger = [h for h in range(p.heads_per_task + 1, hkv + 1) if hkv % h == 0]
    if bigger:
        assert task_memory(heads_kv=bigger[0], heads_q=bigger[0] * rep, **args) > per_task, ctx


@settings(max_examples=200, deadline=None)
@given(shape=shapes, data=st.data())
def test_larger_budget_never_gives_more_groups(shape: dict[str, object], data: st.DataObject) -> None:
    small, large = sorted([_any_budget(data, shape), _any_budget(data, shape)])
    try:
        p_small = _plan(shape, small)
    except BudgetError:
        assume(False)
    p_large = _plan(shape, large)
    assert p_large.groups <= p_small.groups, f"budget {small}: W={p_small.groups}; budget {large}: W={p_large.groups}"
    if p_large.groups == p_small.groups:
        assert p_large.heads_per_task >= p_small.heads_per_task


@settings(max_examples=100, deadline=None)
@given(shape=shapes, w=st.integers(1, 400))
def test_forced_groups_are_used(shape: dict[str, object], w: int) -> None:
    """``groups=W`` is taken as given (also W > N) or refused with BudgetError naming that W."""
    try:
        p = _plan(shape, "1TB", groups=w)
    except BudgetError as e:
        assert f"with {w} groups" in str(e)
        return
    assert p.groups == w and p.quorum_size == len(base_set(w))


@settings(max_examples=200, deadline=None)
@given(shape=shapes, w=st.one_of(st.just(1), st.integers(2, 60)))
def test_flops_and_traffic(shape: dict[str, object], w: int) -> None:
    small = dict(shape, seq_len=min(int(shape["seq_len"]), 4096))  # type: ignore[call-overload]
    p = _plan(small, "10TB", groups=w) if w > 1 else _plan(shape, "10TB")  # the planner's W for any N
    b, hq, hkv, n, d, e = p.batch, p.heads_q, p.heads_kv, p.seq_len, p.head_dim, DTYPES[p.dtype]
    pairs = n * (n + 1) // 2 if p.causal else n * n
    assert p.flops == 4 * b * hq * d * pairs
    if p.causal:
        assert 2 * p.flops == 4 * b * hq * d * n * (n + 1)
    qkv = b * n * d * e * (hq + 2 * hkv)  # inputs, bytes
    out_lse = b * hq * n * (d * e + 4)  # out in q's dtype + float32 lse, bytes
    partial = b * hq * (d + 1) * 4  # a producer's partial of one token of every head: float32 out and lse
    assert p.bytes_read == p.quorum_size * (qkv + partial * n)  # |D| passes over inputs, then |D| partials
    # every producer's partial of each row with several (producers x tokens: shared_rows, checked
    # against a count of the owned pairs in test_shared_rows_*), then out and lse; W = 1 shares none
    assert p.bytes_written == partial * p.shared_rows[3] + out_lse
    if p.groups == 1:
        assert p.bytes_written == out_lse


def test_flops_example() -> None:
    p = make_plan(seq_len=1000, heads=4, kv_heads=2, head_dim=64, batch=3, causal=True, budget="1TB")
    assert p.flops == 4 * 3 * 4 * 64 * 1000 * 1001 // 2 == 1_537_536_000
    full = make_plan(seq_len=1000, heads=4, kv_heads=2, head_dim=64, batch=3, budget="1TB")
    assert full.flops == 4 * 3 * 4 * 64 * 10**6


# -- serialisation -------------------------------------------------------------


@settings(max_examples=100, deadline=None)
@given(shape=shapes, budget=st.sampled_from(["64MB", "1GB", "12GB", "1TB"]),
       scale=st.one_of(st.none(), st.floats(1e-3, 10.0)))
def test_plan_round_trips_through_dict_and_json(shape: dict[str, object], budget: str, scale: float | None) -> None:
    try:
        p = _plan(shape, budget, scale=scale)
    except BudgetError:
        assume(False)
    d = p.to_dict()
    assert SPEC_KEYS <= set(d), f"missing keys {SPEC_KEYS - set(d)}"
    assert all(d[k] == getattr(p, k) for k in SPEC_KEYS)
    assert Plan.from_dict(d) == p
    loaded = json.loads(p.to_json())
    assert loaded == d and Plan.from_dict(loaded) == p
    assert p.scale == (1 / math.sqrt(p.head_dim) if scale is None else scale)


# -- invalid inputs -------------------------------------------------------------


@pytest.mark.parametrize(
    "kw",
    [
        {"heads": 3, "kv_heads": 2},
        {"heads": 4, "kv_heads": 8},
        {"head_dim": 257},
        {"head_dim": 512},
        {"head_dim": 0},
        {"seq_len": 0},
        {"seq_len": -5},
        {"heads": 0},
        {"batch": 0},
        {"heads": True},
        {"seq_len": 64.0},
        {"dtype": "float64"},
        {"dtype": "int8"},
        {"scale": -1.0},
        {"scale": float("nan")},
        {"groups": 0},
    ],
    ids=lambda kw: ",".join(f"{k}={v}" for k, v in kw.items()),
)
def test_invalid_inputs(kw: dict[str, object]) -> None:
    args: dict[str, object] = {"seq_len": 128, "heads": 2, "head_dim": 64, "budget": "1GB"}
    args.update(kw)
    with pytest.raises(InvalidInputError) as info:
        make_plan(**args)  # type: ignore[arg-type]
    assert isinstance(info.value, ValueError) and not isinstance(info.value, BudgetError)


def test_largest_head_dim_is_accepted() -> None:
    assert make_plan(seq_len=16, heads=1, head_dim=256, budget="1GB").head_dim == 256


@pytest.mark.parametrize("budget", ["1kB", 10**6, "12 parsecs", "0", "-1GB"])
def test_budget_errors(budget: object) -> None:
    with pytest.raises(BudgetError):
        make_plan(seq_len=1024, heads=1, head_dim=128, budget=budget)  # type: ignore[arg-type]


# -- the worked shape of the notes -------------------------------------------------


def test_plan_for_a_billion_tokens_is_fast() -> None:
    """N = 2^30, one head, D = 128, bf16, 12 GB: the spec asks for a plan in < 10 s."""
    t0 = time.perf_counter()
    p = make_plan(seq_len=2**30, heads=1, head_dim=128, dtype="bf16", budget="12GB")
    seconds = time.perf_counter() - t0
    assert seconds < 10.0, f"planning took {seconds:.1f}s"
    q = singer_prime(p.groups)
    assert q is not None and p.quorum_size == q + 1, p
    assert p.task_memory_bytes <= 12 * 10**9 and p.heads_per_task == 1
    assert p.tasks == p.groups and p.group_size == -(-(2**30) // p.groups)
    with pytest.raises(BudgetError):  # one candidate fewer does not fit
        prev = max(w for w in _candidates(2**30) if w < p.groups)
        make_plan(seq_len=2**30, heads=1, head_dim=128, dtype="bf16", budget="12GB", groups=prev)


# -- empty groups (W G > N) ---------------------------------------------------------


@settings(max_examples=60, deadline=None)
@given(w=st.sampled_from([7, 13, 21, 31, 57, 73]), data=st.data(), causal=st.booleans())
def test_producers_with_empty_groups_match_the_owned_work(w: int, data: st.DataObject, causal: bool) -> None:
    """Producers of a row, computed from key offsets, equal the (task, slot) pairs whose owned
    work (empty key groups dropped) holds the row; the plan's shared-row figures follow them."""
    g = data.draw(st.integers(2, 40), label="group size")
    n = data.draw(st.integers(max(1, (w - 6) * g), (w - 1) * g), label="N")  # often: the last groups empty
    p = make_plan(seq_len=n, heads=1, head_dim=8, groups=w, budget="1GB", causal=causal)
    ne = p.nonempty_groups
    assume(ne < w)
    rows = {}
    for a in range(w):
        want = [(t, s) for t, s in p.quorums.producers(a, causal) if any(ws == s for ws, _, _ in p.work(t))] if a < ne else []
        assert p.producers(a) == want, (a, ne)
        rows[a] = len(want)
    shared = [a for a, k in rows.items() if k > 1]
    size = {a: e - s for a, (s, e) in zip(shared, map(p.group_bounds, shared))}
    assert p.shared_rows == (len(shared), sum(size.values()), sum(rows[a] for a in shared),
                         sum(rows[a] * size[a] for a in shared))
    assert p.merges == sum(1 for k in rows.values() if k) * p.batch * p.head_blocks == ne  # a merge per computed row
    some = sorted(set(data.draw(st.lists(st.integers(0, ne - 1), min_size=1, max_size=4), label="query groups")))
    picked = make_plan(seq_len=n, heads=1, head_dim=8, groups=w, budget="1GB", causal=causal, query_groups=some)
    assert picked.merges == len(some) and picked.merge_groups == some


def test_huge_plan_with_empty_groups_describes_itself() -> None:
    """N = 2**31 with a 64 MB budget: W = 1,516,593 groups, the last 8 empty, |D| = 1,232.
    Its figures are upper bounds from full rows of |D| producers, found without building the
    quorum system (O(W) in Python); counting rows one by one stalled the client (O(W |D|^3))."""
    from cqsa_dask.core.quorums import quorum_system

    p = make_plan(seq_len=2**31, heads=1, head_dim=8, dtype="bf16", budget="64MB")
    assert (p.groups, p.quorum_size) == (1516593, 1232) and p.nonempty_groups == 1516585
    built = quorum_system.cache_info().misses
    d = p.to_dict()
    assert quorum_system.cache_info().misses == built, "to_dict built the quorum system"
    assert d["partial_bytes"] == p.quorum_size * p.seq_len * (p.head_dim + 1) * 4  # float32 out and lse
    assert p.shared_rows == (p.nonempty_groups, p.seq_len, p.quorum_size * p.nonempty_groups, p.quorum_size * p.seq_len)


@settings(max_examples=200, deadline=None)
@given(budget=st.integers(10**6, 10**11), frac=st.floats(0.001, 1.0), in_flight=st.integers(1, 4))
def test_cuda_tasks_admitted_together_fit_under_the_allocator_cap(budget: int, frac: float, in_flight: int) -> None:
    """On CUDA (the allocator capped at ``capped_bytes``) the tasks a worker resource of ``budget`` admits at
    once predict at most the cap; the planned number in flight is always admitted; on the CPU the ask is the
    prediction itself."""
    usable = capped_bytes(budget)
    need = max(1, int(usable * frac / in_flight))  # what the planner may pick: need * in_flight <= usable
    ask = resource_bytes(need, budget, True)
    assert need <= ask <= budget
    admitted = budget // ask
    assert admitted >= in_flight
    assert admitted * need <= usable + admitted  # to the byte, within the rounding of each ask
    assert resource_bytes(need, budget, False) == need


@settings(max_examples=200, deadline=None)
@given(total=st.integers(1, 10**11))
def test_budget_for_is_the_smallest_budget_that_holds(total: int) -> None:
    b = budget_for(total, True)
    assert capped_bytes(b) >= total > capped_bytes(b - 1)
    assert budget_for(total, False) == total


def test_cuda_plans_size_tasks_under_the_cap() -> None:
    """A CUDA plan's tasks in flight predict at most the capped budget; the error names a budget that works."""
    for budget in (10**9, 4 * 10**9, 12 * 10**9):
        p = make_plan(seq_len=2**22, heads=4, head_dim=128, dtype="bfloat16", budget=budget, tasks_in_flight=2,
                      host_staging=True)
        assert p.task_memory_bytes * 2 <= capped_bytes(budget)
        admitted = budget // p.resource_bytes
        assert admitted >= 2 and admitted * p.task_memory_bytes <= capped_bytes(budget) + admitted
    with pytest.raises(BudgetError) as e:
        make_plan(seq_len=2**22, heads=4, head_dim=128, dtype="bfloat16", budget=10**6, host_staging=True)
    needed = int(re.search(r"needs ([\d,]+) bytes", str(e.value)).group(1).replace(",", ""))  # type: ignore[union-attr]
    make_plan(seq_len=2**22, heads=4, head_dim=128, dtype="bfloat16", budget=needed, host_staging=True)
