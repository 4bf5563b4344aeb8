"""Seeded random inputs written to disk: q, k, v of N(0, std^2) draws in a new Zarr store.

Used by ``cqsa demo`` and by the benchmarks.  Values are drawn block by block
(``chunk_tokens`` tokens at a time), each block from its own generator seeded
by (seed, array, batch, block), so blocks are drawn and written in parallel
threads and a large store is written without holding it in memory.
"""

from __future__ import annotations

import hashlib
import os
from collections.abc import Mapping
from concurrent.futures import ThreadPoolExecutor
from typing import Any

import torch
import zarr

from cqsa_dask.core.dtypes import parse_dtype
from cqsa_dask.store.layout import TORCH_DTYPES, create_array, write_block
from cqsa_dask.store.location import StoreLike, parse_store

__all__ = ["write_random_inputs"]



def write_random_inputs(
    path: StoreLike, *, seq_len: int, heads: int, head_dim: int, kv_heads: int | None = None,
    batch: int = 1, dtype: str = "float32", seed: int = 0, chunk_tokens: int = 8192, std: float = 1.0,
    storage_options: Mapping[str, Any] | None = None,
) -> zarr.Group:
    """Create a Zarr v3 group at ``path`` (replacing what is there; a path, a URL with
    ``storage_options`` or a zarr Store) with q (B, H, N, D), k, v (B, Hkv, N, D).

    Entries are N(0, std^2) draws; the block of tokens [t0, t0 + chunk_tokens)
    of batch b in array q, k or v comes from ``torch.Generator`` seeded with
    ``_block_seed(seed, name, b, t0)``: the same arguments give the same store.
    """
    name = parse_dtype(dtype)
    kv_heads = heads if kv_heads is None else kv_heads
    group = parse_store(path, storage_options).create_group(overwrite=True)
    blocks = []
    for arr_name, h in (("q", heads), ("k", kv_heads), ("v", kv_heads)):
        arr = create_array(group, arr_name, (batch, h, seq_len, head_dim), (1, h, chunk_tokens, head_dim), name)
        blocks += [(arr, arr_name, h, b, t0) for b in range(batch) for t0 in range(0, seq_len, chunk_tokens)]

    def write(block: tuple[zarr.Array, str, int, int, int]) -> None:
        arr, arr_name, h, b, t0 = block
        t1 = min(seq_len, t0 + chunk_tokens)
        g = torch.Generator().manual_seed(_block_seed(seed, arr_name, b, t0))
        x = torch.randn(h, t1 - t0, head_dim, generator=g) * std
        write_block(arr, (b, slice(None), slice(t0, t1)), x.to(TORCH_DTYPES[name]))

    with ThreadPoolExecutor(max_workers=min(8, os.cpu_count() or 1)) as pool:
        list(pool.map(write, blocks))
    return group


def _block_seed(seed: int, name: str, batch: int, t0: int) -> int:
    """A 63-bit seed for one block, from the store's seed and the block's place."""
    digest = hashlib.sha256(f"{seed}:{name}:{batch}:{t0}".encode()).digest()
    return int.from_bytes(digest[:8], "little") >> 1
