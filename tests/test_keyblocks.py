"""k and v of a one-group task in key blocks (``execution/keyblocks.py``, ``cqsa.stream-keys``).

::

    make_plan(stream_limit=)   W = 1 streamed only when no W = 1 task with k, v whole fits, its k, v
                               fit the host limit, and a piece of >= MIN_STREAM_PIECE tokens fits;
                               before any W > 1; never without pieces or a host limit
    cqsa.stream-keys           auto / true / false / bytes, one clear error otherwise
    attention(..., streamed)   W = 1 with k, v streamed block by block: exact against float64
                               (uneven blocks, causal, GQA, bf16 / fp32, large logits), on the
                               session's worker process
    a NaN in a late key block  the job fails with one line, nothing of the row is left
    cqsa.first-pieces 2        a streamed row keeps one piece at a time, exact
    a compressed store         chunks longer than a block read once and cut, shorter ones by block
"""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path
from typing import Any

import dask.config
import pytest
import torch
import zarr
from conftest import draw_inputs
from distributed import Client, LocalCluster
from hypothesis import given, settings
from hypothesis import strategies as st
from reference import check_exact

import cqsa_dask
from cqsa_dask.client.policy import plan_options, stream_limit
from cqsa_dask.core.dtypes import DTYPES
from cqsa_dask.core.errors import BudgetError, InvalidInputError, JobFailedError
from cqsa_dask.core.plan import MIN_STREAM_PIECE, budget_for, make_plan, task_memory, usable_bytes
from cqsa_dask.execution.keyblocks import KeyBlocks
from cqsa_dask.store.random_inputs import write_random_inputs


@settings(max_examples=200, deadline=None)
@given(n=st.integers(2**15, 2**24), hkv=st.sampled_from([1, 2, 4, 8]), rep=st.sampled_from([1, 4]),
       piece=st.sampled_from([0, 2**15, 2**17]), budget_gb=st.floats(0.1, 48), limit_gb=st.sampled_from([0, 4, 64]),
       causal=st.booleans())
def test_keys_are_streamed_only_where_nothing_whole_fits(n: int, hkv: int, rep: int, piece: int, budget_gb: float,
                                                         limit_gb: int, causal: bool) -> None:
    kw: dict[str, Any] = {"seq_len": n, "heads": hkv * rep, "kv_heads": hkv, "head_dim": 128, "dtype": "bfloat16",
                          "causal": causal, "budget": int(budget_gb * 1e9), "host_staging": True,
                          "tasks_in_flight": 2, "query_piece": piece}
    try:
        never = make_plan(**kw)
    except BudgetError:
        never = None
    try:
        plan = make_plan(**kw, stream_limit=limit_gb * 10**9)
    except BudgetError:
        assert never is None, "a host limit never takes a plan away"
        return
    if not plan.stream_keys:
        assert never is not None and plan == never, "without streaming the plan is the one it always was"
        if plan.tasks_in_flight == 1:  # k, v whole, alone: only where two of them do not fit
            assert plan.groups == 1 and piece > 0
            assert plan.task_memory_bytes <= usable_bytes(plan.budget_bytes, True) < 2 * plan.task_memory_bytes
        return
    assert limit_gb > 0 and piece > 0 and plan.groups == 1
    assert never is None or never.groups > 1, "k, v whole at W = 1 is preferred to streaming them"
    host = 2 * n * plan.heads_per_task * 128 * DTYPES["bfloat16"] * plan.tasks_in_flight
    assert host <= limit_gb * 10**9, "the tasks in flight hold their k, v in host memory within the limit"
    assert plan.query_piece in {piece >> s for s in range(8)} and plan.query_piece >= min(piece, MIN_STREAM_PIECE)
    assert plan.task_memory_bytes * plan.tasks_in_flight <= usable_bytes(plan.budget_bytes, True)
    assert plan.task_memory_bytes == task_memory(
        group_size=n, quorum_size=1, heads_kv=plan.heads_per_task, heads_q=plan.q_heads_per_task, head_dim=128,
        itemsize=2, margin=1.10, host_staging=True, query_rows=plan.query_piece, stream_keys=True)


def test_four_million_tokens_one_group_under_4gb_and_1gb() -> None:
    """The performance issue's 4M cases.  4 GB: two one-head tasks with k, v whole do not fit, one
    does (2.85 GB), and it is preferred to streaming.  1 GB: k, v streamed (W = 133 without)."""
    kw: dict[str, Any] = {"seq_len": 2**22, "heads": 4, "head_dim": 128, "budget": "4GB", "host_staging": True,
                          "tasks_in_flight": 2, "query_piece": 131072}
    for limit in (0, 32 * 10**9):
        plan = make_plan(**kw, stream_limit=limit)
        assert (plan.groups, plan.heads_per_task, plan.stream_keys, plan.tasks_in_flight) == (1, 1, False, 1)
        assert plan.task_memory_bytes <= usable_bytes(plan.budget_bytes, True) < 2 * plan.task_memory_bytes
    assert make_plan(**{**kw, "budget": "6GB"}).tasks_in_flight == 2, "two fit: both in flight"
    small = make_plan(**{**kw, "budget": "1GB"}, stream_limit=32 * 10**9)
    assert (small.groups, small.stream_keys, small.query_piece, small.tasks_in_flight) == (1, True, 65536, 2), \
        "the piece is halved to fit"
    assert make_plan(**{**kw, "budget": "1GB"}).groups == 133


def test_the_setting_is_auto_a_switch_or_bytes() -> None:
    assert stream_limit("auto", cuda=False) == 0 and stream_limit(False, cuda=True) == 0
    assert stream_limit("false", cuda=True) == 0 and stream_limit(0, cuda=True) == 0
    quarter = stream_limit("auto", cuda=True)
    assert quarter > 0 and stream_limit(True, cuda=False) == quarter == stream_limit("TRUE", cuda=False)
    assert stream_limit("8GB", cuda=False) == 8 * 10**9 and stream_limit(2**30, cuda=True) == 2**30
    for bad in ("lots", -5, "1.5 bananas"):
        with pytest.raises(InvalidInputError, match="stream-keys must be"):
            stream_limit(bad, cuda=True)
    with dask.config.set({"cqsa.stream-keys": "3GB"}):
        assert plan_options("cpu")["stream_limit"] == 3 * 10**9
    assert plan_options("cpu")["stream_limit"] == 0, "the CPU never streams by default"


def _one_head_task(n: int, hq: int, hkv: int, d: int, dtype: torch.dtype, piece: int,
                   host_staging: bool = False) -> tuple[int, int]:
    """Predicted bytes of a W = 1 task of one kv head: (k, v streamed, k, v whole)."""
    e, margin = torch.finfo(dtype).bits // 8, float(dask.config.get("cqsa.memory-margin"))
    kw: dict[str, Any] = {"group_size": n, "quorum_size": 1, "heads_kv": 1, "heads_q": hq // hkv, "head_dim": d,
                          "itemsize": e, "margin": margin, "host_staging": host_staging, "query_rows": piece}
    return task_memory(**kw, stream_keys=True), task_memory(**kw)


def _streaming_budget(n: int, hq: int, hkv: int, d: int, dtype: torch.dtype, piece: int) -> int:
    """A CPU budget (one task in flight) between a W = 1 task with k, v streamed and one with them
    whole, at one kv head a task."""
    streamed, whole = _one_head_task(n, hq, hkv, d, dtype, piece)
    assert streamed < whole
    return (streamed + whole) // 2


@pytest.mark.parametrize(("dtype", "hq", "hkv", "magnitude"), [
    (torch.bfloat16, 4, 2, 1.0), (torch.float32, 2, 2, 1.0), (torch.bfloat16, 2, 1, 30.0)],
    ids=["bf16-gqa", "fp32", "bf16-mqa-large-logits"])
@pytest.mark.parametrize("causal", [False, True], ids=["full", "causal"])
def test_streamed_keys_are_exact(client: Client, dtype: torch.dtype, hq: int, hkv: int, magnitude: float,
                                 causal: bool) -> None:
    """3,001 tokens in query pieces and key blocks of at most 700 (601 x 4, 597): every piece
    attends to every block (causal: the earlier ones, then its own under the mask), merged."""
    inp = draw_inputs(1, hq, hkv, 3001, 32, dtype, magnitude=magnitude)
    print(f"inputs: {inp.ctx}")
    budget = _streaming_budget(3001, hq, hkv, 32, dtype, 700)
    with dask.config.set({"cqsa.query-piece": 700, "cqsa.stream-keys": "1GB"}):
        plan = make_plan(seq_len=3001, heads=hq, kv_heads=hkv, head_dim=32, dtype=str(dtype), causal=causal,
                         budget=budget, **plan_options("cpu"))
        assert (plan.groups, plan.heads_per_task, plan.stream_keys) == (1, 1, True), plan
        out, lse = cqsa_dask.attention(inp.q, inp.k, inp.v, causal=causal, return_lse=True, client=client,
                                       memory_budget=budget)
    check_exact(inp.q, inp.k, inp.v, out, lse, causal=causal, scale=None, context=inp.ctx)


def test_a_nan_in_a_late_key_block_fails_the_job_and_leaves_no_row(client: Client, tmp_path: Path) -> None:
    store = tmp_path / "job.zarr"
    write_random_inputs(store, seq_len=3000, heads=2, head_dim=16, dtype="float32", seed=11)
    v = zarr.open_array(store / "v", mode="r+")
    v[0, 1, 2900, 3] = float("nan")  # head 1, the last key block
    budget = _streaming_budget(3000, 2, 2, 16, torch.float32, 600)
    with dask.config.set({"cqsa.query-piece": 600, "cqsa.stream-keys": "1GB", "cqsa.retries": 0}), \
            pytest.raises(JobFailedError, match=r"input v holds NaN or Inf in group 0 \(tokens 2400\.\.2999"):
        cqsa_dask.run(store, client=client, memory_budget=budget)
    root = zarr.open_group(store, mode="r")
    out, engine = root["out"], root["_cqsa"]
    assert isinstance(out, zarr.Array) and out.chunks[1] == 1, "one task per head"
    head1 = store / "out" / out.metadata.encode_chunk_key((0, 1, 0, 0))
    assert not head1.exists(), "no out chunk of head 1"
    assert not list(head1.parent.glob("*.tmp")), "no temporary file of head 1 is left"
    assert not engine["merge_done"][0, 0, 1] and not engine["task_done"][0, 0, 1], "head 1 is not marked done"


_CUDA_TOKENS = 16001  # enough (with pieces of 700) that two streamed tasks fit a budget that one whole does not


def _two_streamed_budget() -> int:
    """A CUDA budget (two tasks in flight) where two one-kv-head tasks with k, v streamed fit and
    one with them whole does not (else the planner runs that one alone)."""
    streamed, whole = _one_head_task(_CUDA_TOKENS, 4, 2, 128, torch.bfloat16, 700, host_staging=True)
    assert 2 * streamed < whole
    return budget_for((2 * streamed + whole) // 2, True)


def test_the_cuda_streaming_budget_streams_two_tasks() -> None:
    """The GPU test's budget, planned here: streamed, two in flight."""
    with dask.config.set({"cqsa.query-piece": 700, "cqsa.stream-keys": "1GB"}):
        for causal in (False, True):
            plan = make_plan(seq_len=_CUDA_TOKENS, heads=4, kv_heads=2, head_dim=128, causal=causal,
                             budget=_two_streamed_budget(), **plan_options("cuda"))
            assert (plan.groups, plan.stream_keys, plan.tasks_in_flight, plan.tasks) == (1, True, 2, 2), plan


@pytest.mark.gpu
@pytest.mark.parametrize("turn", ["kernels", "streams"])
@pytest.mark.parametrize("causal", [False, True], ids=["full", "causal"])
def test_streamed_keys_are_exact_on_cuda(turn: str, causal: bool) -> None:
    """cuDNN on blocks copied from pinned host memory on the upload stream, at most two on the
    device, under either turn."""
    inp = draw_inputs(1, 4, 2, _CUDA_TOKENS, 128, torch.bfloat16)
    print(f"inputs: {inp.ctx}")
    with dask.config.set({"cqsa.query-piece": 700, "cqsa.cuda-turn": turn, "cqsa.stream-keys": "1GB",
                          "cqsa.cap-device-memory": False}):  # a budget of tens of MB: no allocator cap
        budget = _two_streamed_budget()
        plan = make_plan(seq_len=_CUDA_TOKENS, heads=4, kv_heads=2, head_dim=128, causal=causal, budget=budget,
                         **plan_options("cuda"))
        assert (plan.groups, plan.stream_keys, plan.tasks_in_flight) == (1, True, 2), plan
        out, lse = cqsa_dask.attention(inp.q.cuda(), inp.k.cuda(), inp.v.cuda(), causal=causal, return_lse=True,
                                       memory_budget=budget)
    check_exact(inp.q, inp.k, inp.v, out.cpu(), lse.cpu(), causal=causal, scale=None, context=f"{turn} {inp.ctx}")


@pytest.fixture(scope="module")
def threaded() -> Iterator[Client]:
    with LocalCluster(n_workers=1, threads_per_worker=1, processes=False, resources={"device_mem": 4e9},
                      dashboard_address=None) as cluster, Client(cluster) as c:
        yield c


def test_streamed_keys_keep_one_piece_at_a_time(threaded: Client, pieces_together: list[int]) -> None:
    """cqsa.first-pieces 2 leaves a streamed row's pieces one at a time (each copies the blocks it
    attends to): exact, and no two pieces computed together."""
    inp = draw_inputs(1, 2, 2, 3001, 32, torch.float32)
    print(f"inputs: {inp.ctx}")
    budget = _streaming_budget(3001, 2, 2, 32, torch.float32, 700)
    with dask.config.set({"cqsa.query-piece": 700, "cqsa.stream-keys": "1GB", "cqsa.first-pieces": 2}):
        plan = make_plan(seq_len=3001, heads=2, head_dim=32, dtype="float32", budget=budget, **plan_options("cpu"))
        assert (plan.groups, plan.stream_keys) == (1, True), plan
        out, lse = cqsa_dask.attention(inp.q, inp.k, inp.v, return_lse=True, client=threaded, memory_budget=budget)
    check_exact(inp.q, inp.k, inp.v, out, lse, causal=False, scale=None, context=inp.ctx)
    assert pieces_together == [], pieces_together


@pytest.mark.parametrize(("chunk_tokens", "reads"), [(3000, [None]), (500, list(range(5)))],
                         ids=["one-chunk-a-head", "chunks-smaller-than-blocks"])
def test_a_compressed_store_is_read_whole_or_in_blocks_and_is_exact(
        threaded: Client, tmp_path: Path, monkeypatch: pytest.MonkeyPatch, chunk_tokens: int,
        reads: list[int | None]) -> None:
    """Inputs written with plain zarr's default (compressed) codecs, which decode whole chunks: a
    chunk of more tokens than a key block is read once and cut, smaller chunks block by block."""
    seen: list[tuple[str, int | None]] = []
    real = KeyBlocks._read

    def spy(self: KeyBlocks, name: str, j: int | None) -> Any:
        seen.append((name, j))
        return real(self, name, j)

    monkeypatch.setattr(KeyBlocks, "_read", spy)
    inp = draw_inputs(1, 2, 1, 3000, 16, torch.float32)
    print(f"inputs: {inp.ctx}")
    store = tmp_path / "plain.zarr"
    root = zarr.open_group(store, mode="w", zarr_format=3)
    for name, x in (("q", inp.q), ("k", inp.k), ("v", inp.v)):
        arr = root.create_array(name, shape=x.shape, chunks=(1, x.shape[1], chunk_tokens, 16), dtype="float32")
        arr[...] = x.numpy()
    assert root["k"].metadata.codecs[-1].__class__.__name__ != "BytesCodec", "compressed"
    budget = _streaming_budget(3000, 2, 1, 16, torch.float32, 600)
    with dask.config.set({"cqsa.query-piece": 600, "cqsa.stream-keys": "1GB"}):
        res = cqsa_dask.run(store, client=threaded, memory_budget=budget, causal=True)
    assert res.plan.stream_keys and res.plan.groups == 1
    out = torch.from_numpy(zarr.open_array(store / "out", mode="r")[...])
    lse = torch.from_numpy(zarr.open_array(store / "lse", mode="r")[...])
    check_exact(inp.q, inp.k, inp.v, out, lse, causal=True, scale=None, context=inp.ctx)
    assert sorted(seen, key=str) == sorted([(n, j) for n in ("k", "v") for j in reads], key=str)
