"""Chunk IO: the one interface through which the engine moves chunk bytes, and its chooser.

::

    chunk_io(arr) ──> LocalFiles   plain chunks of a local store: each chunk file is its C-order
         │                         elements, read with preadv, written to a temporary name and
         │                         renamed into place (localfiles.py)
         └──────> ZarrChunks       anything else (URLs, compressed or sharded arrays, Store
                                   objects): zarr's own reads and writes, listings (zarrio.py)

Operations on one array (``ChunkIO``)::

    read_rows(b, heads, tokens, dtype)   arr[b, heads, tokens] of a (B, H, N, D) array -> (H', T', D)
    write(index, data)                   arr[index] = data; one whole chunk is replaced atomically
    stream(index)                        one whole chunk written in token runs, published at commit
                                         (LocalFiles; None elsewhere: write the block whole)
    exists(coords) / delete(coords)      the chunk at grid position coords
    delete_many([coords, ...])           several chunks (one request per thousand on an object store)
    read_markers()                       a whole 0/1 marker array at once (one listing on an object store)

The choice is made by capability (what the array's store and codecs are),
never from the look of a path.  Both implementations give the same bits
for every operation (tests/test_chunkio.py runs them against each other).

Marker arrays (``task_done``, ``merge_done``) are created with the attribute
``{"cqsa_markers": "presence"}`` and written without empty chunks: writing 1
creates the chunk, writing 0 deletes it, so a listing of the chunk keys reads
every marker of an array at once.  Arrays without that attribute (jobs started
by an older engine) are read value by value.
"""

from __future__ import annotations

import sys
from collections.abc import Sequence
from pathlib import Path
from typing import Any, Protocol

import numpy as np
import torch
import zarr

__all__ = ["MARKERS_ATTR", "BlockStream", "ChunkIO", "chunk_io", "direct_root", "plain_root", "read_markers", "read_rows"]

#: Attribute of a marker array whose chunks exist exactly where the marker is 1.
MARKERS_ATTR = "cqsa_markers"

Index = tuple[Any, ...]


class BlockStream(Protocol):
    """One whole chunk (H', T, D) written in token runs; readers see it only after ``commit``."""

    def put(self, tokens: slice, data: np.ndarray) -> None:
        """Write ``data`` (H', T', D), the stored dtype, at tokens ``tokens`` of the chunk (thread-safe
        for disjoint runs)."""
        ...

    def commit(self) -> None:
        """Publish the chunk (every run must be in)."""
        ...

    def abort(self) -> None:
        """Drop what was written; the chunk is as it was."""
        ...


class ChunkIO(Protocol):
    """Chunk-level access to one zarr array (see the module docstring)."""

    #: Whether :meth:`read_rows` reads only the rows asked for (False: it decodes whole chunks).
    partial_reads: bool

    def read_rows(self, b: int, heads: slice, tokens: slice, dtype: torch.dtype, *,
                  pin: bool = False) -> torch.Tensor:
        """``arr[b, heads, tokens]`` of a (B, H, N, D) array as an (H', T', D) CPU tensor whose
        bits are the stored elements viewed as ``dtype`` (same item size); in pinned host memory
        when ``pin``."""
        ...

    def write(self, index: Index, data: np.ndarray) -> None:
        """``arr[index] = data`` (``arr``'s stored dtype); a block that is one whole chunk replaces
        it atomically (a reader never sees part of it)."""
        ...

    def stream(self, index: Index) -> BlockStream | None:
        """A writer of the one whole chunk ``index`` selects, in token runs (``BlockStream``);
        None where the chunk cannot be written that way (then write the block whole)."""
        ...

    def exists(self, coords: tuple[int, ...]) -> bool:
        """Whether the chunk at grid position ``coords`` is stored."""
        ...

    def delete(self, coords: tuple[int, ...]) -> None:
        """Delete the chunk at ``coords`` (absent: nothing to do); it then reads as the fill value."""
        ...

    def delete_many(self, coords: Sequence[tuple[int, ...]]) -> None:
        """:meth:`delete` of every chunk in ``coords``, in as few store requests as the store allows."""
        ...

    def read_markers(self) -> np.ndarray:
        """The whole array as uint8 0/1 (marker arrays: 1 = done)."""
        ...


def plain_root(arr: zarr.Array) -> Path | None:
    """The directory of ``arr``'s chunk files when each file is its chunk's C-order elements
    (a local store, zarr v3, one little-endian ``bytes`` codec, no sharding), else None."""
    try:
        from zarr.codecs import BytesCodec
        from zarr.storage import LocalStore

        store, meta = arr.store_path.store, arr.metadata
        if not isinstance(store, LocalStore) or meta.zarr_format != 3 or sys.byteorder != "little":
            return None
        codecs = tuple(meta.codecs)
        if len(codecs) != 1 or not isinstance(codecs[0], BytesCodec) or arr.shards is not None:
            return None
        endian = codecs[0].endian
        if endian is not None and getattr(endian, "value", endian) != "little":
            return None
        if not np.dtype(arr.dtype).isnative:
            return None
        path = arr.store_path.path
        return Path(store.root) / path if path else Path(store.root)
    except (ImportError, AttributeError, TypeError, ValueError):  # an unknown zarr layout: let zarr do it
        return None


def direct_root(arr: zarr.Array) -> Path | None:
    """The directory of ``arr``'s chunk files when rows can be read from them directly: a plain
    layout (:func:`plain_root`) of a 4-D array whose chunks hold whole rows of D; else None."""
    if arr.ndim != 4 or arr.chunks[3] != arr.shape[3]:
        return None
    return plain_root(arr)


def chunk_io(arr: zarr.Array) -> ChunkIO:
    """The chunk IO of ``arr``: its chunk files when they are plain and local, else zarr."""
    from cqsa_dask.store.localfiles import LocalFiles
    from cqsa_dask.store.zarrio import ZarrChunks

    root = plain_root(arr)
    return LocalFiles(arr, root) if root is not None else ZarrChunks(arr)


def read_rows(arr: zarr.Array, b: int, heads: slice, tokens: slice, dtype: torch.dtype, *,
              pin: bool = False) -> torch.Tensor | None:
    """``arr[b, heads, tokens]`` (H', T', D) read from the chunk files, only the heads asked for;
    None when the array's chunks cannot be read that way (then read it with zarr, which decodes
    whole chunks).  See :meth:`ChunkIO.read_rows`."""
    io = chunk_io(arr)
    if not io.partial_reads or np.dtype(arr.dtype).itemsize != dtype.itemsize:
        return None
    return io.read_rows(b, heads, tokens, dtype, pin=pin)


def read_markers(arr: zarr.Array) -> np.ndarray:
    """All markers of ``arr`` at once (uint8 0/1, ``arr``'s shape): see :meth:`ChunkIO.read_markers`."""
    return chunk_io(arr).read_markers()
