"""The fused analysis kernel: one pass over each score tile, reduced by rows and by columns.

Shape legend: hq query heads, hk kv heads (hq = rep * hk), L query tokens
(group a), S key tokens (group b), D head dim; tensors carry a leading batch
dimension of 1.

With the job's final lse known, P[i, j] = exp(scale q_i . k_j - lse_i) is
final, and both statistics of a pair are plain sums over its tiles::

    for each tile of BLOCK_M queries x BLOCK_N keys (one Triton program per query block and head):
        t = (scale q k^T - lse) / ln 2             (float32; tl.dot accumulates in float32)
        P = 2^t
        entropy_i += -ln 2 sum_j P_ij t_ij          (rows: in registers, stored once)
        mass_j    += sum_i P_ij                      (columns: one atomic add per key and tile)

One Q K^T product per pair and no P V product: about half the FLOPs of the
job's kernel, against two full attention calls for the unfused pass
(``pairs.py``).  No L x S matrix is formed.  P is never rounded to the
inputs' dtype, so bfloat16 jobs get float32-exact entropy too.

Rows past L get lse = 1e30 and columns past S (and j > i on the causal
diagonal) t = -1e30: their P is exactly 0 and P t is -0, never NaN.  Key
blocks are visited from a different start per program, so concurrent
programs rarely add to the same columns at once.

Triton compiles the kernel for CUDA; on the CPU it runs only under Triton's
interpreter (``TRITON_INTERPRET=1``, set before triton is imported): how the
tests check the kernel's logic on machines without a GPU.
"""

from __future__ import annotations

import contextlib
import functools
import math
import os
import threading
from typing import Any

import torch

__all__ = ["FusedUnavailable", "fused_available", "fused_fits", "fused_terms"]

LOG2E = 1.4426950408889634
LN2 = 0.6931471805599453

# Tile shape and launch settings on CUDA (bfloat16/float16, D <= 128): measured on an H200,
# docs/analysis.md "Fused kernel".  float32 inputs use the IEEE product (TF32 would round
# logits by ~1e-3 relative), in smaller tiles.
CUDA_CONFIG = {"BLOCK_M": 256, "BLOCK_N": 64, "num_warps": 4, "num_stages": 3}
CUDA_CONFIG_FP32 = {"BLOCK_M": 64, "BLOCK_N": 32, "num_warps": 4, "num_stages": 2}
INTERPRETER_CONFIG = {"BLOCK_M": 32, "BLOCK_N": 16}
# Element offsets inside one launch stay below this (Triton forms them in 32-bit integers).
OFFSET_LIMIT = 2**31 - 2**24

# Triton's interpreter patches triton.language while a kernel runs: one launch at a time there.
_INTERPRETER_LOCK = threading.Lock()


class FusedUnavailable(RuntimeError):
    """The fused kernel cannot run here (no Triton, or a CPU device outside Triton's interpreter)."""


def _interpreting() -> bool:
    return os.environ.get("TRITON_INTERPRET", "0") not in ("", "0")


@functools.cache
def _kernel() -> Any:
    """The Triton kernel, compiled on first use (importing triton costs about a second)."""
    try:
        import triton
        import triton.language as tl
    except ImportError as e:  # pragma: no cover - depends on the environment
        raise FusedUnavailable(f"the fused analysis kernel needs triton ({e})") from e

    @triton.jit
    def pair_kernel(Q, K, LSE, ENT, MASS, sq_h, sq_l, sk_h, sk_s, L, S, rep, c2,
                    CAUSAL: tl.constexpr, D: tl.constexpr, BLOCK_D: tl.constexpr,
                    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, PRECISION: tl.constexpr,
                    UPCAST: tl.constexpr):
        pid_m = tl.program_id(0)
        h = tl.program_id(1)
        offs_m = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
        offs_n = tl.arange(0, BLOCK_N)
        offs_d = tl.arange(0, BLOCK_D)
        d_ok = offs_d < D
        row_ok = offs_m < L
        q = tl.load(Q + h * sq_h + offs_m[:, None] * sq_l + offs_d[None, :],
                    mask=row_ok[:, None] & d_ok[None, :], other=0.0)
        if UPCAST:  # Triton's interpreter multiplies bfloat16 wrongly; float32 products of them are exact
            q = q.to(tl.float32)
        l2 = tl.load(LSE + h * L + offs_m, mask=row_ok, other=1e30) * 1.4426950408889634
        k_base = K + (h // rep) * sk_h
        mass_base = MASS + h * S
        ent = tl.zeros([BLOCK_M], dtype=tl.float32)
        if CAUSAL:  # keys j <= i: whole blocks below this query block, then the diagonal ones
            full = (pid_m * BLOCK_M) // BLOCK_N
            hi = tl.minimum(S, (pid_m + 1) * BLOCK_M)
        else:
            full = S // BLOCK_N
            hi = S
        for it in range(full):
            start_n = ((it + pid_m) % full) * BLOCK_N
            cols = start_n + offs_n
            k = tl.load(k_base + cols[:, None] * sk_s + offs_d[None, :], mask=d_ok[None, :], other=0.0)
            if UPCAST:
                k = k.to(tl.float32)
            t = tl.dot(q, tl.trans(k), input_precision=PRECISION) * c2 - l2[:, None]
            p = tl.math.exp2(t)
            ent += tl.sum(p * t, axis=1)
            tl.atomic_add(mass_base + cols, tl.sum(p, axis=0), sem="relaxed")
        for start_n in range(full * BLOCK_N, hi, BLOCK_N):
            cols = start_n + offs_n
            col_ok = cols < S
            k = tl.load(k_base + cols[:, None] * sk_s + offs_d[None, :], mask=col_ok[:, None] & d_ok[None, :],
                        other=0.0)
            if UPCAST:
                k = k.to(tl.float32)
            t = tl.dot(q, tl.trans(k), input_precision=PRECISION) * c2 - l2[:, None]
            ok = col_ok[None, :]
            if CAUSAL:
                ok = ok & (cols[None, :] <= offs_m[:, None])
            t = tl.where(ok, t, -1e30)
            p = tl.math.exp2(t)
            ent += tl.sum(p * t, axis=1)
            tl.atomic_add(mass_base + cols, tl.sum(p, axis=0), mask=col_ok, sem="relaxed")
        tl.store(ENT + h * L + offs_m, ent * -0.6931471805599453, mask=row_ok)

    return pair_kernel


def fused_available(device: torch.device) -> bool:
    """Whether :func:`fused_terms` can run on ``device``: CUDA with triton, or Triton's interpreter."""
    if device.type != "cuda" and not _interpreting():
        return False
    try:
        _kernel()
    except FusedUnavailable:
        return False
    return True


def _kv_heads_per_launch(rep: int, n_q: int, n_k: int, d: int, block_m: int) -> int:
    """KV heads per launch so that every element offset the kernel forms (head x rows x D, rows
    padded to the tile) stays below ``OFFSET_LIMIT`` (Triton computes them in 32 bits)."""
    rows = max(-(-n_q // block_m) * block_m, n_k + 1024)
    return max(1, OFFSET_LIMIT // (rep * rows * max(d, 16)))


def fused_fits(q: torch.Tensor, k: torch.Tensor) -> bool:
    """Whether the pair q (1, hq, L, D), k (1, hk, S, D) fits the kernel's 32-bit offsets with one kv head
    (and its query heads) per launch; larger pairs take the attention calls."""
    rep, d = q.shape[1] // k.shape[1], q.shape[3]
    return rep * (max(q.shape[2], k.shape[2]) + 1024) * max(d, 16) < OFFSET_LIMIT


def _config(q: torch.Tensor) -> dict[str, Any]:
    if q.device.type != "cuda":
        return dict(INTERPRETER_CONFIG)
    return dict(CUDA_CONFIG_FP32 if q.dtype == torch.float32 else CUDA_CONFIG)


def fused_terms(q: torch.Tensor, lse: torch.Tensor, k: torch.Tensor, *, scale: float, diagonal_causal: bool,
                config: dict[str, Any] | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """Entropy and key-mass terms of one (query group, key group) pair in one pass.

    Args:
        q: (1, hq, L, D) queries of group a (bfloat16, float16 or float32).
        lse: (1, hq, L) float32, the job's final row log-sum-exp of those queries.
        k: (1, hk, S, D) keys of group b, q's dtype; hq = rep * hk (GQA: head h reads kv head h // rep).
        scale: the job's logit scale.
        diagonal_causal: the causal diagonal pair (a == b, so L == S): keys j <= i only.
        config: tile and launch settings (default: by device and dtype, see ``CUDA_CONFIG``).

    Returns:
        entropy (1, hq, L) float32: sum over keys j of b of -P_ij ln P_ij;
        mass (1, hq, S) float32: sum over queries i of a of P_ij.
    """
    if not fused_available(q.device):
        raise FusedUnavailable(f"the fused analysis kernel does not run on {q.device.type} "
                               "(CUDA with triton, or TRITON_INTERPRET=1 for tests)")
    _, hq, n_q, d = q.shape
    hk, n_k = k.shape[1], k.shape[2]
    if diagonal_causal and n_q != n_k:
        raise ValueError(f"the causal diagonal pair has as many keys as queries, got {n_q} and {n_k}")
    q3, k3 = q[0].contiguous(), k[0].to(q.dtype).contiguous()  # (hq, L, D), (hk, S, D)
    lse2 = lse[0].float().contiguous()  # (hq, L)
    ent = torch.empty((hq, n_q), dtype=torch.float32, device=q.device)
    mass = torch.zeros((hq, n_k), dtype=torch.float32, device=q.device)
    cfg = {**_config(q), **(config or {})}
    bm = cfg.pop("BLOCK_M")
    rep = hq // hk
    if not fused_fits(q, k):
        raise ValueError(f"a pair of {n_q} x {n_k} tokens, {rep} query heads per kv head and D = {d} exceeds the "
                         "fused kernel's 32-bit offsets (use_fused checks this first)")
    if n_q and n_k:
        per = _kv_heads_per_launch(rep, n_q, n_k, d, bm)
        for g0 in range(0, hk, per):  # each launch's offsets stay below 2^31 (views: no copies)
            g1 = min(hk, g0 + per)
            qs, ks = q3[g0 * rep:g1 * rep], k3[g0:g1]
            grid = (math.ceil(n_q / bm), qs.shape[0])
            with _INTERPRETER_LOCK if q.device.type != "cuda" else contextlib.nullcontext():
                _kernel()[grid](qs, ks, lse2[g0 * rep:g1 * rep], ent[g0 * rep:g1 * rep], mass[g0 * rep:g1 * rep],
                                qs.stride(0), qs.stride(1), ks.stride(0), ks.stride(1),
                                n_q, n_k, rep, scale * LOG2E, CAUSAL=diagonal_causal, D=d,
                                BLOCK_D=max(16, 1 << (d - 1).bit_length()), BLOCK_M=bm,
                                PRECISION="ieee" if q.dtype == torch.float32 else "tf32",
                                UPCAST=q.device.type != "cuda", **cfg)
    else:
        ent.zero_()
    return ent[None], mass[None]
