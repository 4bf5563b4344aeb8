"""Exactness checks against float64, and the interval of a median.

Two checks, both against an independent float64 computation:

    rows   8 rows (``verify.sample_rows(group, 6, seed=1)``: 6 random + the first
           and the last) against a streaming float64 reference: the online
           softmax of ``verify.reference_row``, batched over the rows so that
           k and v are read once (at N = 1M the per-row check reads 2 GB per
           row).  Generated inputs: ``verify.check_rows`` itself.
    full   the whole out and lse against a dense float64 attention (small N),
           with SDPA's error in the same dtype as a yardstick

``median_ci``: a distribution-free interval for the median of paired ratios.
"""

from __future__ import annotations

import math
import random
from typing import Any

__all__ = ["compare_rows", "full_reference_errors", "in_memory_rows", "median_ci", "sampled_reference"]


def sampled_reference(group: Any, rows: list[tuple[int, int, int]], *, causal: bool, scale: float,
                      device: str, chunk: int = 32768) -> dict[tuple[int, int, int], tuple[Any, float]]:
    """Float64 (out (D,), lse) of ``rows``: ``tools.reference.streamed_rows`` over k, v read
    once for all rows of a batch element (at N = 1M a per-row pass reads 2 GB per row)."""
    import torch

    from cqsa_dask.store.layout import input_info, logical_dtype, read_block
    from cqsa_dask.tools.reference import streamed_rows

    info = input_info(group)
    dt = logical_dtype(group["q"])
    rep = info.heads_q // info.heads_kv
    refs: dict[tuple[int, int, int], tuple[Any, float]] = {}
    for b in sorted({r[0] for r in rows}):
        rs = [r for r in rows if r[0] == b]
        q = torch.stack([read_block(group["q"], (b, h, n), dt) for _, h, n in rs]).to(device)  # (R, D)
        kh = torch.tensor([h // rep for _, h, _ in rs], device=device)
        pos = torch.tensor([n for _, _, n in rs], device=device)
        stop = max(n for _, _, n in rs) + 1 if causal else info.seq_len
        chunks = ((c0, *(read_block(group[x], (b, slice(None), slice(c0, min(stop, c0 + chunk))), dt).to(device)
                         for x in ("k", "v"))) for c0 in range(0, stop, chunk))  # (Hkv, C, D) each
        out, lse, _, _ = streamed_rows(q, kh, pos, chunks, causal=causal, scale=scale)  # type: ignore[arg-type]
        for i, r in enumerate(rs):
            refs[r] = (out[i].cpu().numpy(), float(lse[i]))
    return refs


def compare_rows(group: Any, refs: dict[tuple[int, int, int], tuple[Any, float]]) -> dict[str, Any]:
    """Max errors of out/lse on the rows of ``refs``, as verify.check_rows reports them."""
    import numpy as np

    from cqsa_dask.store.layout import logical_dtype, read_block

    dt = logical_dtype(group["out"])
    abs_o = rel_o = abs_l = 0.0
    for (b, h, n), (ref, ref_lse) in refs.items():
        got = read_block(group["out"], (b, h, n), dt).double().numpy()
        lse = float(np.asarray(group["lse"][b, h, n]))
        err = float(np.abs(got - ref).max()) if np.isfinite(got).all() else math.inf
        abs_o = max(abs_o, err)
        rel_o = max(rel_o, err / max(float(np.abs(ref).max()), 1e-30))
        abs_l = max(abs_l, abs(lse - ref_lse) if math.isfinite(lse) else math.inf)
    return {"rows": len(refs), "max_abs_out": abs_o, "max_rel_out": rel_o, "max_abs_lse": abs_l}


def full_reference_errors(group: Any, *, causal: bool, scale: float, device: str) -> dict[str, Any]:
    """Whole-output errors of the store's out/lse, and of SDPA in the same dtype, against float64."""
    import torch
    import torch.nn.functional as F

    from cqsa_dask.store.layout import logical_dtype, read_block
    from cqsa_dask.tools.reference import reference_attention

    dt = logical_dtype(group["q"])
    q, k, v = (read_block(group[n], (...,), dt).to(device) for n in ("q", "k", "v"))  # (B, H, N, D)
    ref, ref_lse = reference_attention(q, k, v, causal, scale)
    rep = q.shape[1] // k.shape[1]
    k, v = k.repeat_interleave(rep, dim=1), v.repeat_interleave(rep, dim=1)
    out = read_block(group["out"], (...,), dt).to(device).double()
    lse = read_block(group["lse"], (...,), "float32").to(device).double()
    sdpa = F.scaled_dot_product_attention(q, k, v, is_causal=causal, scale=scale).double()

    def errs(o: Any, l: Any | None) -> dict[str, Any]:
        d = {"max_abs_out": float((o - ref).abs().max()),
             "rel_fro_out": float(torch.linalg.vector_norm(o - ref) / torch.linalg.vector_norm(ref)),
             "finite": bool(torch.isfinite(o).all())}
        if l is not None:
            d["max_abs_lse"] = float((l - ref_lse).abs().max())
        return d

    return {"cqsa": errs(out, lse), "sdpa_same_dtype": errs(sdpa, None)}


def median_ci(xs: list[float], level: float = 0.95) -> tuple[float, float] | None:
    """Distribution-free interval for the median of ``xs`` (n values, any order): the order
    statistics x_(k) and x_(n+1-k), 1-based, with the largest k for which
    P(Binomial(n, 1/2) < k) <= (1 - level) / 2, so that the interval covers the median
    with probability >= ``level`` for any continuous distribution.  None when n is too
    small (n < 6 at 95 %)."""
    n, tail = len(xs), (1 - level) / 2
    k, below = 0, 0.0  # below = P(X < k + 1) as k grows
    while k < n // 2:
        below += math.comb(n, k) / 2**n
        if below > tail:
            break
        k += 1
    if k == 0:
        return None
    v = sorted(xs)
    return v[k - 1], v[n - k]


def in_memory_rows(q: Any, k: Any, v: Any, out: Any, lse: Any, *, causal: bool, scale: float,
                   count: int = 6, seed: int = 1) -> dict[str, Any]:
    """Max errors of ``out`` (B, Hq, N, D) and ``lse`` (B, Hq, N) on ``count`` random rows plus the
    first and the last, against float64 computed from q (B, Hq, N, D), k, v (B, Hkv, N, D)."""
    import torch

    b, hq, n, _ = q.shape
    rep = hq // k.shape[1]
    rng = random.Random(seed)
    rows = {(0, 0, 0), (b - 1, hq - 1, n - 1)}
    rows |= {(rng.randrange(b), rng.randrange(hq), rng.randrange(n)) for _ in range(count)}
    abs_o = rel_o = abs_l = 0.0
    for bi, h, i in sorted(rows):
        kk, vv = k[bi, h // rep].double().cpu(), v[bi, h // rep].double().cpu()  # (N, D)
        logits = kk @ q[bi, h, i].double().cpu() * scale  # (N,)
        if causal:
            logits[i + 1:] = -math.inf
        ref_lse = torch.logsumexp(logits, 0)
        ref = torch.exp(logits - ref_lse) @ vv  # (D,)
        err = float((out[bi, h, i].double().cpu() - ref).abs().max())
        abs_o = max(abs_o, err)
        rel_o = max(rel_o, err / max(float(ref.abs().max()), 1e-30))
        abs_l = max(abs_l, abs(float(lse[bi, h, i]) - float(ref_lse)))
    return {"rows": len(rows), "max_abs_out": abs_o, "max_rel_out": rel_o, "max_abs_lse": abs_l,
            "by": "float64 rows of the in-memory inputs"}
