"""Kernel throughput at the sizes tasks run: which (query rows, key rows, heads) the GPU likes.

The performance issue's levers include splitting tasks into smaller pieces; this measures
what a piece of each size costs on its own, with the engine's kernel wrapper (``attend``,
the one a task calls), in bfloat16, D = 128::

    python -m benchmarks.kernel_sizes [--out FILE.json]

One JSON record: per (L, S, heads, causal) the median seconds of 3 calls after a warm-up and
the TFLOP/s (4 L S D H flops; causal diagonal blocks count half), and the host-to-device
copy bandwidth of pinned memory.  CUDA only.
"""

from __future__ import annotations

import argparse
import json
import time

import torch

from benchmarks import environment
from cqsa_dask.kernels.attention import attend, merge, select_kernel

K = 1024
CASES = [  # (query rows L, key rows S, heads, causal diagonal)
    (64 * K, 64 * K, 4, False), (128 * K, 128 * K, 4, False), (256 * K, 256 * K, 4, False),
    (512 * K, 512 * K, 4, False), (1024 * K, 1024 * K, 4, False), (1024 * K, 1024 * K, 1, False),
    (256 * K, 1024 * K, 1, False), (256 * K, 1024 * K, 4, False), (322639, 322639, 1, False),
    (322639, 4 * 322639, 1, False), (1024 * K, 1024 * K, 1, True), (322639, 322639, 1, True),
]


def median_seconds(fn, reps: int = 3) -> float:  # type: ignore[no-untyped-def]
    fn()
    torch.cuda.synchronize()
    times = []
    for _ in range(reps):
        t = time.perf_counter()
        fn()
        torch.cuda.synchronize()
        times.append(time.perf_counter() - t)
    return sorted(times)[len(times) // 2]


def _one(L: int, S: int, h: int, causal: bool, kernel: str, d: int = 128) -> dict[str, object]:
    """Seconds and TFLOP/s of attend on q (1, h, L, d), k, v (1, h, S, d) in bfloat16."""
    dev, dt = torch.device("cuda"), torch.bfloat16
    q = torch.randn(1, h, L, d, device=dev, dtype=dt)
    k = torch.randn(1, h, S, d, device=dev, dtype=dt)
    v = torch.randn(1, h, S, d, device=dev, dtype=dt)
    s = median_seconds(lambda: attend(q, k, v, scale=d ** -0.5, diagonal_causal=causal, kernel=kernel))
    flops = 4 * L * S * d * h / (2 if causal else 1)
    return {"L": L, "S": S, "heads": h, "causal": causal, "seconds": s, "tflops": flops / s / 1e12}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--out", default=None)
    a = ap.parse_args()
    dev, dt, d = torch.device("cuda"), torch.bfloat16, 128
    kernel = select_kernel(dev, dt, d)
    rows = []
    for L, S, h, causal in CASES:
        rows.append(_one(L, S, h, causal, kernel))
        print(json.dumps(rows[-1]), flush=True)
    # the same 1M x 1M single head as 4 key blocks of 256K merged in float32 (a split task's cost)
    q = torch.randn(1, 1, 1024 * K, d, device=dev, dtype=dt)
    kv = [(torch.randn(1, 1, 256 * K, d, device=dev, dtype=dt), torch.randn(1, 1, 256 * K, d, device=dev, dtype=dt))
          for _ in range(4)]

    def split() -> None:
        acc = None
        for k, v in kv:
            acc = merge(acc, attend(q, k, v, scale=d ** -0.5, diagonal_causal=False, kernel=kernel))

    s = median_seconds(split)
    rows.append({"L": 1024 * K, "S": 1024 * K, "heads": 1, "causal": False, "key_blocks": 4, "seconds": s,
                 "tflops": 4 * (1024 * K) ** 2 * d / s / 1e12})
    print(json.dumps(rows[-1]), flush=True)
    host = torch.empty(256 * 2**20, dtype=torch.uint8, pin_memory=True)
    devbuf = torch.empty_like(host, device=dev)
    h2d = median_seconds(lambda: devbuf.copy_(host, non_blocking=True))
    rec = {"kernel": kernel, "rows": rows, "h2d_pinned_gb_s": host.numel() / h2d / 1e9,
           "date_utc": environment.now_utc(), "hardware": environment.hardware(),
           "versions": {"torch": torch.__version__, "cuda": torch.version.cuda}, "git": environment.git_info()}
    if a.out:
        with open(a.out, "w") as f:
            json.dump(rec, f, indent=1)
    print(json.dumps({"kernel": kernel, "h2d_pinned_gb_s": rec["h2d_pinned_gb_s"]}))


if __name__ == "__main__":
    main()
