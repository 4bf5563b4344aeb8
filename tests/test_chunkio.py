"""Chunk IO: the local-files implementation and the zarr implementation give the same bits.

::

    random (B, H, N, D) array, random chunk shape, written by zarr on disk
        LocalFiles.read_rows(b, heads, tokens)  ==  ZarrChunks.read_rows(...)  ==  zarr's arr[...]
    random whole-chunk (and unaligned) writes through each  ->  the two arrays hold the same bits
    exists / delete / read_markers of each agree, markers also on an in-memory store
    layouts LocalFiles must not read directly (compressor, sharding, split D) -> chosen: zarr
"""

from __future__ import annotations

import os
from pathlib import Path

import numpy as np
import pytest
import torch
import zarr
import zarr.storage
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from cqsa_dask.store.chunkio import MARKERS_ATTR, chunk_io, direct_root, read_markers, read_rows
from cqsa_dask.store.layout import array, create_array, create_markers, read_block
from cqsa_dask.store.localfiles import LocalFiles, write_whole_chunk
from cqsa_dask.store.markers import Markers
from cqsa_dask.store.zarrio import ZarrChunks

DTYPES = {"bfloat16": torch.bfloat16, "float16": torch.float16, "float32": torch.float32}
FUNCTION_SCOPED = [HealthCheck.function_scoped_fixture]


def _random_bits(shape: tuple[int, ...] | list[int], stored: np.dtype, seed: int) -> np.ndarray:
    """Any bit pattern of ``stored`` (NaNs included)."""
    bits = np.random.default_rng(seed).integers(0, 2 ** (8 * stored.itemsize), size=shape, dtype=np.uint64)
    return bits.astype(f"u{stored.itemsize}").view(stored)


def _stored(root: Path, shape: tuple[int, ...], chunks: tuple[int, ...], dtype: str, seed: int) -> zarr.Array:
    """An array written through zarr (the engine's create_array), filled with random bits."""
    g = zarr.open_group(root, mode="w")
    arr = create_array(g, "x", shape, chunks, dtype)
    arr[...] = _random_bits(shape, np.dtype(arr.dtype), seed)
    return arr


def _same_bits(a: torch.Tensor, b: torch.Tensor) -> bool:
    return a.shape == b.shape and a.dtype == b.dtype and torch.equal(a.contiguous().view(torch.uint8),
                                                                    b.contiguous().view(torch.uint8))


@settings(max_examples=40, deadline=None, suppress_health_check=FUNCTION_SCOPED)
@given(
    b_n=st.integers(1, 3), h_n=st.integers(1, 6), n=st.integers(1, 200), d=st.sampled_from([1, 8, 16]),
    cb=st.integers(1, 2), ch=st.integers(1, 4), ct=st.integers(1, 64),
    dtype=st.sampled_from(sorted(DTYPES)), data=st.data(),
)
def test_both_implementations_read_the_same_rows(tmp_path: Path, b_n: int, h_n: int, n: int, d: int, cb: int,
                                                 ch: int, ct: int, dtype: str, data: st.DataObject) -> None:
    seed = data.draw(st.integers(0, 2**32 - 1))
    arr = _stored(tmp_path / f"s{seed}.zarr", (b_n, h_n, n, d), (cb, ch, ct, d), dtype, seed)
    io = chunk_io(arr)
    assert isinstance(io, LocalFiles) and io.partial_reads and direct_root(arr) is not None
    b = data.draw(st.integers(0, b_n - 1))
    t0 = data.draw(st.integers(0, n - 1))
    t1 = data.draw(st.integers(t0 + 1, n))
    h0 = data.draw(st.integers(0, h_n - 1))
    h1 = data.draw(st.integers(h0 + 1, h_n))
    heads, tokens, want_dtype = slice(h0, h1), slice(t0, t1), DTYPES[dtype]
    local = io.read_rows(b, heads, tokens, want_dtype)
    generic = ZarrChunks(arr).read_rows(b, heads, tokens, want_dtype)
    want = read_block(arr, (b, heads, tokens), dtype)
    assert local.shape == (h1 - h0, t1 - t0, d) and local.dtype == want_dtype
    assert _same_bits(local, want) and _same_bits(generic, want)
    direct = read_rows(arr, b, heads, tokens, want_dtype)  # the direct-or-None entry of tasks.py
    assert direct is not None and _same_bits(direct, want)


def test_layouts_it_does_not_read_go_to_zarr(tmp_path: Path) -> None:
    g = zarr.open_group(tmp_path / "s.zarr", mode="w")
    shape, chunks = (1, 2, 64, 8), (1, 1, 16, 8)
    data = np.random.default_rng(1).standard_normal(shape).astype(np.float32)
    compressed = g.create_array("gz", shape=shape, chunks=chunks, dtype="float32")  # zarr's default compressor
    sharded = g.create_array("sh", shape=shape, chunks=chunks, shards=(1, 2, 32, 8), dtype="float32",
                             compressors=None)
    split_d = g.create_array("sd", shape=shape, chunks=(1, 1, 16, 4), dtype="float32", compressors=None)
    for arr in (compressed, sharded, split_d):
        arr[...] = data
        assert direct_root(arr) is None
        assert read_rows(arr, 0, slice(0, 1), slice(0, 64), torch.float32) is None
        assert not chunk_io(arr).partial_reads
        got = chunk_io(arr).read_rows(0, slice(0, 2), slice(5, 50), torch.float32)
        assert torch.equal(got, torch.from_numpy(data[0, :, 5:50]))
    plain = create_array(g, "plain", shape, chunks, "float32")
    plain[0, :, :32] = 1.5  # chunks of tokens 32..63 are never written: they read as the fill value
    io = chunk_io(plain)
    assert isinstance(io, LocalFiles)
    half = io.read_rows(0, slice(0, 2), slice(16, 48), torch.float32)  # a missing chunk file: through zarr
    assert torch.equal(half, torch.tensor([1.5] * 16 + [0.0] * 16).repeat(2, 8, 1).transpose(1, 2))
    with pytest.raises(ValueError, match="unit-step"):
        read_rows(plain, 0, slice(0, 2, 2), slice(0, 32), torch.float32)


def test_read_only_local_store_is_read_directly_and_not_written(tmp_path: Path) -> None:
    g = zarr.open_group(tmp_path / "s.zarr", mode="w")
    create_array(g, "x", (1, 2, 4, 4), (1, 1, 2, 4), "float32")[0, 0, :2] = 1.0
    ro = zarr.open_group(zarr.storage.LocalStore(tmp_path / "s.zarr", read_only=True), mode="r")["x"]
    assert isinstance(ro, zarr.Array)
    io = chunk_io(ro)
    assert isinstance(io, LocalFiles) and io.partial_reads
    assert torch.equal(io.read_rows(0, slice(0, 1), slice(0, 2), torch.float32), torch.ones(1, 2, 4))
    files = sorted(p for p in (tmp_path / "s.zarr" / "x").rglob("*") if p.is_file())
    with pytest.raises(ValueError, match="read-only"):
        io.write((0, slice(0, 1), slice(2, 4)), np.ones((1, 2, 4), np.float32))
    with pytest.raises(ValueError, match="read-only"):
        io.delete((0, 0, 0, 0))
    assert sorted(p for p in (tmp_path / "s.zarr" / "x").rglob("*") if p.is_file()) == files


@settings(max_examples=40, deadline=None, suppress_health_check=FUNCTION_SCOPED)
@given(shape=st.lists(st.integers(1, 12), min_size=1, max_size=4), dtype=st.sampled_from(sorted(DTYPES)),
       nan_fill=st.booleans(), aligned=st.booleans(), data=st.data())
def test_both_implementations_write_the_same_bits(tmp_path: Path, shape: list[int], dtype: str, nan_fill: bool,
                                                  aligned: bool, data: st.DataObject) -> None:
    """A write of one chunk (edge chunks included, some dimensions given as integers), or of an
    unaligned block, leaves the array the same through LocalFiles as through ZarrChunks, and
    exists / delete agree chunk by chunk."""
    chunks = [data.draw(st.integers(1, s)) for s in shape]
    seed = data.draw(st.integers(0, 2**32 - 1))
    g = zarr.open_group(tmp_path / f"w{seed}.zarr", mode="w")
    ours = create_array(g, "ours", tuple(shape), tuple(chunks), dtype, nan_fill=nan_fill)
    theirs = create_array(g, "theirs", tuple(shape), tuple(chunks), dtype, nan_fill=nan_fill)
    local, generic = chunk_io(ours), ZarrChunks(theirs)
    assert isinstance(local, LocalFiles)
    index: list[int | slice] = []
    for s, c in zip(shape, chunks, strict=True):
        if aligned:
            start = c * data.draw(st.integers(0, (s - 1) // c))
            stop = min(s, start + c)
        else:
            start = data.draw(st.integers(0, s - 1))
            stop = data.draw(st.integers(start + 1, s))
        index.append(start if stop - start == 1 and data.draw(st.booleans()) else slice(start, stop))
    stored = np.dtype(ours.dtype)
    block = _random_bits([i.stop - i.start for i in index if isinstance(i, slice)], stored, seed)
    local.write(tuple(index), block)
    generic.write(tuple(index), block)
    view = f"u{stored.itemsize}"
    assert np.array_equal(np.asarray(ours[...]).view(view), np.asarray(theirs[...]).view(view))
    grid = [range(-(-s // c)) for s, c in zip(shape, chunks, strict=True)]
    cells = [tuple(x) for x in np.stack(np.meshgrid(*grid, indexing="ij"), -1).reshape(-1, len(shape))]
    assert [local.exists(c) for c in cells] == [generic.exists(c) for c in cells]
    assert any(local.exists(c) for c in cells)
    for c in cells:
        local.delete(c)
        generic.delete(c)
        local.delete(c)  # a second delete: nothing to do
    assert not any(local.exists(c) or generic.exists(c) for c in cells)
    assert np.array_equal(np.asarray(ours[...]).view(view), np.asarray(theirs[...]).view(view))
    assert not [p for p in (tmp_path / f"w{seed}.zarr").rglob("*.tmp")], "no temporary file is left"


def test_whole_chunk_writes_it_does_not_make(tmp_path: Path) -> None:
    g = zarr.open_group(tmp_path / "s.zarr", mode="w")
    plain = create_array(g, "plain", (2, 64), (1, 16), "float32")
    root = direct_root(plain) or tmp_path / "s.zarr" / "plain"
    block = np.ones((16,), np.float32)
    assert not write_whole_chunk(plain, root, (0, slice(8, 24)), block), "not aligned to a chunk"
    assert not write_whole_chunk(plain, root, (0, slice(0, 32)), np.ones((32,), np.float32)), "two chunks"
    assert not write_whole_chunk(plain, root, (0, slice(0, 16)), block.astype(np.float64)), "another dtype"
    assert not write_whole_chunk(plain, root, (0, slice(0, 16)), np.ones((1, 16), np.float32)), "another shape"
    assert not write_whole_chunk(plain, root, (0, slice(64, 64)), np.ones((0,), np.float32)), "empty selection"
    assert write_whole_chunk(plain, root, (1, slice(48, 64)), block)
    assert np.array_equal(np.asarray(plain[1]), np.r_[np.zeros(48), np.ones(16)].astype(np.float32))


def test_a_failed_chunk_write_leaves_the_old_chunk_and_no_temporary_file(tmp_path: Path,
                                                                        monkeypatch: pytest.MonkeyPatch) -> None:
    g = zarr.open_group(tmp_path / "s.zarr", mode="w")
    arr = create_array(g, "x", (2, 8), (1, 8), "float32")
    io = chunk_io(arr)
    io.write((0, slice(0, 8)), np.arange(8, dtype=np.float32))
    names: list[str] = []

    def fail(src: str | os.PathLike[str], dst: str | os.PathLike[str]) -> None:
        names.append(os.path.basename(src))
        raise OSError(28, "No space left on device")

    monkeypatch.setattr(os, "replace", fail)
    with pytest.raises(OSError, match="No space"):
        io.write((0, slice(0, 8)), np.full(8, 7, np.float32))
    monkeypatch.undo()
    assert np.array_equal(np.asarray(arr[0]), np.arange(8, dtype=np.float32))
    assert not list((tmp_path / "s.zarr").rglob("*.tmp"))
    # a temporary name is a random UUID: unique across hosts, processes and threads, not a pid
    (name,) = names
    assert name.startswith(".0.") and name.endswith(".tmp") and len(name.split(".")[2]) == 32
    assert str(os.getpid()) not in name


def _marker_cases(seed: int, shape: tuple[int, int, int]) -> tuple[np.ndarray, np.ndarray]:
    rng = np.random.default_rng(seed)
    return rng.random(shape) < 0.5, rng.random(shape) < 0.3  # set, then cleared again


@settings(max_examples=15, deadline=None, suppress_health_check=FUNCTION_SCOPED)
@given(shape=st.tuples(st.integers(1, 6), st.integers(1, 3), st.integers(1, 3)), seed=st.integers(0, 2**32 - 1),
       presence=st.booleans())
def test_markers_in_bulk_are_the_markers(tmp_path: Path, shape: tuple[int, int, int], seed: int,
                                         presence: bool) -> None:
    """Markers set and cleared one by one (through ``Markers``, as tasks do) read back one by one
    and in bulk identically from the
    chunk files, through zarr on disk and through zarr in memory; old-style marker arrays (no
    presence attribute: a cleared marker is a stored 0) too."""
    set_, cleared = _marker_cases(seed, shape)
    want = (set_ & ~cleared).astype(np.uint8)
    arrays = []
    for store in (zarr.storage.LocalStore(tmp_path / f"m{seed}-{presence}.zarr"), zarr.storage.MemoryStore()):
        g = zarr.open_group(store, mode="w")
        if presence:
            create_markers(g, "task_done", shape)
        else:
            create_array(g, "task_done", shape, (1, 1, 1), "uint8")
        arr = array(g, "task_done")
        cells = Markers(arr)  # written as the tasks write them (presence markers: by chunk IO)
        for c in zip(*np.nonzero(set_)):
            cells[c] = 1
        for c in zip(*np.nonzero(set_ & cleared)):
            cells[c] = 0
        assert all(cells[c] == want[c] for c in np.ndindex(*shape))
        arrays.append(arr)
    on_disk, in_memory = arrays
    assert isinstance(chunk_io(on_disk), LocalFiles) and isinstance(chunk_io(in_memory), ZarrChunks)
    for got in (read_markers(on_disk), ZarrChunks(on_disk).read_markers(), read_markers(in_memory)):
        assert got.dtype == np.uint8 and np.array_equal(got, want)
    # presence markers: a chunk exists exactly where the marker is 1
    n_chunks = sum(1 for p in (tmp_path / f"m{seed}-{presence}.zarr" / "task_done").rglob("*")
                   if p.is_file() and p.name != "zarr.json")
    assert n_chunks == (int(want.sum()) if presence else int(set_.sum()))


def test_presence_markers_are_read_with_one_listing() -> None:
    """One list request per marker array, no chunk reads: resume on an object store does not
    pay a request per task."""
    inner = zarr.storage.MemoryStore()
    g = zarr.open_group(inner, mode="w")
    arr = create_markers(g, "merge_done", (40, 2, 3))
    assert arr.attrs[MARKERS_ATTR] == "presence"
    arr[3, 1, 2] = 1
    arr[39, 0, 0] = 1
    reopened = array(zarr.open_group(zarr.storage.LoggingStore(inner), mode="r"), "merge_done")
    logged = reopened.store_path.store  # (opening read-only made a new LoggingStore)
    assert isinstance(logged, zarr.storage.LoggingStore)
    logged.counter.clear()
    got = read_markers(reopened)
    assert np.argwhere(got).tolist() == [[3, 1, 2], [39, 0, 0]]
    assert logged.counter.get("list_prefix") == 1, dict(logged.counter)
    assert not logged.counter.get("get"), f"markers were read chunk by chunk: {dict(logged.counter)}"


@pytest.mark.parametrize("encoding", [{"name": "v2", "separator": "."}, {"name": "v2", "separator": "/"},
                                      {"name": "default", "separator": "."}], ids=["v2-dot", "v2-slash", "dot"])
def test_other_chunk_key_encodings_are_read_directly(tmp_path: Path, encoding: dict[str, str]) -> None:
    """Uncompressed arrays whose chunk keys zarr writes another way (e.g. a migrated v2 store's
    ``0.1.2.0``) are read from their files, the same values as zarr reads."""
    g = zarr.open_group(tmp_path / "s.zarr", mode="w")
    shape = (2, 2, 64, 8)
    data = np.random.default_rng().standard_normal(shape).astype(np.float32)
    arr = g.create_array("a", shape=shape, chunks=(1, 1, 16, 8), dtype="float32", compressors=None,
                         chunk_key_encoding=encoding)
    arr[...] = data
    io = chunk_io(arr)
    assert isinstance(io, LocalFiles) and direct_root(arr) is not None
    got = io.read_rows(1, slice(0, 2), slice(5, 50), torch.float32)
    assert torch.equal(got, torch.from_numpy(data[1, :, 5:50]))
