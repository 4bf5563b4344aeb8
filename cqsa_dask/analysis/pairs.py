"""The analysis math of one (query group a, key group b) pair, given the job's final lse.

Shape legend: hq query heads, hk kv heads (hq = rep * hk), L query tokens
(group a), S key tokens (group b), D head dim, D' >= D + 3 (``spec.feature_width``), C
block columns of group a.  Tensors carry a leading batch dimension of 1.

With P[i, j] = exp(scale q_i . k_j - lse_i) (the job's softmax, lse the
job's final row log-sum-exp), both per-token statistics are sums of
per-pair terms that need no other pair:

    entropy term   sum_{j in b} -P_ij ln P_ij = w_i (lse_i - scale q_i . o_i)
                   with (o, lse_ab) = attend(q_a, k_b, v = k_b), w_i = exp(lse_ab,i - lse_i)
    key-mass term  sum_{i in a} P_ij = exp(lse'_j)
                   with lse' the lse of the *transposed* attention: queries
                   k'_j = [k_j, 1, 1, 1, 0...], keys q'_i = [q_i, f_i, f'_i, f''_i, 0...]
                   where f + f' + f'' = -lse_i / scale (three parts, each
                   exact in the job's dtype, so a bfloat16 feature carries
                   lse to float32 precision), and the kernel's own scale: the
                   kernel's logit is scale q_i . k_j - lse_i, accumulated in float32.
    block terms    values of the transposed attention = one-hot of the query
                   block of each row i: out'_j[c] exp(lse'_j) = sum of P_ij over
                   rows i of group a in block x0 + c.

The causal diagonal pair masks j > i; transposed, query j sees keys i >= j,
which is the kernel's top-left mask after reversing both token orders.  No
pair ever materialises an L x S matrix (the kernels stream it).
"""

from __future__ import annotations

from functools import lru_cache

import torch

from cqsa_dask.kernels.attention import KERNELS, attend

__all__ = ["entropy_term", "key_features", "mass_terms", "query_features", "value_width"]

NARROW = 16  # value columns of the mass pass where the kernel takes narrow values (docs/analysis.md)


def query_features(q: torch.Tensor, lse: torch.Tensor, scale: float, width: int) -> torch.Tensor:
    """Keys of the transposed attention: q (1, hq, L, D), lse (1, hq, L) float32 -> (1, hq, L, D' = width)
    in q's dtype."""
    f = -lse.double() / scale  # (1, hq, L)
    parts = []
    for _ in range(3):  # hi, lo, lo2: each rounded to q's dtype, the rest carried on
        p = f.to(q.dtype)
        parts.append(p)
        f = f - p.double()
    pad = torch.zeros((*q.shape[:3], width - q.shape[3] - 3), dtype=q.dtype, device=q.device)
    return torch.cat([q, torch.stack(parts, dim=-1), pad], dim=-1)


def key_features(k: torch.Tensor, rep: int, width: int) -> torch.Tensor:
    """Queries of the transposed attention: k (1, hk, S, D) -> (1, hq, S, D' = width) (each kv head
    repeated ``rep`` times)."""
    ones = torch.ones((*k.shape[:3], 3), dtype=k.dtype, device=k.device)
    pad = torch.zeros((*k.shape[:3], width - k.shape[3] - 3), dtype=k.dtype, device=k.device)
    kf = torch.cat([k, ones, pad], dim=-1)  # (1, hk, S, D')
    return kf.repeat_interleave(rep, dim=1) if rep > 1 else kf


@lru_cache(maxsize=32)
def value_width(kernel: str, device: torch.device, dtype: torch.dtype, width: int) -> int:
    """Columns of the transposed attention's values: ``NARROW`` when ``kernel`` takes values narrower
    than its queries and keys (D' = ``width``) and returns the same lse, else ``width``.

    Only the lse of the mass pass matters without a block map, so narrow
    values save most of its P V product where the kernel allows them (the
    CPU kernel does not).  Probed once per (kernel, device, dtype, width).
    """
    g = torch.Generator(device="cpu").manual_seed(0)
    q, k = (torch.randn(1, 2, 32, width, generator=g).to(device, dtype) for _ in range(2))
    v = torch.randn(1, 2, 32, width, generator=g).to(device, dtype)
    try:
        _, ref = KERNELS[kernel](q, k, v, 0.1, False)
        out, lse = KERNELS[kernel](q, k, v[..., :NARROW].contiguous(), 0.1, False)
        same = out.shape[-1] == NARROW and torch.allclose(lse.float(), ref.float(), rtol=1e-5, atol=1e-5)
    except (RuntimeError, NotImplementedError):
        same = False
    return NARROW if same and NARROW < width else width


def entropy_term(q: torch.Tensor, lse: torch.Tensor, k: torch.Tensor, *, scale: float, diagonal_causal: bool,
                 kernel: str) -> torch.Tensor:
    """sum over keys j of group b of -P_ij ln P_ij, per row i: q (1, hq, L, D), lse (1, hq, L) float32,
    k (1, hk, S, D) -> (1, hq, L) float32."""
    o, lse_ab = attend(q, k, k, scale=scale, diagonal_causal=diagonal_causal, kernel=kernel)  # (1, hq, L, D)
    qo = torch.einsum("bhld,bhld->bhl", q.float(), o.float())  # (1, hq, L)
    return torch.exp(lse_ab - lse) * (lse - scale * qo)


def mass_terms(qf: torch.Tensor, kf: torch.Tensor, values: torch.Tensor, *, scale: float, diagonal_causal: bool,
               kernel: str) -> tuple[torch.Tensor, torch.Tensor]:
    """Key mass and block terms of one pair.

    Args:
        qf: (1, hq, L, D') from :func:`query_features` (the transposed attention's keys).
        kf: (1, hq, S, D') from :func:`key_features` (its queries).
        values: (1, hq, L, V) one-hot of each row's block column (zeros elsewhere), qf's dtype;
            V = ``value_width`` (D' or ``NARROW``).

    Returns:
        mass (1, hq, S) float32: sum_{i in a} P_ij; and per column c,
        (1, hq, S, V) float32: sum over rows i in block column c of P_ij.
    """
    fn = KERNELS[kernel]
    if diagonal_causal:  # keys i >= query j: reverse both orders, mask top-left, reverse back
        out, lse = fn(kf.flip(2), qf.flip(2), values.flip(2), scale, True)
        out, lse = out.flip(2), lse.float().flip(2)
    else:
        out, lse = fn(kf, qf, values, scale, False)
        lse = lse.float()
    mass = torch.exp(lse)  # (1, hq, S)
    return mass, out.float() * mass[..., None]
