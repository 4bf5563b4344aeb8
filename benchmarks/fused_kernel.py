"""The fused analysis kernel on the GPU: its tile settings, its speed against the job's kernel, its error.

    python -m benchmarks.fused_kernel [--out FILE.json]

For each tile setting (BLOCK_M, BLOCK_N, num_warps, num_stages) the median
seconds of 3 calls of ``fused_terms`` on one pair of 64K x 64K tokens, 4
heads, bfloat16, D = 128; then, with the best setting and the default one,
the pair of a 4M, 4 GB job's task (322,639 tokens, 1 head) plain and on the
causal diagonal; against the job's kernel (``attend``, cuDNN) on the same
shapes and the unfused analysis (``pairs.entropy_term`` + ``pairs.mass_terms``).
Errors against float64 on a 4K x 6K pair (GQA) and a 4K causal diagonal.
TFLOP/s count 2 L S D H (the one Q K^T product; the job's kernel: 4 L S D H).
CUDA only.
"""

from __future__ import annotations

import argparse
import functools
import json
from typing import Any

import torch

from benchmarks import environment
from benchmarks.kernel_sizes import median_seconds
from cqsa_dask.analysis import fused
from cqsa_dask.analysis.pairs import entropy_term, key_features, mass_terms, query_features, value_width
from cqsa_dask.analysis.spec import feature_width
from cqsa_dask.kernels.attention import attend, select_kernel

K = 1024
SETTINGS = [  # BLOCK_M, BLOCK_N, num_warps, num_stages
    (128, 64, 8, 3), (128, 64, 8, 4), (128, 64, 4, 3), (128, 128, 8, 3), (128, 128, 8, 2), (128, 32, 8, 3),
    (64, 64, 4, 3), (64, 128, 4, 3), (64, 64, 4, 4), (128, 128, 4, 3), (256, 64, 8, 3), (64, 32, 4, 3),
    (128, 64, 4, 2), (128, 64, 4, 4), (128, 32, 4, 3), (256, 64, 4, 3), (256, 32, 8, 3), (128, 64, 2, 3),
]


def _inputs(L: int, S: int, hq: int, hk: int, d: int = 128, causal: bool = False
            ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, float]:
    """q (1, hq, L, d), lse (1, hq, L) = the pair's own lse (computed in float32 by the job's kernel), k."""
    dev, dt = torch.device("cuda"), torch.bfloat16
    q = torch.randn(1, hq, L, d, device=dev, dtype=dt)
    k = torch.randn(1, hk, S, d, device=dev, dtype=dt)
    scale = d**-0.5
    kernel = select_kernel(dev, dt, d)
    _, lse = attend(q, k, k, scale=scale, diagonal_causal=causal, kernel=kernel)
    return q, lse.float(), k, scale


def _config(s: tuple[int, int, int, int]) -> dict[str, int]:
    return {"BLOCK_M": s[0], "BLOCK_N": s[1], "num_warps": s[2], "num_stages": s[3]}


def _error(L: int, S: int, hq: int, hk: int, causal: bool) -> dict[str, Any]:
    q, lse, k, scale = _inputs(L, S, hq, hk, causal=causal)
    ent, mass = fused.fused_terms(q, lse, k, scale=scale, diagonal_causal=causal)
    kk = k.double().repeat_interleave(hq // hk, 1)
    s = torch.einsum("bhld,bhsd->bhls", q.double(), kk) * scale
    p = torch.exp(s - lse.double()[..., None])
    if causal:
        p = p * torch.ones(L, S, dtype=torch.bool, device=p.device).tril()
    ent_ref = -torch.where(p > 0, p * torch.log(torch.where(p > 0, p, 1.0)), 0.0).sum(-1)
    mass_ref = p.sum(-2)
    return {"L": L, "S": S, "hq": hq, "hk": hk, "causal": causal,
            "mass_rel_err": float(((mass.double() - mass_ref).abs() / mass_ref.abs()).max()),
            "entropy_rel_err_floor_1nat": float(((ent.double() - ent_ref).abs() / ent_ref.abs().clamp_min(1.0)).max())}


def _unfused(q: torch.Tensor, lse: torch.Tensor, k: torch.Tensor, scale: float, causal: bool) -> None:
    """The attention-call analysis of one pair as the task runs it (entropy in bf16, mass on D' features)."""
    dev, dt, d = q.device, q.dtype, q.shape[-1]
    width = feature_width("cuda", d)
    mk = select_kernel(dev, dt, width)
    v = value_width(mk, dev, dt, width)
    entropy_term(q, lse, k, scale=scale, diagonal_causal=causal, kernel=select_kernel(dev, dt, d))
    qf = query_features(q, lse, scale, width)
    kf = key_features(k, q.shape[1] // k.shape[1], width)
    values = qf.new_zeros((*qf.shape[:3], v))
    values[..., 0] = 1
    mass_terms(qf, kf, values, scale=scale, diagonal_causal=causal, kernel=mk)


def _settings(d: int) -> tuple[list[dict[str, Any]], tuple[int, int, int, int] | None]:
    """Each tile setting on a 64K x 64K x 4 pair; the fastest one."""
    q, lse, k, scale = _inputs(64 * K, 64 * K, 4, 4)
    flops = 2 * (64 * K) ** 2 * d * 4
    rows: list[dict[str, Any]] = []
    for s in SETTINGS:
        call = functools.partial(fused.fused_terms, q, lse, k, scale=scale, diagonal_causal=False, config=_config(s))
        try:
            sec = median_seconds(call)
            row: dict[str, Any] = {"setting": s, "seconds": sec, "tflops": flops / sec / 1e12}
        except Exception as e:  # noqa: BLE001 - a setting the compiler refuses (shared memory, registers)
            row = {"setting": s, "error": f"{type(e).__name__}: {str(e).splitlines()[0][:200]}"}
        rows.append(row)
        print(json.dumps(row), flush=True)
    ok = [r for r in rows if "seconds" in r]
    return rows, (min(ok, key=lambda r: r["seconds"])["setting"] if ok else None)


def _shape(L: int, h: int, causal: bool, kernel: str, best: tuple[int, int, int, int] | None) -> dict[str, Any]:
    """The job's kernel, the unfused and the fused analysis on one pair of L x L tokens, h heads."""
    q, lse, k, scale = _inputs(L, L, h, h, causal=causal)
    job = median_seconds(functools.partial(attend, q, k, k, scale=scale, diagonal_causal=causal, kernel=kernel))
    unfused = median_seconds(functools.partial(_unfused, q, lse, k, scale, causal))
    row: dict[str, Any] = {"L": L, "heads": h, "causal": causal, "job_kernel_s": job, "unfused_s": unfused}
    for name, s in (("default", None), ("best", best)):
        cfg = None if s is None else _config(s)
        row[f"fused_{name}_s"] = median_seconds(
            functools.partial(fused.fused_terms, q, lse, k, scale=scale, diagonal_causal=causal, config=cfg))
    row["fused_over_job"] = row["fused_default_s"] / job
    row["fused_best_over_job"] = row["fused_best_s"] / job
    row["unfused_over_job"] = unfused / job
    print(json.dumps(row), flush=True)
    return row


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--out", default=None)
    a = ap.parse_args()
    d = 128
    kernel = select_kernel(torch.device("cuda"), torch.bfloat16, d)
    rec: dict[str, Any] = {"date": environment.now_utc(), "hardware": environment.hardware(),
                           "versions": environment.versions(), "default": fused.CUDA_CONFIG}
    rec["settings"], rec["best"] = _settings(d)
    rec["shapes"] = [_shape(L, h, causal, kernel, rec["best"])
                     for L, h, causal in ((64 * K, 4, False), (322639, 1, False), (322639, 1, True), (322639, 4, False))]
    rec["errors"] = []
    for L, S, hq, hk, causal in ((4096, 6000, 4, 2, False), (4096, 4096, 2, 1, True)):
        rec["errors"].append(_error(L, S, hq, hk, causal))
        print(json.dumps(rec["errors"][-1]), flush=True)
    if a.out:
        with open(a.out, "w") as f:
            json.dump(rec, f, indent=1)


if __name__ == "__main__":
    main()
