"""Make a Zarr job store and run it on an existing Dask scheduler.

Start a scheduler and at least one worker that advertises the memory budget
as the ``device_mem`` resource (deploy/README.md), then:

    python workflows/run_on_scheduler.py tcp://127.0.0.1:8786 [--store /tmp/job.zarr] [--dtype bf16]

The store is an ordinary Zarr v3 group with arrays q (B, Hq, N, D) and k, v
(B, Hkv, N, D); bfloat16 is stored as uint16 with the attribute
``logical_dtype = "bfloat16"``.  ``cqsa_dask.run`` adds ``out``, ``lse`` and
the engine state ``_cqsa/``.  Running the script again on the same store
resumes: tasks already recorded as done are skipped.  A few output rows are
checked against a float64 reference at the end.

The ``if __name__ == "__main__":`` guard matters: Dask may spawn processes
that re-import this file.
"""

from __future__ import annotations

import argparse
import os

import numpy as np
import torch
import zarr

import cqsa_dask
from cqsa_dask.tools.verify import check_rows, sample_rows

_TORCH = {"float32": torch.float32, "float16": torch.float16, "bfloat16": torch.bfloat16}


def make_store(path: str, *, seq_len: int, heads: int, kv_heads: int, head_dim: int, dtype: str) -> zarr.Group:
    """Write seeded random q, k, v into a new Zarr v3 group at ``path``."""
    group = zarr.open_group(path, mode="w", zarr_format=3)
    g = torch.Generator().manual_seed(0)
    chunk = 4096  # tokens per chunk of the inputs; any chunking works
    for name, h in (("q", heads), ("k", kv_heads), ("v", kv_heads)):
        x = torch.randn(1, h, seq_len, head_dim, generator=g).to(_TORCH[dtype])  # (B, H, N, D)
        if dtype == "bfloat16":  # no bfloat16 dtype in Zarr: keep the bits in uint16
            data: np.ndarray = x.view(torch.uint16).numpy()
            arr = group.create_array(name, shape=data.shape, dtype="uint16", chunks=(1, h, chunk, head_dim),
                                     compressors=None, attributes={"logical_dtype": "bfloat16"})
        else:
            data = x.numpy()
            arr = group.create_array(name, shape=data.shape, dtype=data.dtype, chunks=(1, h, chunk, head_dim),
                                     compressors=None)
        arr[...] = data
    return group


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("scheduler", help="scheduler address, e.g. tcp://127.0.0.1:8786")
    ap.add_argument("--store", default="/tmp/cqsa-workflow.zarr", help="path of the job store")
    ap.add_argument("--seq-len", type=int, default=16384, help="tokens N")
    ap.add_argument("--heads", type=int, default=4, help="query heads Hq")
    ap.add_argument("--kv-heads", type=int, default=2, help="kv heads Hkv")
    ap.add_argument("--head-dim", type=int, default=64, help="head dim D")
    ap.add_argument("--dtype", default="float32", help="float32 | float16 | bfloat16 (fp32, fp16, bf16)")
    ap.add_argument("--budget", default=None,
                    help="memory budget per task-running worker (default: what the workers advertise)")
    ap.add_argument("--causal", action="store_true")
    a = ap.parse_args()

    dtype = {"fp32": "float32", "fp16": "float16", "bf16": "bfloat16"}.get(a.dtype, a.dtype)
    if os.path.exists(os.path.join(a.store, "_cqsa")):
        print(f"store {a.store} holds a job already: resuming it")
        group = zarr.open_group(a.store, mode="r+", zarr_format=3)
    else:
        group = make_store(a.store, seq_len=a.seq_len, heads=a.heads, kv_heads=a.kv_heads,
                           head_dim=a.head_dim, dtype=dtype)

    res = cqsa_dask.run(a.store, scheduler=a.scheduler, causal=a.causal, memory_budget=a.budget,
                        progress=lambda done, total: print(f"\r{done}/{total} tasks", end="", flush=True))
    p = res.plan
    print(f"\nW={p.groups} groups, |D|={p.quorum_size}: ran {res.quorum_tasks_run} quorum tasks and "
          f"{res.merges_run} merges in {res.seconds:.1f}s (resumed: {res.resumed}); dashboard {res.dashboard_link}")

    chk = check_rows(group, sample_rows(group, 8), causal=a.causal, scale=p.scale)
    print(f"{chk.rows} rows vs float64: max relative error of out {chk.max_rel_out:.1e}, max |lse error| {chk.max_abs_lse:.1e}")


if __name__ == "__main__":
    main()
