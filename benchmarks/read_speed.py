"""How fast one task's input read goes, step by step: the pinned buffer, the chunk reads, the copy up.

    python -m benchmarks.read_speed [--tokens N] [--heads H] [--out FILE.json]

Writes q of (1, H, N, 128) bfloat16 with ``write_random_inputs`` (the benchmarks' stores:
chunks of 8,192 tokens, every head), then times, three times each: a pinned host buffer of
one head's rows (``torch.empty(pin_memory=True)``), ``read_rows`` of one head into pinned and
into pageable memory, and the copies of pinned and of pageable rows to the device.  GB/s = 1e9 bytes/s.
"""

from __future__ import annotations

import argparse
import json
import shutil
import tempfile
import time
from typing import Any

import torch
import zarr

from benchmarks import environment
from cqsa_dask.store.chunkio import read_rows
from cqsa_dask.store.random_inputs import write_random_inputs


def _times(fn: Any, n: int = 3) -> list[float]:
    out = []
    for _ in range(n):
        t = time.perf_counter()
        fn()
        if torch.cuda.is_available():
            torch.cuda.synchronize()
        out.append(time.perf_counter() - t)
    return out


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--tokens", type=int, default=2**20)
    ap.add_argument("--heads", type=int, default=4)
    ap.add_argument("--out", default=None)
    a = ap.parse_args()
    root = tempfile.mkdtemp(prefix="cqsa-read-")
    try:
        t = time.perf_counter()
        write_random_inputs(root, seq_len=a.tokens, heads=a.heads, head_dim=128, dtype="bfloat16")
        wrote = time.perf_counter() - t
        arr = zarr.open_group(root, mode="r")["q"]
        nbytes = a.tokens * 128 * 2
        one = slice(0, 1)
        cuda = torch.cuda.is_available()
        rec: dict[str, Any] = {"date": environment.now_utc(), "hardware": environment.hardware(),
                               "tokens": a.tokens, "heads": a.heads, "bytes_per_head": nbytes,
                               "write_inputs_s": wrote}
        if cuda:
            rec["pinned_alloc_s"] = _times(lambda: torch.empty(nbytes, dtype=torch.uint8, pin_memory=True))
        rec["read_pinned_s"] = _times(lambda: read_rows(arr, 0, one, slice(None), torch.bfloat16, pin=cuda))
        rec["read_pageable_s"] = _times(lambda: read_rows(arr, 0, one, slice(None), torch.bfloat16, pin=False))
        rec["read_all_heads_pinned_s"] = _times(
            lambda: read_rows(arr, 0, slice(None), slice(None), torch.bfloat16, pin=cuda))
        if cuda:
            x = read_rows(arr, 0, one, slice(None), torch.bfloat16, pin=True)
            assert x is not None
            rec["upload_s"] = _times(lambda: x.to("cuda", non_blocking=True))
            y = read_rows(arr, 0, one, slice(None), torch.bfloat16, pin=False)
            assert y is not None
            rec["upload_pageable_s"] = _times(lambda: y.to("cuda"))
        for key in [k for k in rec if k.endswith("_s") and isinstance(rec[k], list)]:
            per = nbytes * (a.heads if "all_heads" in key else 1)
            rec[key.replace("_s", "_GBps")] = [round(per / s / 1e9, 2) for s in rec[key]]
        print(json.dumps(rec), flush=True)
        if a.out:
            with open(a.out, "w") as f:
                json.dump(rec, f, indent=1)
    finally:
        shutil.rmtree(root, ignore_errors=True)


if __name__ == "__main__":
    main()
