"""Float64 check of sampled output rows, streaming over all keys.

For a row (b, h, n) the reference is computed in float64 with an online
softmax over key chunks, so memory stays O(chunk * D) whatever N is: no
N x N matrix anywhere.  Used by ``cqsa demo`` (and the verify command).
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np
import torch
import zarr

from .layout import array, input_info, logical_dtype, read_block

__all__ = ["RowCheck", "check_rows", "reference_row", "sample_rows"]


@dataclass(frozen=True)
class RowCheck:
    """Errors of ``out``/``lse`` against float64 on the sampled rows."""

    rows: int
    max_abs_out: float
    max_rel_out: float
    max_abs_lse: float


def reference_row(group: zarr.Group, b: int, h: int, n: int, *, causal: bool, scale: float,
                  chunk: int = 65536) -> tuple[np.ndarray, float]:
    """Float64 (out (D,), lse) of query row (b, h, n), keys streamed in chunks."""
    info = input_info(group)
    kh = h // (info.heads_q // info.heads_kv)
    dt = logical_dtype(array(group, "q"))
    q = read_block(array(group, "q"), (b, h, n), dt).double()  # (D,)
    stop = n + 1 if causal else info.seq_len
    m, s = -math.inf, 0.0
    acc = torch.zeros(info.head_dim, dtype=torch.float64)
    for c0 in range(0, stop, chunk):
        c1 = min(stop, c0 + chunk)
        k = read_block(array(group, "k"), (b, kh, slice(c0, c1)), dt).double()  # (C, D)
        v = read_block(array(group, "v"), (b, kh, slice(c0, c1)), dt).double()
        logits = (k @ q) * scale  # (C,)
        m_new = max(m, float(logits.max()))
        w = torch.exp(logits - m_new)
        corr = math.exp(m - m_new) if m > -math.inf else 0.0
        acc = acc * corr + w @ v
        s = s * corr + float(w.sum())
        m = m_new
    return (acc / s).numpy(), m + math.log(s)


def sample_rows(group: zarr.Group, count: int, seed: int = 0) -> list[tuple[int, int, int]]:
    """``count`` random (b, h, n) rows plus the first and last token."""
    info = input_info(group)
    rng = np.random.default_rng(seed)
    rows = {(0, 0, 0), (info.batch - 1, info.heads_q - 1, info.seq_len - 1)}
    while len(rows) < min(count + 2, info.batch * info.heads_q * info.seq_len):
        rows.add((int(rng.integers(info.batch)), int(rng.integers(info.heads_q)), int(rng.integers(info.seq_len))))
    return sorted(rows)


def check_rows(group: zarr.Group, rows: list[tuple[int, int, int]], *, causal: bool, scale: float) -> RowCheck:
    """Compare ``out``/``lse`` of ``group`` with float64 references on ``rows``."""
    dt = logical_dtype(array(group, "out"))
    abs_o = rel_o = abs_l = 0.0
    for b, h, n in rows:
        ref, ref_lse = reference_row(group, b, h, n, causal=causal, scale=scale)
        got = read_block(array(group, "out"), (b, h, n), dt).double().numpy()
        lse = float(np.asarray(array(group, "lse")[b, h, n]))
        err = float(np.abs(got - ref).max())
        abs_o = max(abs_o, err)
        rel_o = max(rel_o, err / max(float(np.abs(ref).max()), 1e-30))
        abs_l = max(abs_l, abs(lse - ref_lse))
    return RowCheck(len(rows), abs_o, rel_o, abs_l)
