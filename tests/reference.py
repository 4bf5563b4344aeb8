"""The float64 reference every exactness check compares against, in one place.

``reference_attention`` is written from the definition of attention in plain
torch float64 and shares no code with ``cqsa_dask``::

    lse[b, h, i] = logsumexp_j (scale * q[b, h, i] . k[b, h // rep, j])   j <= i when causal
    out[b, h, i] = sum_j exp(scale * q . k_j - lse) v[b, h // rep, j]      rep = Hq // Hkv

``check_exact`` states what "exact" means for a low-precision result: its
error against float64 is no worse than a small factor times the error of
``torch.nn.functional.scaled_dot_product_attention`` on the same inputs (the
accuracy the user would get from a single fused kernel), plus a tiny floor.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch

from cqsa_dask.tools.reference import reference_attention

__all__ = ["Errors", "check_exact", "lse_tolerance", "reference_attention", "sdpa"]

# Allowed factor over SDPA's own error, and the absolute floor per dtype
# (a fraction of the dtype's rounding unit; SDPA can be exact on easy rows).
FACTOR = 4.0
_FLOOR = {torch.float32: 1e-6, torch.float16: 0.25 * 2.0**-10, torch.bfloat16: 0.25 * 2.0**-7}
# lse is float32 for every input dtype.  Measured worst |lse err| / (1 + |lse|)
# over many seeds: 5e-7 for float32; 6e-5 for float16/bfloat16, where torch's
# CPU flash kernel itself is off by ~5e-5 on causal rows (engine and kernel
# agree to the bit there).  Limits: ~3x above the worst seen.
_LSE_REL = {torch.float32: 2e-6, torch.float16: 2e-4, torch.bfloat16: 2e-4}
_EPS32 = torch.finfo(torch.float32).eps


def sdpa(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, causal: bool, scale: float | None) -> torch.Tensor:
    """torch's fused attention on the same inputs: the accuracy baseline."""
    return torch.nn.functional.scaled_dot_product_attention(q, k, v, is_causal=causal, scale=scale,
                                                            enable_gqa=True)


def lse_tolerance(q: torch.Tensor, k: torch.Tensor, scale: float | None, ref_lse: torch.Tensor) -> torch.Tensor:
    """Allowed |lse - ref| per row (B, Hq, N): relative to 1 + |lse|, plus float32 logit rounding.

    A float32 logit scale * q_i . k_j is off by up to ~eps32 * scale * |q_i| |k_j|
    whatever the kernel (cancellation in the dot product), which matters when
    that product is much larger than |lse| (large-magnitude inputs, few keys).
    """
    s = 1.0 / math.sqrt(q.shape[-1]) if scale is None else float(scale)
    rep = q.shape[1] // k.shape[1]
    qn = q.double().norm(dim=-1)  # (B, Hq, N)
    kn = k.double().norm(dim=-1).amax(dim=-1).repeat_interleave(rep, dim=1)  # (B, Hq): largest |k_j| per head
    logit_bound = s * qn * kn[..., None]
    return _LSE_REL[q.dtype] * (1.0 + ref_lse.abs()) + 4 * _EPS32 * logit_bound


@dataclass(frozen=True)
class Errors:
    """Max abs errors against float64 of the engine's and of SDPA's outputs."""

    out: float
    sdpa: float
    lse: float
    lse_allowed_ratio: float  # max over rows of |lse err| / tolerance (<= 1 passes)

    def __str__(self) -> str:
        return (f"out err {self.out:.3e} vs sdpa err {self.sdpa:.3e} (ratio {self.out / max(self.sdpa, 1e-30):.2f}); "
                f"lse err {self.lse:.3e} ({self.lse_allowed_ratio:.2f} of tolerance)")


def check_exact(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, out: torch.Tensor, lse: torch.Tensor | None,
                *, causal: bool, scale: float | None, context: str = "", extra_floor: float = 0.0) -> Errors:
    """Assert ``out`` (and ``lse`` when given) are exact attention of q, k, v.

    Checks shape, dtype, finiteness, then ``max|out - ref| <= FACTOR * max|sdpa - ref| +
    floor(dtype) + eps32 * max|ref lse| * max|v|`` (the last: float32 lse in the merge) and
    ``|lse - ref_lse| <= lse_tolerance`` on every row.  ``extra_floor`` adds
    a case-specific absolute allowance to the out bound.  ``context`` (seed,
    case) goes into every assertion message.
    """
    ref_out, ref_lse = reference_attention(q, k, v, causal, scale)
    assert out.shape == q.shape, f"out shape {tuple(out.shape)} != q shape {tuple(q.shape)}; {context}"
    assert out.dtype == q.dtype, f"out dtype {out.dtype} != q dtype {q.dtype}; {context}"
    assert torch.isfinite(out).all(), f"out has NaN/Inf; {context}"
    base = sdpa(q, k, v, causal, scale)
    err = (out.double() - ref_out).abs().max().item()
    base_err = (base.double() - ref_out).abs().max().item()
    lse_err, ratio = 0.0, 0.0
    if lse is not None:
        assert lse.shape == q.shape[:3], f"lse shape {tuple(lse.shape)} != {tuple(q.shape[:3])}; {context}"
        assert lse.dtype == torch.float32, f"lse dtype {lse.dtype} != float32; {context}"
        assert torch.isfinite(lse).all(), f"lse has NaN/Inf; {context}"
        diff = (lse.double() - ref_lse).abs()
        lse_err = diff.max().item()
        ratio = (diff / lse_tolerance(q, k, scale, ref_lse)).max().item()
    e = Errors(err, base_err, lse_err, ratio)
    # Merging partial results weighs each by exp(lse_i - lse), with every lse a float32 value (as
    # the kernels return it), so each weight carries a relative error up to ~eps32 * |lse|: on out,
    # up to eps32 * max|lse| * max|v|.  Negligible for ordinary logits (|lse| ~ log N); with logits
    # of ~1e3 (max |lse| ~ 3e3) it is ~1e-3, where one fused kernel such as SDPA can be 4x better
    # than that by luck of its own rounding (seed 4094558084 of test_large_logits[fp32-causal]).
    merge_allowance = _EPS32 * ref_lse.abs().max().item() * v.double().abs().max().item()
    bound = FACTOR * base_err + _FLOOR[q.dtype] + merge_allowance + extra_floor
    assert err <= bound, f"out not exact: {e}; bound {bound:.3e}; {context}"
    assert ratio <= 1.0, f"lse not exact: {e}; {context}"
    return e
