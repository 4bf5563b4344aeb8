"""The float64 reference of attention, in one place: what every exactness check compares with.

Written from the definition of attention in float64, sharing no code with
the engine (no kernel, no merge, no store)::

    lse[b, h, i] = logsumexp_j (scale * q[b, h, i] . k[b, h // rep, j])   j <= i when causal
    out[b, h, i] = sum_j exp(scale * q . k_j - lse) v[b, h // rep, j]      rep = Hq // Hkv

Two forms of the same formula:

- ``reference_attention``: whole (small) tensors at once, one batch
  element's (Hq, N, N) logits at a time; tests and small benchmarks.
- ``streamed_reference``: one query row over keys streamed in chunks with
  an online softmax (running max, rescaled sums), so a row of a
  billion-token job needs O(chunk * D) memory; ``cqsa verify`` and the
  benchmarks' sampled rows.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Protocol

import numpy as np
import torch

__all__ = ["STREAM_CHUNK", "Reference", "RowInputs", "reference_attention", "streamed_reference"]

STREAM_CHUNK = 65536  # keys per step of the streamed reference


def reference_attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, causal: bool,
                        scale: float | None) -> tuple[torch.Tensor, torch.Tensor]:
    """Exact softmax attention in float64.

    Args:
        q: (B, Hq, N, D); k, v: (B, Hkv, N, D), any float dtype, Hq % Hkv == 0.
        causal: key j attends to query i only when j <= i (top-left aligned).
        scale: softmax scale; None means 1 / sqrt(D).

    Returns:
        out (B, Hq, N, D) float64 and lse (B, Hq, N) float64 (natural log of
        the softmax denominator of the scaled logits).
    """
    b, hq, n, d = q.shape
    hkv = k.shape[1]
    assert hq % hkv == 0 and k.shape == v.shape == (b, hkv, n, d)
    s = 1.0 / math.sqrt(d) if scale is None else float(scale)
    rep = hq // hkv
    kk = k.double().repeat_interleave(rep, dim=1)  # (B, Hq, N, D): head h reads kv head h // rep
    vv = v.double().repeat_interleave(rep, dim=1)  # (B, Hq, N, D)
    outs, lses = [], []
    for i in range(b):  # one batch element at a time bounds the (Hq, N, N) logits
        logits = s * q[i].double() @ kk[i].transpose(-1, -2)  # (Hq, N, N)
        if causal:
            keep = torch.ones(n, n, dtype=torch.bool).tril()  # keep[i, j] = j <= i
            logits = logits.masked_fill(~keep, -math.inf)
        lse = torch.logsumexp(logits, dim=-1)  # (Hq, N)
        outs.append(torch.exp(logits - lse[..., None]) @ vv[i])  # (Hq, N, D)
        lses.append(lse)
    return torch.stack(outs), torch.stack(lses)



@dataclass(frozen=True)
class Reference:
    """Float64 result of one query row and the scales of its tolerance."""

    out: np.ndarray  # (D,) float64
    lse: float
    v_max: float  # largest |v| entry over the keys the row attends to
    logit_bound: float  # scale · |q| · max_j |k_j| over those keys


# -- the streamed reference (any inputs) ------------------------------------------------


class RowInputs(Protocol):
    """Where a streamed reference reads its inputs: one query row, chunks of keys and values."""

    def q_row(self, b: int, h: int, n: int) -> torch.Tensor: ...  # (D,) float64

    def kv(self, b: int, g: int, c0: int, c1: int) -> tuple[torch.Tensor, torch.Tensor]: ...  # (C, D) float64


def streamed_reference(inputs: RowInputs, rep: int, seq_len: int, row: tuple[int, int, int], *, causal: bool, scale: float,
                       chunk: int = STREAM_CHUNK) -> Reference:
    """Float64 reference of ``row`` with an online softmax over key chunks (``rep`` = Hq / Hkv)."""
    b, h, n = row
    g = h // rep
    q = inputs.q_row(b, h, n)  # (D,)
    stop = n + 1 if causal else seq_len
    m, s, v_max, k_max = -math.inf, 0.0, 0.0, 0.0
    acc = torch.zeros_like(q)  # (D,)
    for c0 in range(0, stop, chunk):
        k, v = inputs.kv(b, g, c0, min(stop, c0 + chunk))  # (C, D) each
        logits = (k @ q) * scale  # (C,)
        m_new = max(m, float(logits.max()))
        w = torch.exp(logits - m_new)
        corr = math.exp(m - m_new) if m > -math.inf else 0.0
        acc = acc * corr + w @ v
        s = s * corr + float(w.sum())
        m = m_new
        v_max = max(v_max, float(v.abs().max()))
        k_max = max(k_max, float(k.norm(dim=1).max()))
    return Reference((acc / s).numpy(), m + math.log(s), v_max, scale * float(q.norm()) * k_max)


