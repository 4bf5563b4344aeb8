"""Chunk IO through zarr (the generic implementation of ``chunkio.ChunkIO``): any store, any codecs.

Reads decode whole chunks; a write of one whole chunk is a single store
``set`` (a PUT on an object store, a temporary file renamed into place on
zarr's local store), so it is atomic.  ``exists`` and ``delete`` are store
calls on the chunk's key; ``exists`` asks for the chunk's first byte (one
ranged GET on an object store, where s3fs's own exists is a HEAD and, for
an absent key, a listing as well); ``delete_many`` of an fsspec store is one
call of its file system (s3fs: one multi-object delete per thousand keys).  ``read_markers`` of a presence-marker array
(``chunkio.MARKERS_ATTR``) is one listing of the array's keys (one request,
or one per thousand keys, on an object store) instead of one read per chunk.
"""

from __future__ import annotations

import contextlib
import itertools
from collections.abc import Sequence
from typing import Any

import numpy as np
import torch
import zarr
from zarr.abc.store import RangeByteRequest
from zarr.core.buffer import default_buffer_prototype
from zarr.core.sync import sync as zarr_sync

from cqsa_dask.store.chunkio import MARKERS_ATTR, Index

__all__ = ["ZarrChunks"]


class ZarrChunks:
    """:class:`chunkio.ChunkIO` of ``arr`` through zarr and its store's key API."""

    partial_reads = False

    def __init__(self, arr: zarr.Array):
        self.arr = arr

    def _key(self, coords: tuple[int, ...]) -> str:
        path = self.arr.store_path.path
        key = self.arr.metadata.encode_chunk_key(tuple(coords))
        return f"{path}/{key}" if path else key

    def read_rows(self, b: int, heads: slice, tokens: slice, dtype: torch.dtype, *,
                  pin: bool = False) -> torch.Tensor:
        a = np.ascontiguousarray(self.arr[b, heads, tokens])  # (H', T', D), the stored dtype
        if a.dtype.itemsize != dtype.itemsize:
            raise ValueError(f"array elements of {a.dtype.itemsize} bytes cannot be viewed as {dtype}")
        x = torch.from_numpy(a).view(dtype)
        return torch.empty(x.shape, dtype=dtype, pin_memory=True).copy_(x) if pin else x

    def write(self, index: Index, data: np.ndarray) -> None:
        self.arr[index] = data

    def stream(self, index: Index) -> None:
        """No token runs through zarr (a chunk is encoded whole): write the block whole."""

    def exists(self, coords: tuple[int, ...]) -> bool:
        store, key = self.arr.store_path.store, self._key(coords)
        try:  # one request: a store's exists() may cost more (s3fs: a HEAD, then a listing when absent)
            first = zarr_sync(store.get(key, prototype=default_buffer_prototype(), byte_range=RangeByteRequest(0, 1)))
        except OSError:  # e.g. a store that refuses ranges
            return bool(zarr_sync(store.exists(key)))
        return first is not None

    def delete(self, coords: tuple[int, ...]) -> None:
        zarr_sync(self.arr.store_path.store.delete(self._key(coords)))

    def delete_many(self, coords: Sequence[tuple[int, ...]]) -> None:
        store = self.arr.store_path.store
        fs, root = getattr(store, "fs", None), getattr(store, "path", None)
        if fs is None or root is None or not getattr(fs, "async_impl", False):
            for c in coords:
                self.delete(c)
            return
        store._check_writable()
        paths = [f"{str(root).rstrip('/')}/{self._key(c)}" for c in coords]
        if paths:  # fsspec: one call; s3fs sends one multi-object delete per thousand keys
            with contextlib.suppress(FileNotFoundError):
                zarr_sync(fs._rm(paths))

    def read_markers(self) -> np.ndarray:
        arr = self.arr
        if arr.attrs.get(MARKERS_ATTR) != "presence" or arr.chunks != (1,) * arr.ndim:
            return np.asarray(arr[...]).astype(np.uint8)  # values, chunk by chunk
        keys = {self._key(c): c for c in itertools.product(*map(range, arr.shape))}
        out = np.zeros(arr.shape, np.uint8)
        for key in zarr_sync(_listing(arr.store_path.store, arr.store_path.path)):
            coords = keys.get(key)
            if coords is not None:
                out[coords] = 1
        return out


async def _listing(store: Any, path: str) -> list[str]:
    """Every key under ``path`` (one listing of the store)."""
    return [k async for k in store.list_prefix(f"{path}/" if path else "")]
