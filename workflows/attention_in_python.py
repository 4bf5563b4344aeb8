"""Exact attention on in-memory tensors with ``cqsa_dask.attention``.

The call writes q, k, v into a temporary Zarr store, starts a local Dask
cluster whose worker advertises the memory budget as the ``device_mem``
resource, runs the quorum tasks and merges, and reads ``out`` (and ``lse``)
back.  The result is compared with torch's own scaled-dot-product attention.

    python workflows/attention_in_python.py [--seq-len 8192] [--budget 16MB] [--causal]

The ``if __name__ == "__main__":`` guard matters: Dask starts its workers
with the spawn method, which re-imports this file in every worker.
"""

from __future__ import annotations

import argparse
import time

import torch
import torch.nn.functional as F

import cqsa_dask


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--seq-len", type=int, default=8192, help="tokens N")
    ap.add_argument("--heads", type=int, default=4, help="query heads Hq")
    ap.add_argument("--kv-heads", type=int, default=2, help="kv heads Hkv (GQA when < Hq)")
    ap.add_argument("--head-dim", type=int, default=64, help="head dim D")
    ap.add_argument("--budget", default="16MB", help="memory budget per worker (small: several groups)")
    ap.add_argument("--causal", action="store_true")
    a = ap.parse_args()

    g = torch.Generator().manual_seed(0)
    q = torch.randn(1, a.heads, a.seq_len, a.head_dim, generator=g)  # (B, Hq, N, D)
    k = torch.randn(1, a.kv_heads, a.seq_len, a.head_dim, generator=g)  # (B, Hkv, N, D)
    v = torch.randn(1, a.kv_heads, a.seq_len, a.head_dim, generator=g)  # (B, Hkv, N, D)

    plan = cqsa_dask.make_plan(seq_len=a.seq_len, heads=a.heads, kv_heads=a.kv_heads, head_dim=a.head_dim,
                               dtype="float32", causal=a.causal, budget=a.budget)
    print(f"plan: W={plan.groups} groups of {plan.group_size} tokens, |D|={plan.quorum_size}, "
          f"{plan.tasks} quorum tasks + {plan.merges} merges, {plan.task_memory_bytes / 1e6:.1f} MB per task")

    t0 = time.perf_counter()
    out, lse = cqsa_dask.attention(q, k, v, causal=a.causal, memory_budget=a.budget, return_lse=True)
    print(f"cqsa_dask.attention: out {tuple(out.shape)} {out.dtype}, lse {tuple(lse.shape)} "
          f"{lse.dtype} in {time.perf_counter() - t0:.1f}s")

    rep = a.heads // a.kv_heads  # SDPA needs k, v expanded to Hq heads
    ref = F.scaled_dot_product_attention(q, k.repeat_interleave(rep, 1), v.repeat_interleave(rep, 1),
                                         is_causal=a.causal)
    err = (out - ref).abs().max().item()
    print(f"max |out - torch SDPA| = {err:.2e}")
    if err > 1e-4:
        raise SystemExit(f"mismatch: {err:.2e} > 1e-4")


if __name__ == "__main__":
    main()
