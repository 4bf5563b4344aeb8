"""Bounded partials (``partials="bounded"``, cqsa_dask/execution/partials/bounded.py, fold.py).

- exactness against float64 through the session cluster (uneven sizes,
  causal, GQA, many groups, large logits), with the same criterion as
  test_exactness;
- the hi/lo codec keeps 16 (bfloat16) or 19 (float16) significant bits;
- folding in any order, and every crash point of a fold (journal written,
  out overwritten, commit done but journal left), gives the exact result;
- a lost fold state is detected, the row reset and its producers' markers cleared;
- the storage bound: peak bytes of partial results on disk, sampled while a
  real job with many groups runs, stay below the output's bytes (and the
  same job with partials="all" needs several times the output).
"""

from __future__ import annotations

import functools
import math
import os
import random
import threading
from dataclasses import replace
from pathlib import Path
from typing import Any

import dask
import numpy as np
import pytest
import torch
import zarr
from conftest import draw_inputs
from hypothesis import given, settings
from hypothesis import strategies as st
from reference import check_exact, reference_attention

import cqsa_dask
from cqsa_dask.core.errors import StoreError
from cqsa_dask.core.plan import make_plan
from cqsa_dask.execution.partials.fold import _Row, fold, join, split
from cqsa_dask.store.layout import chunk_exists, create_outputs, open_job

DTYPES = {"fp32": torch.float32, "fp16": torch.float16, "bf16": torch.bfloat16}
CASES = {  # (B, Hq, Hkv, N, D, W)
    "ragged": (2, 2, 2, 257, 64, 7),
    "gqa-w13": (1, 4, 2, 300, 32, 13),
    "n<w": (1, 2, 1, 9, 16, 13),
    "w31": (1, 2, 2, 500, 16, 31),
}


@pytest.mark.parametrize("causal", [False, True], ids=["full", "causal"])
@pytest.mark.parametrize("dtype", list(DTYPES.values()), ids=list(DTYPES))
@pytest.mark.parametrize("case", list(CASES.values()), ids=list(CASES))
def test_bounded_is_exact(case: tuple[int, ...], dtype: torch.dtype, causal: bool, client, make_inputs) -> None:  # type: ignore[no-untyped-def]
    b, hq, hkv, n, d, w = case
    inp = make_inputs(b, hq, hkv, n, d, dtype)
    with dask.config.set({"cqsa.partials": "bounded"}):
        out, lse = cqsa_dask.attention(inp.q, inp.k, inp.v, causal=causal, return_lse=True, client=client, groups=w)
    check_exact(inp.q, inp.k, inp.v, out, lse, causal=causal, scale=None, context=inp.ctx)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=["fp32", "bf16"])
def test_bounded_large_logits(dtype: torch.dtype, client, make_inputs) -> None:  # type: ignore[no-untyped-def]
    inp = make_inputs(1, 4, 2, 257, 64, dtype, magnitude=1e3)
    with dask.config.set({"cqsa.partials": "bounded"}):
        out, lse = cqsa_dask.attention(inp.q, inp.k, inp.v, causal=True, return_lse=True, client=client, groups=13)
    check_exact(inp.q, inp.k, inp.v, out, lse, causal=True, scale=None, context=inp.ctx)
    assert lse.abs().max() > 500


# -- the codec -------------------------------------------------------------------------------------
@settings(max_examples=60, deadline=None)
@given(dtype=st.sampled_from(["bfloat16", "float16"]), seed=st.integers(0, 2**32 - 1),
       exp=st.integers(-20, 15))
def test_split_join_keeps_sixteen_bits(dtype: str, seed: int, exp: int) -> None:
    g = torch.Generator().manual_seed(seed)
    x = (torch.randn(4096, generator=g, dtype=torch.float64) * 2.0**exp).float()
    if dtype == "float16":
        x = x.clamp(-60000, 60000)
    hi, lo = split(x, dtype)
    assert hi.dtype == cqsa_dask.store.layout.TORCH_DTYPES[dtype] and lo is not None and lo.dtype == torch.int8
    y = join(hi, lo, dtype).double()
    p = 8 if dtype == "bfloat16" else 11
    # |error| <= 2^-(p+8) of hi's binade (half a unit of lo, plus float32 rounding), or tiny for subnormals
    binade = torch.exp2(torch.frexp(x.double()).exponent.double())
    floor = 2.0**-32 if dtype == "float16" else 0.0
    err = (y - x.double()).abs()
    bound = binade * 2.0 ** -(p + 8) + x.double().abs() * 2.0**-24 + floor
    assert bool((err <= bound).all()), float((err / bound).max())
    assert torch.equal(hi, x.to(hi.dtype)), "hi is x rounded to nearest"


@settings(max_examples=40, deadline=None)
@given(dtype=st.sampled_from(["bfloat16", "float16"]), seed=st.integers(0, 2**32 - 1),
       exp=st.integers(-150, 128))
def test_split_join_are_the_float64_definition(dtype: str, seed: int, exp: int) -> None:
    """split and join (float32, exponent bits) equal, bit for bit, their definition in float64
    with frexp / exp2: unit = exp2(clamp(frexp(hi).exponent) - p - 8), lo = round((x - hi) / unit)
    clamped to int8, hi + lo * unit rounded to float32; for normal, subnormal, zero and (for
    bfloat16) near-overflow values.  Inf and NaN hi keep Inf / NaN through split and join."""
    g = torch.Generator().manual_seed(seed)
    x = (torch.randn(2048, generator=g, dtype=torch.float64) * 2.0**exp).float()
    _check_definition(torch.cat([x, _SPECIAL]), dtype)


_SPECIAL = torch.tensor([0.0, -0.0, 1e-45, -1e-40, 3.3e38, 65504.0, float("inf"), float("nan")])


@pytest.mark.parametrize("dtype", ["bfloat16", "float16"])
def test_split_join_block_by_block(dtype: str, monkeypatch: pytest.MonkeyPatch) -> None:
    """The codec runs in blocks of ``_BLOCK`` elements: with blocks of 7 and 1000 elements
    (a short last one) and a transposed (non-contiguous) input it still meets the float64
    definition everywhere, shape and element order kept."""
    import cqsa_dask.execution.partials.fold as fold_module

    g = torch.Generator().manual_seed(int.from_bytes(os.urandom(4), "little"))
    x = torch.randn(3, 67, 23, generator=g, dtype=torch.float64) * torch.exp2(torch.randint(-140, 120, (3, 67, 23),
                                                                                             generator=g))
    x = x.float()
    x.view(-1)[:len(_SPECIAL)] = _SPECIAL
    for block in (7, 1000):
        monkeypatch.setattr(fold_module, "_BLOCK", block)
        _check_definition(x, dtype)
        _check_definition(x.transpose(0, 2), dtype)


def _check_definition(x: torch.Tensor, dtype: str) -> None:
    from cqsa_dask.execution.partials.fold import _LO_BITS, _MIN_EXP, _PRECISION

    hi, lo = split(x, dtype)
    assert hi.shape == x.shape and lo is not None and lo.shape == x.shape
    assert torch.equal(hi.view(torch.int16), x.to(hi.dtype).view(torch.int16)), "hi is x rounded to nearest"
    h = hi.double()
    e = torch.frexp(h).exponent.clamp(min=_MIN_EXP[dtype])
    e = torch.where(h == 0, torch.full_like(e, _MIN_EXP[dtype]), e)
    unit = torch.exp2((e - (_PRECISION[dtype] + _LO_BITS)).double())
    finite = torch.isfinite(h)
    want_lo = torch.round((x.double() - h) / unit).clamp(-127, 127).to(torch.int8)
    assert torch.equal(lo[finite], want_lo[finite])
    y = join(hi, lo, dtype)
    assert torch.equal(y[finite], (h + lo.double() * unit).float()[finite])
    special = ~finite
    assert torch.equal(torch.isnan(y[special]), torch.isnan(hi.float()[special]))
    assert torch.equal(y[special & ~torch.isnan(y)], hi.float()[special & ~torch.isnan(y)])


def test_split_float32_has_no_low_part() -> None:
    x = torch.randn(100)
    hi, lo = split(x, "float32")
    assert lo is None and torch.equal(hi, x) and torch.equal(join(hi, None, "float32"), x)


# -- folds at the Python level: any order, every crash point -----------------------------------------
def _fold_job(tmp_path: Path, dtype: torch.dtype, causal: bool, w: int = 7, seed: int | None = None):  # type: ignore[no-untyped-def]
    inp = draw_inputs(1, 2, 1, 150, 16, dtype, seed=seed)
    path = tmp_path / "job.zarr"
    g = inp.store(path, 64)
    plan = make_plan(seq_len=150, heads=2, kv_heads=1, head_dim=16, dtype=str(dtype), causal=causal,
                     groups=w, budget="1GB", partials="bounded")
    create_outputs(g, plan, "tok")
    return inp, str(path), plan


def _partial(inp, plan, a: int, keys: list[int]) -> tuple[torch.Tensor, torch.Tensor]:  # type: ignore[no-untyped-def]
    """float64 attention of query group a over key groups ``keys`` -> (out (Hq, L, D) float32, lse (Hq, L))."""
    s0, s1 = plan.group_bounds(a)
    q = inp.q[0, :, s0:s1].double()  # (Hq, L, D)
    idx = torch.cat([torch.arange(*plan.group_bounds(b)) for b in keys])
    k = inp.k[0, 0, idx].double()
    v = inp.v[0, 0, idx].double()
    logits = q @ k.T / math.sqrt(q.shape[-1])  # (Hq, L, K)
    if plan.causal:
        logits = logits.masked_fill(idx[None, None, :] > torch.arange(s0, s1)[None, :, None], -math.inf)
    lse = torch.logsumexp(logits, -1)
    out = torch.softmax(logits, -1) @ v
    return out.float(), lse.float()


def _contributions(inp, plan) -> dict[int, list[tuple[int, torch.Tensor, torch.Tensor]]]:  # type: ignore[no-untyped-def]
    """For each row with several producers: [(task, out, lse)] as the quorum tasks would fold them."""
    rows: dict[int, list[tuple[int, torch.Tensor, torch.Tensor]]] = {}
    for t in range(plan.groups):
        for _, a, bs in plan.work(t):
            if not plan.direct(a):
                rows.setdefault(a, []).append((t, *_partial(inp, plan, a, bs)))
    return rows


def _check_rows(inp, path: str, plan, rows, causal: bool) -> None:  # type: ignore[no-untyped-def]
    g = zarr.open_group(path, mode="r")
    ref_out, ref_lse = reference_attention(inp.q, inp.k, inp.v, causal, None)
    out = cqsa_dask.store.layout.read_block(g["out"], (slice(None),) * 4, plan.dtype)  # type: ignore[arg-type]
    lse = torch.from_numpy(np.asarray(g["lse"][...]))
    tol = 4 * torch.finfo(inp.q.dtype).eps + 1e-6
    for a in rows:
        s0, s1 = plan.group_bounds(a)
        assert (out[0, :, s0:s1].double() - ref_out[0, :, s0:s1]).abs().max() <= tol * inp.v.abs().max(), a
        assert (lse[0, :, s0:s1].double() - ref_lse[0, :, s0:s1]).abs().max() <= 1e-5, a


@pytest.mark.parametrize("causal", [False, True], ids=["full", "causal"])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=["fp32", "bf16"])
def test_fold_order_and_crash_points(tmp_path: Path, dtype: torch.dtype, causal: bool) -> None:
    seed = int.from_bytes(os.urandom(4), "little")
    rng = random.Random(seed)
    inp, path, plan = _fold_job(tmp_path, dtype, causal, seed=seed)
    job = open_job(path, "tok")
    rows = _contributions(inp, plan)
    crashes = iter(["journal", "out-written", "committed"] * 10)
    for a, parts in rows.items():
        rng.shuffle(parts)  # any completion order
        for n, (t, out, lse) in enumerate(parts):
            if n and n % 2 == 0:  # a fold that dies somewhere, then its retry
                _crash(job, a, t, out, lse, next(crashes))
            fold(job, a, 0, 0, t, out, lse)
            fold(job, a, 0, 0, t, out, lse)  # a second delivery changes nothing
        assert job.merge_done[a, 0, 0] == 1, f"row {a} not finished (seed {seed})"
        assert not chunk_exists(job.partials["fold_state"], (a, 0, 0, 0)), "fold state left behind"
        assert not chunk_exists(job.partials["fold_journal_head"], (a, 0, 0, 0)), "journal left behind"
    _check_rows(inp, path, plan, rows, causal)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=["fp32", "bf16"])
def test_the_journal_saves_the_out_chunk_as_it_was(tmp_path: Path, dtype: torch.dtype,
                                                   monkeypatch: pytest.MonkeyPatch) -> None:
    """What a fold journals is the row's out before the fold, so that a crash between its out
    write and its commit restores it.  (For float32 jobs join returned hi itself, the merge
    updated it in place, and the journal saved the merged values: a retry after such a crash
    would have folded the producer twice.)"""
    from cqsa_dask.execution.partials import fold as fold_module

    inp, path, plan = _fold_job(tmp_path, dtype, False, seed=3)
    job = open_job(path, "tok")
    a, parts = next(iter(_contributions(inp, plan).items()))
    (t0, o0, l0), (t1, o1, l1) = parts[:2]
    fold(job, a, 0, 0, t0, o0, l0)
    before = _Row(job, a, 0, 0).hi().clone()
    saved: list[torch.Tensor] = []
    journal = fold_module._Row.journal

    def spy(self, st, hi):  # type: ignore[no-untyped-def]
        saved.append(hi.clone())
        return journal(self, st, hi)

    monkeypatch.setattr(fold_module._Row, "journal", spy)
    fold(job, a, 0, 0, t1, o1, l1)
    assert len(saved) == 1 and torch.equal(saved[0], before)
    assert not torch.equal(_Row(job, a, 0, 0).hi(), before), "the fold changed the row"


class _Killed(BaseException):
    """Stands for the kill: raised inside fold at a crash point, nothing after it runs."""


def _crash(job, a: int, t: int, out: torch.Tensor, lse: torch.Tensor, where: str) -> None:  # type: ignore[no-untyped-def]
    """Run the real fold of task t into row a and stop it, as a killed process would, right
    after ``where``: "journal" (journal written), "out-written" (the new out chunk written
    too), "committed" (the state written, the journal not yet deleted)."""
    from cqsa_dask.execution.partials import fold as fold_module

    journal, write_block, end_journal = fold_module._Row.journal, fold_module.write_block, fold_module._Row.end_journal

    def after_journal(self, *args):  # type: ignore[no-untyped-def]
        journal(self, *args)
        if where == "journal":
            raise _Killed

    def after_out(arr, *args):  # type: ignore[no-untyped-def]
        write_block(arr, *args)
        if where == "out-written" and arr is job.out:
            raise _Killed

    def before_end(self):  # type: ignore[no-untyped-def]
        if where == "committed":
            raise _Killed
        end_journal(self)

    with pytest.MonkeyPatch.context() as mp:
        mp.setattr(fold_module._Row, "journal", after_journal)
        mp.setattr(fold_module, "write_block", after_out)
        mp.setattr(fold_module._Row, "end_journal", before_end)
        try:
            fold(job, a, 0, 0, t, out, lse)
        except _Killed:
            return
    raise AssertionError(f"fold of task {t} into row {a} never reached {where!r}")


def test_lost_fold_state_is_detected(tmp_path: Path) -> None:
    inp, path, plan = _fold_job(tmp_path, torch.bfloat16, False)
    job = open_job(path, "tok")
    rows = _contributions(inp, plan)
    a, parts = next(iter(rows.items()))
    for t, out, lse in parts[:2]:
        fold(job, a, 0, 0, t, out, lse)
        job.task_done[t, 0, 0] = 1
    cqsa_dask.store.layout.delete_chunk(job.partials["fold_state"], (a, 0, 0, 0))  # lost
    t, out, lse = parts[2]
    with pytest.raises(StoreError, match=f"query group {a} .*lost its fold state"):
        fold(job, a, 0, 0, t, out, lse)
    producers = [p for p, _ in plan.producers(a)]
    assert not any(job.task_done[p, 0, 0] for p in producers), "the row's producers must be recomputed"
    assert not chunk_exists(job.out, (0, 0, a, 0)), "the row must be reset"
    for t, out, lse in parts:  # what a resume does: every producer folds again
        fold(job, a, 0, 0, t, out, lse)
    _check_rows(inp, path, plan, {a: parts}, False)


def test_unreadable_fold_state_resets_the_row(tmp_path: Path) -> None:
    inp, path, plan = _fold_job(tmp_path, torch.bfloat16, False)
    job = open_job(path, "tok")
    a, parts = next(iter(_contributions(inp, plan).items()))
    for t, out, lse in parts[:2]:
        fold(job, a, 0, 0, t, out, lse)
    chunk = Path(path, "_cqsa", "fold_state", "c", str(a), "0", "0", "0")
    chunk.write_bytes(chunk.read_bytes()[:100])  # truncated
    t, out, lse = parts[2]
    with pytest.raises(StoreError, match="lost its fold state \\(unreadable\\)"):
        fold(job, a, 0, 0, t, out, lse)
    assert not chunk.exists() and not chunk_exists(job.out, (0, 0, a, 0))


# -- the storage bound -------------------------------------------------------------------------------
def _partial_bytes(store: Path) -> int:
    """Bytes on disk of everything the job keeps beyond out and lse (partials, fold states, journals)."""
    total = 0
    for name in ("partial_out", "partial_lse", "fold_state", "fold_journal", "fold_journal_head"):
        for root, _, files in os.walk(store / "_cqsa" / name):
            for f in files:
                if f != "zarr.json":
                    try:
                        total += os.stat(os.path.join(root, f)).st_size
                    except FileNotFoundError:
                        pass
    return total


def _peak_partials(store: Path, run) -> tuple[int, int, Any]:  # type: ignore[no-untyped-def]
    """(peak sampled partial bytes, samples, ``run()``'s result) while ``run()`` executes."""
    peak, samples, stop = 0, 0, threading.Event()

    def watch() -> None:
        nonlocal peak, samples
        while not stop.is_set():
            peak = max(peak, _partial_bytes(store))
            samples += 1

    th = threading.Thread(target=watch, daemon=True)
    th.start()
    try:
        result = run()
    finally:
        stop.set()
        th.join()
    return peak, samples, result


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float32], ids=["bf16", "fp32"])
def test_peak_partial_bytes_below_output(tmp_path: Path, client, dtype: torch.dtype) -> None:  # type: ignore[no-untyped-def]
    """W = 57 groups (|D| = 8): bounded stays under 1x the output, "all" does not."""
    inp = draw_inputs(1, 2, 2, 2048, 64, dtype)
    figures = {}
    for mode in ("bounded", "all"):
        store = tmp_path / f"{mode}.zarr"
        g = inp.store(store, 512)
        run = functools.partial(cqsa_dask.run, store, client=client, groups=57, partials=mode, memory_budget="1GB")
        with dask.config.set({"cqsa.tasks-in-flight": 2}):  # what the session cluster (two threads) runs
            res = _peak_partials(store, run)
        peak, samples, plan = res[0], res[1], res[2].plan
        assert plan.partials == mode and plan.groups == 57 and plan.quorum_size == 8
        figures[mode] = (peak / plan.output_bytes, samples, plan.partial_bytes / plan.output_bytes)
        out = cqsa_dask.store.layout.read_block(g["out"], (slice(None),) * 4, plan.dtype)  # type: ignore[arg-type]
        lse = torch.from_numpy(np.asarray(g["lse"][...]))
        check_exact(inp.q, inp.k, inp.v, out, lse, causal=False, scale=None, context=f"{mode} seed {inp.seed}")
    print(f"peak partial bytes / output bytes (sampled, samples, planned): {figures}")
    bounded, all_ = figures["bounded"], figures["all"]
    assert bounded[1] > 20 and all_[1] > 20, "too few samples to see the peak"
    assert 0 < bounded[0] <= 1.0, figures
    assert bounded[0] <= bounded[2], "the plan's figure is an upper bound"
    assert all_[0] > 2.0, "the same job keeping every partial needs several times the output"
    if dtype == torch.bfloat16:
        assert bounded[0] > 0.3, "the low parts of the open rows must show"
    assert _partial_bytes(tmp_path / "bounded.zarr") == 0, "a finished bounded job keeps no partials"


@pytest.mark.parametrize("causal", [False, True], ids=["full", "causal"])
@pytest.mark.parametrize(("dtype", "budget", "blocks"), [(torch.bfloat16, "2.2MB", 2), (torch.float32, "1GB", 1)],
                         ids=["bf16-two-head-blocks", "fp32"])
def test_planned_bytes_written_are_what_the_job_writes(tmp_path: Path, client, dtype: torch.dtype,  # type: ignore[no-untyped-def]
                                                     budget: str, blocks: int, causal: bool) -> None:
    """The plan's ``bytes_written`` against the tasks' own count, for both partials policies:
    equal for full attention, an upper bound for causal.  GQA, N not a multiple of W
    (a short last row), W = 13, two batch elements, one or two kv-head blocks."""
    inp = draw_inputs(2, 4, 2, 301, 32, dtype)
    for mode in ("bounded", "all"):
        store = tmp_path / f"{mode}.zarr"
        inp.store(store, 64)
        res = cqsa_dask.run(store, client=client, groups=13, partials=mode, causal=causal, memory_budget=budget)
        plan = res.plan
        assert plan.partials == mode and plan.group_size * plan.groups > plan.seq_len
        assert plan.head_blocks == blocks, plan.heads_per_task
        if causal:
            assert 0 < res.bytes_written <= plan.bytes_written, (mode, res.bytes_written, plan.bytes_written)
        else:
            assert res.bytes_written == plan.bytes_written, (mode, res.bytes_written, plan.bytes_written)


def test_auto_partials_follows_the_limit() -> None:
    kw = {"seq_len": 2**20, "heads": 4, "head_dim": 128, "budget": "1GB", "partials": "auto"}  # W = 7
    small = make_plan(**kw, partials_limit="1TB")  # type: ignore[arg-type]
    big = make_plan(**kw, partials_limit="1GB")  # type: ignore[arg-type]
    assert small.partials == "all" and big.partials == "bounded"
    many = make_plan(**{**kw, "budget": "200MB"}, partials_limit="1GB")  # type: ignore[arg-type]
    assert many.groups >= 13 and many.partials == "bounded"
    assert many.partial_bytes < many.output_bytes < replace(many, partials="all").partial_bytes
    huge = make_plan(seq_len=2**30, heads=1, head_dim=128, budget="12GB", partials="auto")
    assert huge.partials == "bounded" and huge.partial_bytes < huge.output_bytes


def test_auto_partials_fit_the_disk(tmp_path: Path, client, make_inputs) -> None:  # type: ignore[no-untyped-def]
    """"auto" takes bounded when "all" would not fit the disk; a resumed job keeps its policy.

    The disk is the real one: ``cqsa.partials-disk-fraction`` moves the line
    instead (1e-15 of any real disk's free space is under a byte).
    """
    inp = make_inputs(1, 2, 1, 600, 32, torch.bfloat16)
    store = tmp_path / "s.zarr"
    g = inp.store(store, 128)
    run = functools.partial(cqsa_dask.run, store, client=client, groups=7, memory_budget="1GB", partials="auto")

    def result() -> tuple[torch.Tensor, torch.Tensor]:
        out = cqsa_dask.store.layout.read_block(g["out"], (slice(None),) * 4, "bfloat16")  # type: ignore[arg-type]
        return out, torch.from_numpy(np.asarray(g["lse"][...]))

    with dask.config.set({"cqsa.partials-disk-fraction": 1e-15}):
        first = run()
    assert first.plan.partials == "bounded" and first.quorum_tasks_run == first.plan.tasks
    check_exact(inp.q, inp.k, inp.v, *result(), causal=False, scale=None, context=inp.ctx)
    with dask.config.set({"cqsa.partials-disk-fraction": 1.0}):
        again = run()  # the stored job is resumed with its policy, not re-planned as "all"
        assert again.resumed and again.plan.partials == "bounded" and again.quorum_tasks_run == 0
        fresh = run(restart=True)  # a new job: the disk has room for "all"
    assert fresh.plan.partials == "all" and not fresh.resumed
    check_exact(inp.q, inp.k, inp.v, *result(), causal=False, scale=None, context=inp.ctx)


@pytest.mark.parametrize("shape, strides", [((3, 1), (1, 2)), ((1, 1), (2, 2)), ((2, 3), (1, 2))])
def test_state_bytes_of_any_view(shape: tuple[int, int], strides: tuple[int, int]) -> None:
    """A fold state's lse may be a kernel's strided view: (hq, 1) for a one-token group counts as
    contiguous with a last stride of 2, which a byte view refuses (seen once in the suite, n<w)."""
    from cqsa_dask.execution.partials.fold import _bytes

    base = torch.randn(8)
    t = torch.as_strided(base, shape, strides)
    assert np.array_equal(_bytes(t), t.reshape(-1).clone().numpy().view(np.uint8))
