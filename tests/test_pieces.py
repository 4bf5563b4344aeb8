"""Rows a task computes alone, in query pieces (``execution/pieces.py``, ``cqsa.query-piece``).

::

    steps(plan, work, P)       every row once: a direct row of more than P tokens in pieces of at
                               most P, in order, flagged first / last; any other row whole
    attention(..., W = 1)      pieces on the session's worker process: exact against float64
                               (uneven pieces, causal diagonal cut at each piece, GQA, bf16 / fp32,
                               large logits)
    together(plan, steps, F)   every step once, in order; with F = 2 the first two pieces of a
                               non-causal W = 1 row with resident keys at once, nothing else
    cqsa.first-pieces 2        exact (GQA, bf16 / fp32, large logits, a row of two pieces), the
                               pair computed together; causal rows (and streamed ones:
                               test_keyblocks.py) unchanged and exact; any value but 1 or 2
                               refused with one line
    ChunkStream                token runs in any order give the bytes of a whole-chunk write;
                               nothing is seen before commit; abort leaves nothing
    a zarr MemoryStore         no chunk files: pieces go through a host buffer (threaded cluster)
    a NaN in a late piece      the job fails with one line; the row's chunk, its temporary file
                               and its marker are not there
"""

from __future__ import annotations

import dataclasses
import itertools
from pathlib import Path
from typing import Any

import dask.config
import numpy as np
import pytest
import torch
import zarr
import zarr.storage
from conftest import draw_inputs
from distributed import Client, LocalCluster
from hypothesis import given, settings
from hypothesis import strategies as st
from reference import check_exact

import cqsa_dask
from cqsa_dask.client.policy import plan_options
from cqsa_dask.core.errors import BudgetError, InvalidInputError, JobFailedError
from cqsa_dask.core.plan import AUTO_QUERY_PIECE, make_plan
from cqsa_dask.execution import pieces
from cqsa_dask.execution.options import RunOptions
from cqsa_dask.store import localfiles
from cqsa_dask.store.localfiles import LocalFiles, write_whole_chunk
from cqsa_dask.store.random_inputs import write_random_inputs


@settings(max_examples=150, deadline=None)
@given(n=st.integers(1, 5000), groups=st.sampled_from([1, 2, 3, 7, 13]), causal=st.booleans(),
       piece=st.integers(0, 6000))
def test_steps_cover_every_row_once_and_cut_only_direct_rows(n: int, groups: int, causal: bool, piece: int) -> None:
    plan = make_plan(seq_len=n, heads=2, head_dim=8, dtype="float32", causal=causal, groups=groups, budget="1GB")
    for task in plan.task_ids:
        work = plan.work(task)
        out = pieces.steps(plan, work, piece)
        for slot, a, bs in work:
            mine = [s for s in out if s.slot == slot]
            assert all(s.group == a and s.keys == tuple(bs) for s in mine)
            lo, hi = plan.group_bounds(a)
            if piece <= 0 or hi - lo <= piece or not plan.direct(a):
                assert [(s.part, s.first, s.last) for s in mine] == [(None, True, True)]
                continue
            parts = [s.part for s in mine]
            assert parts[0].start == 0 and parts[-1].stop == hi - lo, "the pieces cover the row"
            assert all(p.stop == q.start for p, q in itertools.pairwise(parts)), "in order, no gap, no overlap"
            assert all(0 < p.stop - p.start <= piece for p in parts)
            assert len(parts) == -(-(hi - lo) // piece), "as few pieces as the size allows"
            assert [s.first for s in mine] == [True] + [False] * (len(mine) - 1)
            assert [s.last for s in mine] == [False] * (len(mine) - 1) + [True]
            for s in mine:  # the causal diagonal of each piece: keys [0, r1), earlier pieces whole
                assert s.part is not None
                blocks = s.key_blocks()
                assert blocks[0][0] == 0 and blocks[-1] == (s.part.start, s.part.stop, True)
                assert all(b[1] == c[0] for b, c in itertools.pairwise(blocks))
                assert all(k1 - k0 == parts[0].stop and not m for k0, k1, m in blocks[:-1])
        assert [(s.slot, s.part.start if s.part else 0) for s in out] == sorted(
            (s.slot, s.part.start if s.part else 0) for s in out), "slots in the work's order"


def test_the_setting_is_auto_a_count_or_zero() -> None:
    assert plan_options("cpu")["query_piece"] == AUTO_QUERY_PIECE
    for value, want in ((0, 0), ("4096", 4096), (700, 700)):
        with dask.config.set({"cqsa.query-piece": value}):
            assert plan_options("cuda")["query_piece"] == want
    for bad in (-1, 2.5, "half", True):
        with dask.config.set({"cqsa.query-piece": bad}), pytest.raises(InvalidInputError, match="query-piece must be"):
            plan_options("cpu")


@settings(max_examples=100, deadline=None)
@given(n=st.integers(2**17, 2**23), heads=st.sampled_from([1, 2, 4, 8]), piece=st.sampled_from([0, 2**14, 2**17]),
       budget_gb=st.floats(0.5, 64), cuda=st.booleans())
def test_pieces_lower_the_prediction_only_at_one_group(n: int, heads: int, piece: int, budget_gb: float,
                                                       cuda: bool) -> None:
    """The memory model counts a piece of query rows at W = 1 (every row computed alone, in pieces),
    whole rows at any other W; the plan keeps its piece size, and a task with pieces never needs more."""
    kw: dict[str, Any] = {"seq_len": n, "heads": heads, "head_dim": 128, "dtype": "bfloat16",
                          "budget": int(budget_gb * 1e9), "host_staging": cuda, "tasks_in_flight": 2 if cuda else 1}
    try:
        whole = make_plan(**kw)
    except BudgetError:
        whole = None
    cut = make_plan(**kw, query_piece=piece) if whole is not None else None
    if cut is None:
        return
    assert cut.query_piece == piece
    assert cut.groups <= whole.groups, "pieces never need more groups"
    if cut.groups == whole.groups and cut.heads_per_task == whole.heads_per_task:
        assert cut.task_memory_bytes <= whole.task_memory_bytes
        if cut.groups > 1 or piece == 0 or piece >= n:
            assert cut.task_memory_bytes == whole.task_memory_bytes
        else:
            assert cut.task_memory_bytes < whole.task_memory_bytes


def test_a_resumed_job_keeps_the_pieces_it_was_sized_with(client: Client, tmp_path: Path) -> None:
    store = tmp_path / "job.zarr"
    write_random_inputs(store, seq_len=3000, heads=2, head_dim=16, dtype="float32", seed=4)
    with dask.config.set({"cqsa.query-piece": 1000}):
        first = cqsa_dask.run(store, client=client, groups=1, memory_budget="1GB")
    assert first.plan.query_piece == 1000
    with dask.config.set({"cqsa.query-piece": 0}):
        again = cqsa_dask.run(store, client=client, memory_budget="1GB")
    assert again.resumed and again.plan.query_piece == 1000 and again.quorum_tasks_run == 0
    engine = zarr.open_group(store, mode="r+")["_cqsa"]
    old = {k: v for k, v in dict(engine.attrs["plan"]).items() if k != "query_piece"}  # a plan stored before pieces
    engine.update_attributes({"plan": old})
    engine["task_done"][0, 0, 1] = 0  # one task left to run
    with dask.config.set({"cqsa.query-piece": 700}):
        late = cqsa_dask.run(store, client=client, memory_budget="1GB")
    assert late.resumed and late.plan.query_piece == 0 and late.quorum_tasks_run == 1, "sized for whole rows"


@pytest.mark.parametrize(("dtype", "hq", "hkv", "magnitude"), [
    (torch.bfloat16, 4, 2, 1.0), (torch.float32, 2, 2, 1.0), (torch.bfloat16, 2, 1, 30.0)],
    ids=["bf16-gqa", "fp32", "bf16-mqa-large-logits"])
@pytest.mark.parametrize("causal", [False, True], ids=["full", "causal"])
def test_rows_in_pieces_are_exact(client: Client, dtype: torch.dtype, hq: int, hkv: int, magnitude: float,
                                  causal: bool) -> None:
    """W = 1 on the session's worker process: 3,001 tokens in pieces of at most 700 (601, 601,
    601, 601, 597): on the causal diagonal every piece sees its past unmasked and its own tokens
    under the mask."""
    inp = draw_inputs(1, hq, hkv, 3001, 32, dtype, magnitude=magnitude)
    print(f"inputs: {inp.ctx}")
    with dask.config.set({"cqsa.query-piece": 700}):
        out, lse = cqsa_dask.attention(inp.q, inp.k, inp.v, causal=causal, return_lse=True, client=client,
                                       groups=1, memory_budget="1GB")
    check_exact(inp.q, inp.k, inp.v, out, lse, causal=causal, scale=None, context=inp.ctx)


@settings(max_examples=200, deadline=None)
@given(n=st.integers(1, 5000), groups=st.sampled_from([1, 2, 3, 7]), causal=st.booleans(), stream=st.booleans(),
       piece=st.integers(0, 6000), first=st.sampled_from([1, 2]))
def test_only_the_first_two_pieces_of_a_full_resident_row_go_together(n: int, groups: int, causal: bool,
                                                                      stream: bool, piece: int, first: int) -> None:
    plan = make_plan(seq_len=n, heads=2, head_dim=8, dtype="float32", causal=causal, groups=groups, budget="1GB")
    plan = dataclasses.replace(plan, stream_keys=stream and groups == 1)
    for task in plan.task_ids:
        st_ = pieces.steps(plan, plan.work(task), piece)
        units = pieces.together(plan, st_, first)
        assert [i for u in units for i in u] == list(range(len(st_))), "every step once, in order"
        paired = [u for u in units if len(u) > 1]
        cut = len(st_) >= 2 and st_[0].part is not None
        if first == 2 and groups == 1 and not causal and not plan.stream_keys and cut:
            assert units[0] == [0, 1] and len(paired) == 1
            assert st_[0].first and (st_[1].slot, st_[1].group) == (st_[0].slot, st_[0].group)
        else:
            assert not paired, "one step at a time"


def test_first_pieces_is_one_or_two() -> None:
    assert RunOptions.from_config().first_pieces == 1
    assert RunOptions.from_config(first_pieces="2").first_pieces == 2
    for bad in (0, 3, "two", 1.5, True):
        with pytest.raises(InvalidInputError, match="first-pieces must be 1 or 2"):
            RunOptions.from_config(first_pieces=bad)
    inp = draw_inputs(1, 1, 1, 64, 8)
    with dask.config.set({"cqsa.first-pieces": 3}), pytest.raises(InvalidInputError, match="first-pieces must be 1 or 2"):
        cqsa_dask.attention(inp.q, inp.k, inp.v, memory_budget="1GB")


@pytest.mark.parametrize(("dtype", "hq", "hkv", "n", "magnitude", "causal"), [
    (torch.bfloat16, 4, 2, 3001, 1.0, False), (torch.float32, 2, 2, 1201, 1.0, False),
    (torch.bfloat16, 2, 1, 2500, 30.0, False), (torch.bfloat16, 4, 2, 3001, 1.0, True)],
    ids=["bf16-gqa", "fp32-two-pieces", "bf16-mqa-large-logits", "causal-unchanged"])
def test_the_first_two_pieces_together_are_exact(threaded: Client, pieces_together: list[int],
                                                 dtype: torch.dtype, hq: int, hkv: int, n: int,
                                                 magnitude: float, causal: bool) -> None:
    """cqsa.first-pieces 2 on an in-process worker: pieces of at most 700 (a row of 1,201 tokens is
    two pieces, both in the first step); the pair runs through ``compute_together`` once per
    task, except on the causal diagonal, which keeps one piece at a time."""
    inp = draw_inputs(1, hq, hkv, n, 32, dtype, magnitude=magnitude)
    print(f"inputs: {inp.ctx}")
    with dask.config.set({"cqsa.query-piece": 700, "cqsa.first-pieces": 2}):
        out, lse = cqsa_dask.attention(inp.q, inp.k, inp.v, causal=causal, return_lse=True, client=threaded,
                                       groups=1, memory_budget="1GB")
    check_exact(inp.q, inp.k, inp.v, out, lse, causal=causal, scale=None, context=inp.ctx)
    if causal:
        assert not pieces_together, pieces_together
    else:
        assert pieces_together and set(pieces_together) == {2}, pieces_together  # once per task, two pieces


@pytest.fixture(scope="module")
def threaded() -> Client:
    with LocalCluster(n_workers=1, threads_per_worker=2, processes=False, resources={"device_mem": 4e9},
                      dashboard_address=None) as cluster, Client(cluster) as c:
        yield c


def test_a_local_store_gets_the_pieces_streamed_into_the_chunk(threaded: Client, tmp_path: Path,
                                                              monkeypatch: pytest.MonkeyPatch) -> None:
    runs: list[int] = []
    real = localfiles.ChunkStream.put

    def counted(self: localfiles.ChunkStream, tokens: slice, data: np.ndarray) -> None:
        runs.append(tokens.stop - tokens.start)
        real(self, tokens, data)

    monkeypatch.setattr(localfiles.ChunkStream, "put", counted)
    inp = draw_inputs(1, 2, 2, 1000, 16, torch.float32)
    print(f"inputs: {inp.ctx}")
    with dask.config.set({"cqsa.query-piece": 300}):
        out, lse = cqsa_dask.attention(inp.q, inp.k, inp.v, causal=True, return_lse=True, client=threaded,
                                       groups=1, memory_budget="1GB", store=tmp_path / "job.zarr")
    check_exact(inp.q, inp.k, inp.v, out, lse, causal=True, scale=None, context=inp.ctx)
    assert sorted(runs) == [250] * 8, runs  # two one-head tasks (two tasks per task in flight), 4 pieces each
    assert not list((tmp_path / "job.zarr").rglob("*.tmp")), "no temporary file is left"


def test_a_store_without_chunk_files_gets_the_row_whole(threaded: Client, monkeypatch: pytest.MonkeyPatch) -> None:
    puts: list[int] = []
    real = pieces.RowPieces.put

    def counted(self: pieces.RowPieces, part: slice, out: torch.Tensor, lse: torch.Tensor) -> bool:
        assert self.stream is None, "a memory store has no chunk files to stream into"
        puts.append(part.stop - part.start)
        return real(self, part, out, lse)

    monkeypatch.setattr(pieces.RowPieces, "put", counted)
    inp = draw_inputs(1, 4, 2, 900, 16, torch.bfloat16)
    print(f"inputs: {inp.ctx}")
    with dask.config.set({"cqsa.query-piece": 400}):
        out, lse = cqsa_dask.attention(inp.q, inp.k, inp.v, causal=False, return_lse=True, client=threaded,
                                       groups=1, memory_budget="1GB", store=zarr.storage.MemoryStore())
    check_exact(inp.q, inp.k, inp.v, out, lse, causal=False, scale=None, context=inp.ctx)
    assert sorted(puts) == [300] * 6, puts  # two one-kv-head tasks, 3 pieces each


def test_a_failure_in_a_late_piece_leaves_no_part_of_the_row(threaded: Client, tmp_path: Path) -> None:
    store = tmp_path / "job.zarr"
    g = write_random_inputs(store, seq_len=1200, heads=2, head_dim=16, dtype="float32", seed=11)
    g["q"][0, 1, 1100, 3] = float("nan")  # in the last of four pieces of 300
    with dask.config.set({"cqsa.query-piece": 300, "cqsa.retries": 0}), \
            pytest.raises(JobFailedError, match=r"input q holds NaN or Inf in group 0 \(tokens 900\.\.1199"):
        cqsa_dask.run(store, client=threaded, groups=1, memory_budget="1GB")
    root = zarr.open_group(store, mode="r")
    out, engine = root["out"], root["_cqsa"]
    assert isinstance(out, zarr.Array) and out.chunks[1] == 1, "one task per head"
    assert not (store / "out" / out.metadata.encode_chunk_key((0, 1, 0, 0))).exists(), "no out chunk of head 1"
    assert not list(store.rglob("*.tmp")), "no temporary file is left"
    assert not engine["merge_done"][0, 0, 1] and not engine["task_done"][0, 0, 1], "head 1 is not marked done"


def _chunked(tmp_path: Path, shape: tuple[int, ...], chunks: tuple[int, ...]) -> zarr.Array:
    g = zarr.open_group(tmp_path / "s.zarr", mode="w", zarr_format=3)
    return g.create_array("a", shape=shape, chunks=chunks, dtype="uint16", compressors=None, fill_value=0)


def test_a_chunk_written_in_runs_is_the_chunk_written_whole(tmp_path: Path) -> None:
    arr = _chunked(tmp_path, (2, 4, 100, 8), (1, 2, 50, 8))
    io = LocalFiles(arr, Path(arr.store_path.store.root) / "a")
    rng = np.random.default_rng(3)
    data = rng.integers(0, 2**16, (2, 50, 8), dtype=np.uint16)
    stream = io.stream((1, slice(2, 4), slice(50, 100)))
    assert stream is not None
    for t0, t1 in [(30, 50), (0, 17), (17, 30)]:  # any order
        stream.put(slice(t0, t1), data[:, t0:t1])
        assert not io.exists((1, 1, 1, 0)), "nothing is seen before commit"
    stream.commit()
    streamed = io._path((1, 1, 1, 0)).read_bytes()
    assert write_whole_chunk(arr, io.root, (1, slice(2, 4), slice(50, 100)), data)
    assert streamed == io._path((1, 1, 1, 0)).read_bytes()
    assert np.array_equal(arr[1, 2:4, 50:100], data)


def test_an_aborted_stream_leaves_the_chunk_as_it_was(tmp_path: Path) -> None:
    arr = _chunked(tmp_path, (1, 2, 64, 4), (1, 2, 32, 4))
    io = LocalFiles(arr, Path(arr.store_path.store.root) / "a")
    stream = io.stream((0, slice(0, 2), slice(0, 32)))
    assert stream is not None
    stream.put(slice(0, 10), np.ones((2, 10, 4), np.uint16))
    stream.abort()
    assert not io.exists((0, 0, 0, 0)) and not list(io.root.rglob("*.tmp"))
    other = io.stream((0, slice(0, 2), slice(32, 64)))
    assert other is not None
    with pytest.raises(ValueError, match="takes"):
        other.put(slice(0, 4), np.ones((2, 5, 4), np.uint16))
    other.abort()


@pytest.mark.parametrize("index", [(0, slice(0, 1), slice(0, 32)), (0, slice(0, 2), slice(16, 48)),
                                   (0, slice(0, 2), slice(0, 64))], ids=["part-of-heads", "unaligned", "two"])
def test_only_one_whole_chunk_is_streamed(tmp_path: Path, index: tuple[object, ...]) -> None:
    arr = _chunked(tmp_path, (1, 2, 64, 4), (1, 2, 32, 4))
    assert LocalFiles(arr, Path(arr.store_path.store.root) / "a").stream(index) is None


@pytest.mark.gpu
@pytest.mark.parametrize("first", [1, 2], ids=["one-first-piece", "two-first-pieces"])
@pytest.mark.parametrize("turn", ["kernels", "streams"])
@pytest.mark.parametrize("causal", [False, True], ids=["full", "causal"])
def test_rows_in_pieces_are_exact_on_cuda(turn: str, causal: bool, first: int) -> None:
    """The cuDNN kernels on key slices (GQA, the causal diagonal cut at each piece), copied back and
    written piece by piece while the next piece computes, under either turn; with
    cqsa.first-pieces 2 the first two pieces of a full row together."""
    inp = draw_inputs(1, 4, 2, 3001, 128, torch.bfloat16)
    print(f"inputs: {inp.ctx}")
    with dask.config.set({"cqsa.query-piece": 700, "cqsa.cuda-turn": turn, "cqsa.first-pieces": first}):
        out, lse = cqsa_dask.attention(inp.q.cuda(), inp.k.cuda(), inp.v.cuda(), causal=causal, return_lse=True,
                                       memory_budget="1GB", groups=1)
    check_exact(inp.q, inp.k, inp.v, out.cpu(), lse.cpu(), causal=causal, scale=None, context=f"{turn} {inp.ctx}")
