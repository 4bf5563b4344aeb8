"""chunkio.read_rows: direct chunk-file reads give exactly what zarr reads.

::

    random (B, H, N, D) array, random chunk shape, written by zarr on disk
        read_rows(b, heads, tokens)  ==  zarr's arr[b, heads, tokens], bit for bit
    layouts it must not read (compressor, sharding, split D, missing chunk) -> None
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch
import zarr
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from cqsa_dask.store.chunkio import direct_root, read_rows, write_chunk
from cqsa_dask.store.layout import create_array, read_block

DTYPES = {"bfloat16": torch.bfloat16, "float16": torch.float16, "float32": torch.float32}


def _stored(root: Path, shape: tuple[int, ...], chunks: tuple[int, ...], dtype: str, seed: int) -> zarr.Array:
    """An array written through zarr (the engine's create_array), filled with random bits."""
    g = zarr.open_group(root, mode="w")
    arr = create_array(g, "x", shape, chunks, dtype)
    stored = np.dtype(arr.dtype)
    bits = np.random.default_rng(seed).integers(0, 2 ** (8 * stored.itemsize), size=shape, dtype=np.uint64)
    arr[...] = bits.astype(f"u{stored.itemsize}").view(stored)  # any bit pattern, NaNs included
    return arr


@settings(max_examples=40, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(
    b_n=st.integers(1, 3), h_n=st.integers(1, 6), n=st.integers(1, 200), d=st.sampled_from([1, 8, 16]),
    cb=st.integers(1, 2), ch=st.integers(1, 4), ct=st.integers(1, 64),
    dtype=st.sampled_from(sorted(DTYPES)), data=st.data(),
)
def test_direct_read_equals_zarr(tmp_path: Path, b_n: int, h_n: int, n: int, d: int, cb: int, ch: int, ct: int,
                                 dtype: str, data: st.DataObject) -> None:
    seed = data.draw(st.integers(0, 2**32 - 1))
    arr = _stored(tmp_path / f"s{seed}.zarr", (b_n, h_n, n, d), (cb, ch, ct, d), dtype, seed)
    assert direct_root(arr) is not None
    b = data.draw(st.integers(0, b_n - 1))
    t0 = data.draw(st.integers(0, n - 1))
    t1 = data.draw(st.integers(t0 + 1, n))
    h0 = data.draw(st.integers(0, h_n - 1))
    h1 = data.draw(st.integers(h0 + 1, h_n))
    got = read_rows(arr, b, slice(h0, h1), slice(t0, t1), DTYPES[dtype])
    want = read_block(arr, (b, slice(h0, h1), slice(t0, t1)), dtype)
    assert got is not None and got.shape == (h1 - h0, t1 - t0, d) and got.dtype == DTYPES[dtype]
    assert torch.equal(got.view(torch.uint8), want.contiguous().view(torch.uint8))


def test_layouts_it_does_not_read_go_to_zarr(tmp_path: Path) -> None:
    g = zarr.open_group(tmp_path / "s.zarr", mode="w")
    shape, chunks = (1, 2, 64, 8), (1, 1, 16, 8)
    compressed = g.create_array("gz", shape=shape, chunks=chunks, dtype="float32")  # zarr's default compressor
    sharded = g.create_array("sh", shape=shape, chunks=chunks, shards=(1, 2, 32, 8), dtype="float32",
                             compressors=None)
    split_d = g.create_array("sd", shape=shape, chunks=(1, 1, 16, 4), dtype="float32", compressors=None)
    for arr in (compressed, sharded, split_d):
        arr[...] = np.random.default_rng(1).standard_normal(shape).astype(np.float32)
        assert direct_root(arr) is None
        assert read_rows(arr, 0, slice(0, 1), slice(0, 64), torch.float32) is None
    plain = create_array(g, "plain", shape, chunks, "float32")
    plain[0, :, :32] = 1.5  # chunks of tokens 32..63 are never written: zarr reads them as the fill value
    assert read_rows(plain, 0, slice(0, 2), slice(0, 32), torch.float32) is not None
    assert read_rows(plain, 0, slice(0, 2), slice(16, 48), torch.float32) is None
    with pytest.raises(ValueError, match="unit-step"):
        read_rows(plain, 0, slice(0, 2, 2), slice(0, 32), torch.float32)


@settings(max_examples=40, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(shape=st.lists(st.integers(1, 12), min_size=1, max_size=4), dtype=st.sampled_from(sorted(DTYPES)),
       nan_fill=st.booleans(), data=st.data())
def test_whole_chunk_writes_read_back_through_zarr(tmp_path: Path, shape: list[int], dtype: str, nan_fill: bool,
                                                   data: st.DataObject) -> None:
    """write_chunk of one chunk (edge chunks included, some dimensions given as integers)
    leaves the array exactly as zarr's own write of the same block would."""
    chunks = [data.draw(st.integers(1, s)) for s in shape]
    seed = data.draw(st.integers(0, 2**32 - 1))
    g = zarr.open_group(tmp_path / f"w{seed}.zarr", mode="w")
    ours = create_array(g, "ours", tuple(shape), tuple(chunks), dtype, nan_fill=nan_fill)
    theirs = create_array(g, "theirs", tuple(shape), tuple(chunks), dtype, nan_fill=nan_fill)
    index: list[int | slice] = []
    for s, c in zip(shape, chunks, strict=True):
        start = c * data.draw(st.integers(0, (s - 1) // c))
        stop = min(s, start + c)
        index.append(start if stop - start == 1 and data.draw(st.booleans()) else slice(start, stop))
    stored = np.dtype(ours.dtype)
    kept = [i.stop - i.start for i in index if isinstance(i, slice)]
    bits = np.random.default_rng(seed).integers(0, 2 ** (8 * stored.itemsize), size=kept, dtype=np.uint64)
    block = bits.astype(f"u{stored.itemsize}").view(stored)
    assert write_chunk(ours, tuple(index), block)
    theirs[tuple(index)] = block
    assert np.array_equal(np.asarray(ours[...]).view(f"u{stored.itemsize}"),
                          np.asarray(theirs[...]).view(f"u{stored.itemsize}"))
    assert not [p for p in (tmp_path / f"w{seed}.zarr").rglob("*.tmp")], "no temporary file is left"


def test_writes_it_does_not_make_go_to_zarr(tmp_path: Path) -> None:
    g = zarr.open_group(tmp_path / "s.zarr", mode="w")
    plain = create_array(g, "plain", (2, 64), (1, 16), "float32")
    block = np.ones((16,), np.float32)
    assert not write_chunk(plain, (0, slice(8, 24)), block), "not aligned to a chunk"
    assert not write_chunk(plain, (0, slice(0, 32)), np.ones((32,), np.float32)), "two chunks"
    assert not write_chunk(plain, (0, slice(0, 16)), block.astype(np.float64)), "another dtype"
    assert not write_chunk(plain, (0, slice(0, 16)), np.ones((1, 16), np.float32)), "another shape"
    assert not write_chunk(plain, (0, slice(64, 64)), np.ones((0,), np.float32)), "an empty selection"
    compressed = g.create_array("gz", shape=(2, 64), chunks=(1, 16), dtype="float32")
    assert not write_chunk(compressed, (0, slice(0, 16)), block)
    assert write_chunk(plain, (1, slice(48, 64)), block)
    assert np.array_equal(np.asarray(plain[1]), np.r_[np.zeros(48), np.ones(16)].astype(np.float32))
