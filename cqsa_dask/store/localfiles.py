"""Chunk IO straight on the chunk files of a local store (the fast implementation of ``chunkio.ChunkIO``).

::

    arr[b, h0:h1, t0:t1]  ──>  one (H', T', D) tensor
        every chunk it touches, in parallel ── one pread per (chunk, head) ──> that head's rows
        (the buffer: pinned host memory when asked, so that copies to the GPU are direct)

Used only where the layout is certain (``chunkio.plain_root``: a local
store, zarr v3, a single little-endian ``bytes`` codec, no sharding), so
that a chunk's file is its C-order elements; a store opened read-only is
read here and written through zarr (which refuses).  Zarr decodes a read chunk by
chunk (each file read into a bytes object, decoded, then copied: several times
slower than plain file reads, docs/store-format.md) and only whole chunks: with chunks of all H heads, a one-head read costs H
heads.  Here each head's token run inside a chunk is one contiguous byte
range, read with ``os.preadv`` straight into the rows of the result.  A read
that touches a missing chunk file (the fill value) or an array whose chunks
split D goes through zarr.

A write of a block that is exactly one chunk goes to a temporary file named
with a random UUID (unique across processes and hosts sharing the
directory), then is renamed over the chunk: a reader never sees a partly
written chunk.  An edge chunk is padded with the fill value, as zarr pads
it.  Any other block goes through zarr, whose local store writes atomically
per chunk too.

A whole chunk can also be written in token runs (``stream``: a row that a
task computes in query pieces): each run goes into the temporary file at its
offsets as soon as it is ready, and ``commit`` renames the file over the
chunk once every run is in; ``abort`` removes it.
"""

from __future__ import annotations

import functools
import itertools
import os
import uuid
from collections.abc import Sequence
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

import numpy as np
import torch
import zarr

from cqsa_dask.store.chunkio import Index, direct_root
from cqsa_dask.store.zarrio import ZarrChunks

__all__ = ["READ_THREADS", "ChunkStream", "LocalFiles", "write_whole_chunk"]

# Threads per process reading chunk files (shared by every read of the process).
READ_THREADS = 8


@functools.cache
def _pool() -> ThreadPoolExecutor:
    """Threads that read the chunks of one call in parallel (the page faults of fresh
    buffers and the copies out of the page cache then run on several cores)."""
    return ThreadPoolExecutor(max_workers=READ_THREADS, thread_name_prefix="cqsa-chunkio")


def _span(sel: slice, size: int) -> tuple[int, int]:
    start, stop, step = sel.indices(size)
    if step != 1:
        raise ValueError("only unit-step slices are read directly")
    return start, max(start, stop)


class LocalFiles:
    """:class:`chunkio.ChunkIO` on the files under ``root``, the chunk directory of ``arr``."""

    def __init__(self, arr: zarr.Array, root: Path):
        self.arr, self.root = arr, root
        self.partial_reads = direct_root(arr) is not None
        self._zarr = ZarrChunks(arr)
        self._writable = not arr.store_path.store.read_only

    def _path(self, coords: tuple[int, ...]) -> Path:
        return self.root / self.arr.metadata.encode_chunk_key(tuple(coords))

    def read_rows(self, b: int, heads: slice, tokens: slice, dtype: torch.dtype, *,
                  pin: bool = False) -> torch.Tensor:
        if not self.partial_reads or np.dtype(self.arr.dtype).itemsize != dtype.itemsize:
            return self._zarr.read_rows(b, heads, tokens, dtype, pin=pin)
        x = self._preadv(b, heads, tokens, dtype, pin)
        return x if x is not None else self._zarr.read_rows(b, heads, tokens, dtype, pin=pin)

    def _preadv(self, b: int, heads: slice, tokens: slice, dtype: torch.dtype, pin: bool) -> torch.Tensor | None:
        """The rows read from the chunk files; None when a chunk file is missing or short."""
        arr = self.arr
        _, n_h, n_t, d = arr.shape
        cb, ch, ct, _ = arr.chunks
        h0, h1 = _span(heads, n_h)
        t0, t1 = _span(tokens, n_t)
        row = d * np.dtype(arr.dtype).itemsize  # bytes per token
        buf = torch.empty((h1 - h0) * (t1 - t0) * row, dtype=torch.uint8, pin_memory=pin)
        view = buf.numpy().data

        def chunk(c_h: int, c_t: int) -> bool:
            try:
                fd = os.open(self._path((b // cb, c_h, c_t, 0)), os.O_RDONLY)
            except FileNotFoundError:
                return False
            try:
                ta, tb = max(t0, c_t * ct), min(t1, (c_t + 1) * ct)
                want = (tb - ta) * row
                for h in range(max(h0, c_h * ch), min(h1, (c_h + 1) * ch)):
                    src = (((b % cb) * ch + h - c_h * ch) * ct + ta - c_t * ct) * row
                    dst = ((h - h0) * (t1 - t0) + ta - t0) * row
                    if os.preadv(fd, [view[dst:dst + want]], src) != want:
                        return False  # a short chunk file: not the layout assumed here
                return True
            finally:
                os.close(fd)

        coords = [(c_h, c_t) for c_h in range(h0 // ch, -(-h1 // ch)) for c_t in range(t0 // ct, -(-t1 // ct))]
        if not (chunk(*coords[0]) if len(coords) == 1 else all(_pool().map(lambda c: chunk(*c), coords))):
            return None  # (one chunk: read here, a hand-over to the pool costs more than a small read)
        return buf.view(dtype).reshape(h1 - h0, t1 - t0, d)

    def write(self, index: Index, data: np.ndarray) -> None:
        if not (self._writable and write_whole_chunk(self.arr, self.root, index, data)):
            self._zarr.write(index, data)

    def stream(self, index: Index) -> ChunkStream | None:
        """A :class:`ChunkStream` for ``index`` = (b, heads, tokens) of a 4-D array when it selects
        exactly one whole chunk (not an edge chunk) of a writable array whose chunks hold whole
        rows of D; else None."""
        arr = self.arr
        if not (self._writable and self.partial_reads and len(index) == 3):
            return None
        b, heads, tokens = index
        cb, ch, ct, _ = arr.chunks
        if cb != 1 or not isinstance(heads, slice) or not isinstance(tokens, slice):
            return None
        h0, h1 = _span(heads, arr.shape[1])
        t0, t1 = _span(tokens, arr.shape[2])
        if h0 % ch or h1 - h0 != ch or t0 % ct or t1 - t0 != ct:
            return None
        return ChunkStream(self._path((int(b), h0 // ch, t0 // ct, 0)), (ch, ct, arr.shape[3]), np.dtype(arr.dtype))

    def exists(self, coords: tuple[int, ...]) -> bool:
        return self._path(coords).is_file()

    def delete(self, coords: tuple[int, ...]) -> None:
        if not self._writable:
            self._zarr.delete(coords)  # refused by zarr
            return
        try:
            self._path(coords).unlink()
        except FileNotFoundError:
            pass

    def delete_many(self, coords: Sequence[tuple[int, ...]]) -> None:
        for c in coords:
            self.delete(c)

    def read_markers(self) -> np.ndarray:
        """Every chunk file's value (the files hold the values: exact for any marker array)."""
        arr = self.arr
        if arr.chunks != (1,) * arr.ndim or np.dtype(arr.dtype).itemsize != 1:
            return self._zarr.read_markers()
        out = np.zeros(arr.shape, np.uint8)
        for coords in itertools.product(*map(range, arr.shape)):
            try:
                raw = self._path(coords).read_bytes()
            except FileNotFoundError:
                continue
            out[coords] = raw[0] if raw else 0
        return out


def _temporary(path: Path) -> Path:
    """A new hidden name beside chunk file ``path`` (its directory made if missing), unique across
    processes and hosts sharing the directory (a random UUID), to write the chunk under before it is
    renamed over ``path``."""
    path.parent.mkdir(parents=True, exist_ok=True)
    return path.with_name(f".{path.name}.{uuid.uuid4().hex}.tmp")


def write_whole_chunk(arr: zarr.Array, root: Path, index: Index, data: np.ndarray) -> bool:
    """Write ``data`` as ``arr[index]`` straight into the chunk file under ``root`` when ``index``
    selects exactly one chunk (an edge chunk: its part inside the array); False when it does not
    (then write it with zarr).

    ``data`` has the selection's shape (the dimensions ``index`` gives as integers dropped) and
    ``arr``'s stored dtype.  The file gets the chunk's C-order bytes, an edge chunk padded with the
    fill value; it is written to a temporary name (a random UUID) and renamed over the chunk.
    """
    if np.dtype(data.dtype) != np.dtype(arr.dtype) or len(index) > arr.ndim:
        return False
    coords, region, kept = [], [], []
    for sel, size, chunk in zip((*index, *[slice(None)] * (arr.ndim - len(index))), arr.shape, arr.chunks,
                                strict=True):
        if isinstance(sel, slice):
            start, stop, step = sel.indices(size)
            kept.append(stop - start)
        else:
            start, stop, step = int(sel), int(sel) + 1, 1
        if step != 1 or stop <= start or start % chunk or (stop - start != chunk and stop != size) or stop - start > chunk:
            return False
        coords.append(start // chunk)
        region.append(slice(0, stop - start))
    if tuple(data.shape) != tuple(kept):
        return False
    if all(r.stop == c for r, c in zip(region, arr.chunks, strict=True)):
        full = np.ascontiguousarray(data)
    else:
        full = np.full(arr.chunks, arr.metadata.fill_value, dtype=np.dtype(arr.dtype))
        full[tuple(region)] = data.reshape([r.stop for r in region])
    path = root / arr.metadata.encode_chunk_key(tuple(coords))
    tmp = _temporary(path)
    try:
        with open(tmp, "wb") as f:
            f.write(full.data)
        os.replace(tmp, path)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise
    return True


class ChunkStream:
    """One whole chunk (H', T, D) of a (B, H, N, D) array written in token runs: each run straight
    into a temporary file (a random UUID beside the chunk), renamed over the chunk by ``commit``.

    ``put`` may run on several threads at once (the runs are disjoint byte ranges of the file);
    a reader never sees the chunk before ``commit``.
    """

    def __init__(self, path: Path, shape: tuple[int, int, int], dtype: np.dtype[Any]):
        self.path, self.shape, self.dtype = path, shape, dtype
        self.tmp = _temporary(path)
        self._fd: int | None = os.open(self.tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o644)
        os.ftruncate(self._fd, int(np.prod(shape)) * dtype.itemsize)

    def put(self, tokens: slice, data: np.ndarray) -> None:
        """Write ``data`` (H', t1 - t0, D) of the chunk's stored dtype at tokens [t0, t1) of the chunk."""
        h, t, d = self.shape
        t0, t1 = _span(tokens, t)
        if data.dtype != self.dtype or data.shape != (h, t1 - t0, d):
            raise ValueError(f"a run of tokens {t0}..{t1} takes ({h}, {t1 - t0}, {d}) {self.dtype}, "
                             f"got {data.shape} {data.dtype}")
        assert self._fd is not None, "the stream is closed"
        data = np.ascontiguousarray(data)
        row = d * self.dtype.itemsize
        for i in range(h):  # each head's run is one contiguous byte range of the file
            view = memoryview(data[i]).cast("B")
            off, done = (i * t + t0) * row, 0
            while done < len(view):
                done += os.pwrite(self._fd, view[done:], off + done)

    def commit(self) -> None:
        """Rename the file over the chunk: from now on readers see the whole chunk."""
        self._close()
        os.replace(self.tmp, self.path)

    def abort(self) -> None:
        """Remove the temporary file (a failed task): the chunk is as it was."""
        self._close()
        self.tmp.unlink(missing_ok=True)

    def _close(self) -> None:
        if self._fd is not None:
            os.close(self._fd)
            self._fd = None
