"""Attention analytics benchmark: a job, then its analysis; times and errors as one JSON line.

Writes seeded random bfloat16 q, k, v (1, H, N, D) with plain zarr (uint16
bits, attribute logical_dtype), runs the job under the budget, then
``cqsa_dask.analyze``, and checks sampled rows and columns in float64:

- entropy of sampled rows i, from the definition over all N keys (an
  independent float64 row: logits, lse, -sum P ln P);
- key mass of sampled columns j: sum_i exp(scale q_i . k_j - lse_i) over all
  N queries in float64, with the job's stored lse (checked separately by
  ``cqsa verify``).

Defaults are the GPU benchmark (N = 4M, H = 4, D = 128, 4 GB); it also runs
at tiny N on a CPU (tests/test_analysis.py does).  Exits 1 when a key mass
is off by 1e-4 relative or an entropy by more than the bfloat16 bound
2^-7 (1 + max |logit|) nats::

    python workflows/analyze_gpu.py                                  # CUDA machine
    python workflows/analyze_gpu.py --seq-len 256 --head-dim 16 --budget 64MB
"""

from __future__ import annotations

import argparse
import json
import math
import os
import sys
import tempfile
import time

import numpy as np
import torch
import zarr

import cqsa_dask

CHUNK = 65536  # tokens per chunk of the input arrays, and per step of the float64 checks


def write_inputs(path: str, heads: int, n: int, d: int, seed: int, dev: torch.device) -> None:
    """q, k, v (1, heads, n, d) bfloat16 as uint16 bits, N(0, 1) values, written chunk by chunk."""
    g = zarr.open_group(path, mode="w", zarr_format=3)
    gen = torch.Generator(device=dev).manual_seed(seed)
    for name in ("q", "k", "v"):
        arr = g.create_array(name, shape=(1, heads, n, d), chunks=(1, heads, min(n, CHUNK), d), dtype="uint16",
                             compressors=None, attributes={"logical_dtype": "bfloat16"})
        for s in range(0, n, CHUNK):
            x = torch.randn(1, heads, min(CHUNK, n - s), d, generator=gen, device=dev).to(torch.bfloat16)
            arr[:, :, s:s + x.shape[2]] = x.view(torch.uint16).cpu().numpy()


def _read(arr: zarr.Array, h: int, dev: torch.device) -> torch.Tensor:
    """arr[0, h] (N, D or N) as float64 on ``dev`` (bfloat16 bits widened)."""
    x = torch.from_numpy(np.asarray(arr[0, h]))
    if x.dtype == torch.int16 or arr.attrs.get("logical_dtype") == "bfloat16":
        x = x.view(torch.bfloat16)
    return x.to(dev).double()


def check(path: str, causal: bool, scale: float, samples: int, seed: int, dev: torch.device) -> dict[str, float]:
    """Largest errors of sampled entropies (nats, and as a share of the bf16 bound) and key masses (relative)."""
    g = zarr.open_group(path, mode="r")
    rng = np.random.default_rng(seed)
    ent_err = ent_ratio = km_err = 0.0
    for h in range(g["q"].shape[1]):
        q, k, lse = _read(g["q"], h, dev), _read(g["k"], h, dev), torch.from_numpy(np.asarray(g["lse"][0, h]))
        lse = lse.to(dev).double()
        n = q.shape[0]
        picks = sorted({0, n - 1, *rng.integers(0, n, samples).tolist()})
        for i in picks:  # rows: entropy from the definition
            s = scale * (k[: i + 1] if causal else k) @ q[i]  # (keys,)
            lse_i = torch.logsumexp(s, 0)
            p = torch.exp(s - lse_i)
            ref = float(-(p * (s - lse_i)).sum())
            got = float(np.asarray(g["analysis/entropy"][0, h, i]))
            ent_err = max(ent_err, abs(got - ref))
            ent_ratio = max(ent_ratio, abs(got - ref) / (2**-7 * (1 + float(s.abs().max()))))
        for j in picks:  # columns: key mass over every query
            tot = 0.0
            for c0 in range(j if causal else 0, n, CHUNK):
                tot += float(torch.exp(scale * q[c0:c0 + CHUNK] @ k[j] - lse[c0:c0 + CHUNK]).sum())
            got = float(np.asarray(g["analysis/key_mass"][0, h, j]))
            km_err = max(km_err, abs(got - tot) / tot)
        del q, k, lse
    return {"max_abs_entropy_err": ent_err, "entropy_err_over_bound": ent_ratio, "max_rel_key_mass_err": km_err}


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--seq-len", type=int, default=4 * 2**20)
    ap.add_argument("--heads", type=int, default=4)
    ap.add_argument("--head-dim", type=int, default=128)
    ap.add_argument("--budget", default="4GB")
    ap.add_argument("--causal", action="store_true")
    ap.add_argument("--groups", type=int, default=None, help="force the job's groups W (default: the planner's)")
    ap.add_argument("--resolution", type=int, default=None, help="also the block map (not timed separately)")
    ap.add_argument("--samples", type=int, default=6, help="random rows and columns checked per head")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--scheduler", default=None, help="a Dask scheduler (default: a local cluster per step)")
    ap.add_argument("--workdir", default=None, help="where the store goes (default: a temporary directory)")
    ap.add_argument("--plot", default=None, help="also draw the analysis to this PNG")
    a = ap.parse_args(argv)
    dev = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    tmp = tempfile.mkdtemp(prefix="cqsa-analysis-", dir=a.workdir)
    path = os.path.join(tmp, "job.zarr")
    t = time.perf_counter()
    write_inputs(path, a.heads, a.seq_len, a.head_dim, a.seed, dev)
    write_s = time.perf_counter() - t
    job = cqsa_dask.run(path, causal=a.causal, memory_budget=a.budget, scheduler=a.scheduler, groups=a.groups)
    ana = cqsa_dask.analyze(path, resolution=a.resolution, memory_budget=a.budget, scheduler=a.scheduler)
    errors = check(path, a.causal, job.plan.scale, a.samples, a.seed, dev)
    if a.plot:
        from cqsa_dask.analysis.plot import plot_analysis

        plot_analysis(path, a.plot)
    print(json.dumps({
        "seq_len": a.seq_len, "heads": a.heads, "head_dim": a.head_dim, "dtype": "bfloat16", "causal": a.causal,
        "budget": a.budget, "device": str(dev), "groups": job.plan.groups, "kernels": list(job.kernels),
        "write_s": round(write_s, 2), "job_s": round(job.seconds, 2), "analysis_s": round(ana.seconds, 2),
        "ratio": round(ana.seconds / job.seconds, 3) if job.seconds > 0 else math.nan,
        "analysis_task_bytes": ana.task_memory_bytes, "analysis_kernels": list(ana.kernels), "store": path,
        **errors,
    }))
    # key mass: float32-exact; entropy: within the bound of a bfloat16 entropy pass (docs/analysis.md)
    return 0 if errors["max_rel_key_mass_err"] < 1e-4 and errors["entropy_err_over_bound"] <= 1 else 1


if __name__ == "__main__":
    sys.exit(main())
