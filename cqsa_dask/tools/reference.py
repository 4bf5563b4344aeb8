"""The float64 reference of attention, in one place: what every exactness check compares with.

Written from the definition of attention in float64, sharing no code with
the engine (no kernel, no merge, no store)::

    lse[b, h, i] = logsumexp_j (scale * q[b, h, i] . k[b, h // rep, j])   j <= i when causal
    out[b, h, i] = sum_j exp(scale * q . k_j - lse) v[b, h // rep, j]      rep = Hq // Hkv

Two forms of the same formula:

- ``reference_attention``: whole (small) tensors at once, one batch
  element's (Hq, N, N) logits at a time; tests and small benchmarks.
- ``streamed_rows``: query rows over keys streamed in chunks with an online
  softmax (running max, rescaled sums), on any device, so a row of a
  billion-token job needs O(chunk * D) memory; the benchmarks' sampled rows,
  and through ``streamed_reference`` (one row of a store) ``cqsa verify``.
"""

from __future__ import annotations

import math
from collections.abc import Iterable, Iterator
from dataclasses import dataclass
from typing import Protocol

import numpy as np
import torch

__all__ = ["STREAM_CHUNK", "Reference", "RowInputs", "reference_attention", "streamed_reference", "streamed_rows"]

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
            keep = torch.ones(n, n, dtype=torch.bool, device=q.device).tril()  # keep[i, j] = j <= i
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


def streamed_rows(q: torch.Tensor, kv_heads: torch.Tensor, positions: torch.Tensor,
                  chunks: Iterable[tuple[int, torch.Tensor, torch.Tensor]], *, causal: bool, scale: float
                  ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """Float64 attention of R query rows over keys streamed in chunks (online softmax).

    Args:
        q: (R, D) the query rows; kv_heads: (R,) the kv head each row reads;
            positions: (R,) each row's token (causal: keys j <= position).
        chunks: (c0, k, v) in token order from key 0, k and v (Hkv, C, D) holding
            keys c0 .. c0 + C - 1, on q's device; any dtype (computed in float64).
        causal, scale: the mask and the softmax scale.

    Returns:
        out (R, D), lse (R,), and the scales of a row's tolerance: v_max (R,),
        the largest |v| entry, and k_max (R,), the largest |k_j|, over the keys
        the row attends to; all float64.
    """
    q = q.double()
    r, d = q.shape
    m = torch.full((r,), -math.inf, dtype=torch.float64, device=q.device)
    s, v_max, k_max = (torch.zeros(r, dtype=torch.float64, device=q.device) for _ in range(3))
    acc = torch.zeros(r, d, dtype=torch.float64, device=q.device)
    for c0, k, v in chunks:
        k, v = k.double()[kv_heads], v.double()[kv_heads]  # (R, C, D)
        logits = torch.bmm(k, q[:, :, None])[..., 0] * scale  # (R, C)
        keys = torch.arange(c0, c0 + k.shape[1], device=q.device)
        seen = keys[None, :] <= positions[:, None] if causal else torch.ones_like(logits, dtype=torch.bool)
        logits = logits.masked_fill(~seen, -math.inf)
        m_new = torch.maximum(m, logits.max(dim=1).values)
        live = torch.isfinite(m_new)  # a row with no key yet (causal) keeps its zeros
        w = torch.where(live[:, None], torch.exp(logits - m_new[:, None]), 0.0)
        corr = torch.where(torch.isfinite(m), torch.exp(m - m_new), 0.0)
        acc = acc * corr[:, None] + torch.bmm(w[:, None, :], v)[:, 0]
        s = s * corr + w.sum(dim=1)
        m = torch.where(live, m_new, m)
        zero = torch.zeros((), dtype=torch.float64, device=q.device)
        v_max = torch.maximum(v_max, torch.where(seen[..., None], v.abs(), zero).amax(dim=(1, 2)))
        k_max = torch.maximum(k_max, torch.where(seen, k.norm(dim=2), zero).amax(dim=1))
    return acc / s[:, None], m + torch.log(s), v_max, k_max


def streamed_reference(inputs: RowInputs, rep: int, seq_len: int, row: tuple[int, int, int], *, causal: bool,
                       scale: float, chunk: int = STREAM_CHUNK) -> Reference:
    """Float64 reference of ``row`` = (b, h, n), keys read from ``inputs`` in chunks (``rep`` = Hq / Hkv)."""
    b, h, n = row
    g = h // rep
    q = inputs.q_row(b, h, n)  # (D,)
    stop = n + 1 if causal else seq_len

    def chunks() -> Iterator[tuple[int, torch.Tensor, torch.Tensor]]:
        for c0 in range(0, stop, chunk):
            k, v = inputs.kv(b, g, c0, min(stop, c0 + chunk))  # (C, D) each
            yield c0, k[None], v[None]

    zero = torch.zeros(1, dtype=torch.long)
    out, lse, v_max, k_max = streamed_rows(q[None], zero, torch.tensor([n]), chunks(), causal=causal, scale=scale)
    return Reference(out[0].numpy(), float(lse[0]), float(v_max[0]), scale * float(q.norm()) * float(k_max[0]))
