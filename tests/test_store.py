"""``cqsa_dask.run`` on a real on-disk Zarr v3 store: what it writes, what it leaves alone, resume.

The store of every test::

    STORE/                 user's group, root attributes {"owner": "test"}
    ├── q, k, v            inputs (synthetic, random seed printed)
    ├── extra              a user's array the engine must not touch
    ├── out, lse           written by run()
    └── _cqsa/             engine state: partials, markers, stats, attributes

Files are hashed byte for byte before and after, so "untouched" means the
bytes on disk, not just the decoded values.
"""

from __future__ import annotations

import hashlib
import os
from pathlib import Path

import dask
import numpy as np
import pytest
import torch
import zarr
from conftest import partial_files
from reference import check_exact

import cqsa_dask
from cqsa_dask.store.random_inputs import write_random_inputs

B, HQ, HKV, N, D, W = 2, 4, 2, 150, 32, 7
OUTSIDE = {"zarr.json", "q", "k", "v", "extra", "out", "lse", "_cqsa"}


def tree_hash(path: Path) -> dict[str, str]:
    """SHA-256 of every file under ``path`` (or of ``path`` itself), by relative name."""
    if path.is_file():
        return {path.name: hashlib.sha256(path.read_bytes()).hexdigest()}
    return {str(p.relative_to(path)): hashlib.sha256(p.read_bytes()).hexdigest()
            for p in sorted(path.rglob("*")) if p.is_file()}


def to_torch(arr: zarr.Array) -> torch.Tensor:
    """A stored array as a tensor of its logical dtype (bfloat16 = uint16 bits + attribute)."""
    t = torch.from_numpy(np.ascontiguousarray(arr[...]))
    if arr.attrs.get("logical_dtype") == "bfloat16":
        assert arr.dtype == np.uint16
        return t.view(torch.bfloat16)
    return t


def make_store(path: Path, dtype: str = "float32") -> tuple[Path, int]:
    """A job store with q, k, v, a user's array and root attributes; returns (path, seed)."""
    seed = int.from_bytes(os.urandom(4), "little")
    print(f"store {path}: seed {seed}")
    g = write_random_inputs(path, seq_len=N, heads=HQ, kv_heads=HKV, head_dim=D, batch=B, dtype=dtype,
                             seed=seed, chunk_tokens=64)
    extra = g.create_array("extra", shape=(3, 5), chunks=(2, 2), dtype="int32")
    extra[...] = np.arange(15, dtype=np.int32).reshape(3, 5) + 1
    g.attrs["owner"] = "test"
    return path, seed


def check_store_result(path: Path, causal: bool, ctx: str) -> None:
    """out/lse in the store are exact attention of its q, k, v."""
    g = zarr.open_group(path, mode="r", zarr_format=3)
    q, k, v = (to_torch(g[n]) for n in ("q", "k", "v"))
    assert g["out"].shape == g["q"].shape and g["out"].dtype == g["q"].dtype, (g["out"].metadata, ctx)
    assert dict(g["out"].attrs).get("logical_dtype") == dict(g["q"].attrs).get("logical_dtype"), ctx
    assert g["lse"].shape == (B, HQ, N) and g["lse"].dtype == np.float32, ctx
    check_exact(q, k, v, to_torch(g["out"]), to_torch(g["lse"]), causal=causal, scale=None, context=ctx)


def marker_file(path: Path, which: str, i: int, b: int, j: int) -> Path:
    return path / "_cqsa" / which / "c" / str(i) / str(b) / str(j)


@pytest.mark.parametrize("dtype", ["float32", "bfloat16"])
def test_inputs_untouched_outputs_written(tmp_path: Path, client, dtype: str) -> None:  # type: ignore[no-untyped-def]
    path, seed = make_store(tmp_path / "job.zarr", dtype)
    ctx = f"seed {seed}"
    before = {name: tree_hash(path / name) for name in ("q", "k", "v", "extra", "zarr.json")}
    attrs = dict(zarr.open_group(path, mode="r").attrs)

    res = cqsa_dask.run(path, causal=True, memory_budget="1GB", groups=W, client=client)

    assert not res.resumed and res.plan.groups == W
    assert res.quorum_tasks_run == res.plan.tasks and res.merges_run == res.plan.merges
    after = {name: tree_hash(path / name) for name in before}
    for name, digest in before.items():
        assert after[name] == digest, f"{name} changed on disk; {ctx}"
    g = zarr.open_group(path, mode="r")
    assert dict(g.attrs) == attrs
    np.testing.assert_array_equal(g["extra"][...], np.arange(15).reshape(3, 5) + 1)
    # engine state only under _cqsa; no temporary files left behind anywhere
    assert {p.name for p in path.iterdir()} == OUTSIDE
    assert not [p for p in path.rglob("*") if p.name.endswith(".partial") or p.name.startswith(".")]
    check_store_result(path, causal=True, ctx=ctx)
    if dtype == "bfloat16":
        assert g["out"].dtype == np.uint16 and g["out"].attrs["logical_dtype"] == "bfloat16"
    assert g["_cqsa/partial_out"].dtype == np.float32  # whatever the inputs' dtype


def test_arrays_are_uncompressed(tmp_path: Path, client) -> None:  # type: ignore[no-untyped-def]
    path, _ = make_store(tmp_path / "job.zarr")
    cqsa_dask.run(path, memory_budget="1GB", groups=W, client=client)
    g = zarr.open_group(path, mode="r")
    for name in ("out", "lse", "_cqsa/partial_out", "_cqsa/partial_lse"):
        arr = g[name]
        assert arr.compressors == (), (name, arr.compressors)
        codecs = [type(c).__name__ for c in arr.metadata.codecs]
        assert codecs == ["BytesCodec"], (name, codecs)
        meta = (path / name / "zarr.json").read_text()
        assert "zstd" not in meta and "blosc" not in meta and "gzip" not in meta, meta


def test_resume_and_rerun_of_lost_markers(tmp_path: Path, client) -> None:  # type: ignore[no-untyped-def]
    r"""Second run: nothing to do.  Then the markers of a producer t of group a and of merge a are
    deleted, after the job had finished and each merge had deleted its row's partials.

    The out chunk of group a and t's partial are overwritten with finite garbage first, so a
    rerun that skipped either would leave it behind::

        task t ──(slot s)──> partial[s, b, :, group a] ──> merge a ──> out[b, :, group a]
        (marker deleted)     (garbage)                     (marker deleted)  (garbage)
        other producers of a: markers set, partials deleted by the first merge of a

    Third run: recomputes t, then merge a finds the other producers' partials gone (as after
    a partial chunk is lost: docs/reliability.md), clears their markers (all of them, in one
    attempt) and fails with a line naming them.  Fourth run: exactly those
    producers and merge a; the output is the first run's, bit for bit.
    """
    path, seed = make_store(tmp_path / "job.zarr")
    ctx = f"seed {seed}"
    kw = {"causal": False, "memory_budget": "1GB", "groups": W, "client": client}
    first = cqsa_dask.run(path, **kw)  # type: ignore[arg-type]
    outputs = {n: tree_hash(path / n) for n in ("out", "lse")}
    assert partial_files(path) == [], "a finished job keeps no partials"

    second = cqsa_dask.run(path, **kw)  # type: ignore[arg-type]
    assert second.resumed and second.quorum_tasks_run == 0 and second.merges_run == 0, second
    assert second.plan == first.plan
    assert {n: tree_hash(path / n) for n in outputs} == outputs

    plan = first.plan
    a, b, j = 3, 1, plan.head_blocks - 1
    producers = plan.producers(a)
    assert len(producers) > 1, producers  # the merge really combines several partials
    t, slot = producers[-1]
    g = zarr.open_group(path, mode="r+")
    lo, hi = plan.group_bounds(a)
    hq = slice(j * plan.q_heads_per_task, (j + 1) * plan.q_heads_per_task)
    g["out"][b, hq, lo:hi] = 123.0
    g["lse"][b, hq, lo:hi] = -7.0
    g["_cqsa/partial_out"][slot, b, hq, lo:hi] = 55.0
    for which, i in (("task_done", t), ("merge_done", a)):
        f = marker_file(path, which, i, b, j)
        assert f.is_file(), f
        f.unlink()
    assert g["_cqsa/task_done"][t, b, j] == 0 and g["_cqsa/merge_done"][a, b, j] == 0

    others = [p for p, _ in producers[:-1]]
    # merge a finds the chunks missing, clears the markers and fails at once (a damaged chunk is no
    # transient failure): the line names each producer and says what to do
    with pytest.raises(cqsa_dask.JobFailedError, match="run `cqsa resume`") as info:
        cqsa_dask.run(path, **kw)  # type: ignore[arg-type]
    for p in others:
        assert f"quorum task {p} (batch {b}, head block {j}," in str(info.value), info.value
    assert g["_cqsa/task_done"][t, b, j] == 1, "t was recomputed"
    assert [int(g["_cqsa/task_done"][p, b, j]) for p in others] == [0] * len(others)

    fourth = cqsa_dask.run(path, **kw)  # type: ignore[arg-type]
    assert fourth.resumed and fourth.quorum_tasks_run == len(others) and fourth.merges_run == 1, fourth
    assert g["_cqsa/task_done"][...].all() and g["_cqsa/merge_done"][: plan.nonempty_groups].all()
    assert {n: tree_hash(path / n) for n in outputs} == outputs, f"rerun output differs from the first; {ctx}"
    assert partial_files(path) == [], "the reruns' partials were deleted too (or, for merged rows, not written)"
    check_store_result(path, causal=False, ctx=ctx)


def test_a_merge_rerun_after_its_marker_merges_nothing(tmp_path: Path, client) -> None:  # type: ignore[no-untyped-def]
    """A merge killed after its marker, while deleting its row's partials, is run again by Dask
    (its worker died while it executed).  The rerun finds the marker: it finishes the deletion
    and returns, without reading the partials (some are gone) and without clearing the
    producers' markers; the output is untouched.  (Found by the killed-worker test: the rerun
    read the deleted partials, cleared a producer's marker and failed the job.)"""
    from cqsa_dask.execution import tasks
    from cqsa_dask.execution.options import RunOptions

    path, _ = make_store(tmp_path / "job.zarr")
    res = cqsa_dask.run(path, causal=False, memory_budget="1GB", groups=W, client=client)
    plan, a, b, j = res.plan, 3, 1, res.plan.head_blocks - 1
    producers = plan.producers(a)
    assert len(producers) > 1 and not plan.direct(a), producers
    outputs = {n: tree_hash(path / n) for n in ("out", "lse")}
    token = str(zarr.open_group(path, mode="r")["_cqsa"].attrs["token"])
    g = zarr.open_group(path, mode="r+")
    _, slot = producers[0]  # one partial left behind, as by a merge killed half-way through its deletions
    hq = slice(j * plan.q_heads_per_task, (j + 1) * plan.q_heads_per_task)
    g["_cqsa/partial_out"][slot, b, hq, slice(*plan.group_bounds(a))] = 1.0
    assert len(partial_files(path)) == 1
    rec = tasks.merge_task(str(path), token, a, b, j, RunOptions.from_config(host_cache=0))
    assert rec["bytes_read"] == 0, rec
    assert g["_cqsa/task_done"][...].all() and g["_cqsa/merge_done"][a, b, j] == 1
    assert {n: tree_hash(path / n) for n in outputs} == outputs
    assert partial_files(path) == [], "the rerun finished the deletion"


def test_other_sizing_resumes_the_stored_job(tmp_path: Path, client) -> None:  # type: ignore[no-untyped-def]
    """A job is its problem and the planner's decision (``Plan.identity``); the budget, the
    margin and tasks in flight only size one run of it.  Under other ones the stored job
    resumes with its own groups and heads per task (nothing recomputed here: it is done),
    and the store records the new sizing; naming other groups is a different job, refused
    until --restart, with the store untouched."""
    path, seed = make_store(tmp_path / "job.zarr")
    first = cqsa_dask.run(path, memory_budget="1GB", groups=W, client=client)
    outputs = {n: tree_hash(path / n) for n in ("out", "lse")}

    with dask.config.set({"cqsa.memory-margin": 1.3, "cqsa.tasks-in-flight": 2}):
        again = cqsa_dask.run(path, memory_budget="2GB", client=client)
    assert again.resumed and (again.quorum_tasks_run, again.merges_run) == (0, 0), again
    assert again.plan.identity() == first.plan.identity()
    assert (again.plan.budget_bytes, again.plan.tasks_in_flight) == (2 * 10**9, 2)
    assert zarr.open_group(path, mode="r")["_cqsa"].attrs["plan"]["budget_bytes"] == 2 * 10**9
    assert {n: tree_hash(path / n) for n in outputs} == outputs

    state = tree_hash(path)
    with pytest.raises(cqsa_dask.InvalidInputError, match=rf"different plan \(groups {W} -> {W + 1}.*restart") as info:
        cqsa_dask.run(path, groups=W + 1, client=client)
    assert isinstance(info.value, ValueError)
    assert tree_hash(path) == state, "a refused run modified the store"

    res = cqsa_dask.run(path, memory_budget="2GB", groups=W + 1, client=client, restart=True)
    assert not res.resumed and res.plan.groups == W + 1
    assert res.quorum_tasks_run == res.plan.tasks and res.merges_run == res.plan.merges
    check_store_result(path, causal=False, ctx=f"seed {seed}")


@pytest.mark.parametrize("direct", [True, False], ids=["chunk-files", "zarr"])
def test_chunk_heads_are_read_once_and_shared_by_head_blocks(tmp_path: Path, client, make_inputs,  # type: ignore[no-untyped-def]
                                                             monkeypatch, direct: bool) -> None:
    """Chunks holding every head, tasks of one head.  Through zarr (which decodes whole
    chunks: 4 x the bytes at H = 4) a task's read of a group takes all the chunk's heads
    once and the other head blocks' tasks get theirs from the host cache; read straight
    from the chunk files (chunkio), each head block reads only its own heads.  Either way
    every block read holds the stored values."""
    from cqsa_dask.execution import taskio
    from cqsa_dask.execution.hostcache import HostCache
    from cqsa_dask.execution.options import RunOptions
    from cqsa_dask.execution.partials import Cell
    from cqsa_dask.kernels.transfer import use
    from cqsa_dask.store.layout import create_outputs, open_job, read_block

    inp = make_inputs(1, 4, 2, 3000, 32, torch.float32)  # GQA: a task holds 1 kv head, 2 q heads
    store = tmp_path / "s.zarr"
    g = inp.store(store, 256)  # every head in each chunk
    res = cqsa_dask.run(store, client=client, memory_budget="3MB")
    assert res.plan.heads_per_task == 1 and res.plan.head_blocks == 2 and res.plan.groups > 5
    out = torch.from_numpy(np.asarray(g["out"][...]))
    check_exact(inp.q, inp.k, inp.v, out, torch.from_numpy(np.asarray(g["lse"][...])), causal=False,
                scale=None, context=inp.ctx)

    plan = res.plan
    create_outputs(g, plan, "tok")
    if not direct:
        monkeypatch.setattr(taskio, "read_rows", lambda *a, **k: None)
    job, opts = open_job(str(store), "tok"), RunOptions.from_config(host_cache="1GB")
    cache = HostCache(2**30)
    ios = [taskio.TaskIO(Cell(job, "tok", 0, block), opts, cache) for block in (0, 1)]
    cpu = torch.device("cpu")

    def kv(io: taskio.TaskIO) -> tuple[torch.Tensor, torch.Tensor]:
        k, v = io.kv("k", 5, cpu), io.kv("v", 5, cpu)
        return use(k), use(v)

    k0, v0 = kv(ios[0])
    q0 = use(ios[0].q(5, cpu))
    own = k0.nbytes + v0.nbytes + q0.nbytes
    assert ios[0].read == (own if direct else 2 * own), "zarr: k, v of both kv heads, q of all 4 heads"
    k1, v1 = kv(ios[1])
    q1 = use(ios[1].q(5, cpu))
    assert ios[1].read == (own if direct else 0), "zarr: the second head block comes from memory"
    ios[1].read = 0
    assert kv(ios[1])[0] is k1 and ios[1].read == 0, "a block read once is served from memory"
    rows = slice(*plan.group_bounds(5))
    for got, name, heads in ((k0, "k", slice(0, 1)), (k1, "k", slice(1, 2)), (v1, "v", slice(1, 2)),
                             (q0, "q", slice(0, 2)), (q1, "q", slice(2, 4))):
        want = read_block(g[name], (0, heads, rows), "float32")  # type: ignore[arg-type]
        assert torch.equal(got, want), name


@pytest.mark.parametrize("nan_fill", [False, True])
def test_a_written_chunk_exists_even_when_it_equals_the_fill_value(tmp_path: Path, nan_fill: bool) -> None:
    """Arrays are written with write_empty_chunks on (zarr's default compares each chunk
    with the fill value first: slow, and a chunk of fill values would then not exist)."""
    from cqsa_dask.store.layout import array, chunk_exists, create_array, write_block

    g = zarr.open_group(tmp_path / "s.zarr", mode="w")
    fill = torch.full((2, 8, 4), float("nan") if nan_fill else 0.0)
    created = create_array(g, "x", (1, 2, 16, 4), (1, 2, 8, 4), "float32", nan_fill=nan_fill)
    write_block(created, (0, slice(0, 2), slice(0, 8)), fill)
    reopened = array(zarr.open_group(tmp_path / "s.zarr"), "x")
    write_block(reopened, (0, slice(0, 2), slice(8, 16)), fill)
    assert chunk_exists(reopened, (0, 0, 0, 0)) and chunk_exists(reopened, (0, 0, 1, 0))


def test_worker_budget_is_the_advertised_resource(client) -> None:  # type: ignore[no-untyped-def]
    """What a CUDA worker caps its allocator at: the resource its Dask worker advertises."""
    from conftest import CLIENT_DEVICE_MEM, RESOURCE

    from cqsa_dask.execution.runtime import worker_budget

    assert client.submit(worker_budget, RESOURCE, pure=False).result() == CLIENT_DEVICE_MEM
    assert client.submit(worker_budget, "other_resource", pure=False).result() is None
    assert worker_budget(RESOURCE) is None  # outside a worker


def test_synthetic_store_blocks_are_seeded_by_place(tmp_path: Path) -> None:
    """write_random_inputs draws its blocks in parallel threads: the same arguments still give
    the same store, another seed another one, and no two blocks repeat each other's draws."""
    seed = int.from_bytes(os.urandom(4), "little")
    kw = {"seq_len": 700, "heads": 2, "kv_heads": 1, "head_dim": 16, "batch": 2, "dtype": "float32",
          "chunk_tokens": 64}
    a, b, c = (write_random_inputs(tmp_path / f"{i}.zarr", seed=s, **kw)  # type: ignore[arg-type]
               for i, s in enumerate((seed, seed, seed + 1)))
    for name in ("q", "k", "v"):
        x, y, z = (np.asarray(g[name][...]) for g in (a, b, c))
        assert np.array_equal(x, y), name
        # independent draws: a few equal values by chance are possible, a repeated stream is not
        assert np.mean(x == z) < 1e-3, name
        assert abs(float(x.std()) - 1.0) < 0.1 and abs(float(x.mean())) < 0.1, (name, seed)
        blocks = x.reshape(-1, 16)[: (x.size // 16) // 64 * 64].reshape(-1, 64 * 16)
        assert len({row.tobytes() for row in blocks}) == len(blocks), name
    q0, k0 = np.asarray(a["q"][0, 0, :64]), np.asarray(a["k"][0, 0, :64])
    assert np.mean(q0 == k0) < 1e-2, "q and k draw from different generators"


@pytest.mark.parametrize("where", ["local", "memory"])
def test_task_records_count_their_runs(tmp_path: Path, where: str) -> None:
    """write_stats: a record per cell, None as NaN, ``runs`` the record before it plus one, the
    other cells untouched; an older engine's array of 8 fields gets those 8 (no ``runs``)."""
    from cqsa_dask.store.layout import STAT_FIELDS, array, create_array, write_stats

    store = zarr.storage.LocalStore(tmp_path / "s.zarr") if where == "local" else zarr.storage.MemoryStore()
    g = zarr.open_group(store, mode="w")
    rng = np.random.default_rng()
    nf = len(STAT_FIELDS)
    create_array(g, "stats", (3, 2, 2, nf), (1, 1, 1, nf), "float64", nan_fill=True)
    create_array(g, "old", (3, 2, 2, 8), (1, 1, 1, 8), "float64", nan_fill=True)
    arr, old = array(g, "stats"), array(g, "old")
    cell = tuple(int(x) for x in rng.integers(0, (3, 2, 2)))
    seconds = float(rng.uniform(1, 9))
    for n in (1, 2, 3):
        write_stats(arr, cell, {"seconds": seconds * n, "peak_device_bytes": None, "worker": "tcp://w:1"})
        got = np.asarray(arr[cell])
        assert got[STAT_FIELDS.index("runs")] == n and got[STAT_FIELDS.index("seconds")] == seconds * n
        assert np.isnan(got[STAT_FIELDS.index("peak_device_bytes")])
    everything = np.asarray(arr[...])
    others = np.ones((3, 2, 2), bool)
    others[cell] = False
    assert np.isnan(everything[others]).all()
    write_stats(old, cell, {"seconds": seconds})
    assert np.asarray(old[cell])[STAT_FIELDS.index("seconds")] == seconds and old.shape[-1] == 8
