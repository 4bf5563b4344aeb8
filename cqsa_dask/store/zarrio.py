"""Chunk IO through zarr (the generic implementation of ``chunkio.ChunkIO``): any store, any codecs.

Reads decode whole chunks; a write of one whole chunk is a single store
``set`` (a PUT on an object store, a temporary file renamed into place on
zarr's local store), so it is atomic.  ``exists`` and ``delete`` are store
calls on the chunk's key.  ``read_markers`` of a presence-marker array
(``chunkio.MARKERS_ATTR``) is one listing of the array's keys (one request,
or one per thousand keys, on an object store) instead of one read per chunk.
"""

from __future__ import annotations

import itertools
from typing import Any

import numpy as np
import torch
import zarr
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

    def exists(self, coords: tuple[int, ...]) -> bool:
        return bool(zarr_sync(self.arr.store_path.store.exists(self._key(coords))))

    def delete(self, coords: tuple[int, ...]) -> None:
        zarr_sync(self.arr.store_path.store.delete(self._key(coords)))

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
