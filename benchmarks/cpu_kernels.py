"""The CPU case's kernels alone: what the job's tasks compute, without Dask, against SDPA.

The performance issue's CPU row (N = 32,768, H = 2, D = 64, float32, W = 7) runs
49 group pairs of 4,682 tokens, merged in float32.  This times, in one process and
alternating for ``--rounds`` rounds: SDPA on the whole problem, the 49 pair calls of the
engine's ``attend`` with their merges (what the tasks compute), and one call per query
group against all keys::

    python -m benchmarks.cpu_kernels [--rounds 3] [--out FILE.json]

Its inputs are fresh ``randn`` draws; nothing is checked for exactness here (the
benchmark suite and the tests do that), only seconds.
"""

from __future__ import annotations

import argparse
import json
import time
from collections.abc import Callable

import torch

from benchmarks import environment
from cqsa_dask.kernels.attention import attend, merge, select_kernel

N, H, D, W = 32768, 2, 64, 7


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--rounds", type=int, default=3)
    ap.add_argument("--out", default=None)
    a = ap.parse_args()
    g = -(-N // W)
    q, k, v = (torch.randn(1, H, N, D) for _ in range(3))
    kernel = select_kernel(torch.device("cpu"), torch.float32, D)
    scale = D**-0.5

    def sdpa() -> None:
        torch.nn.functional.scaled_dot_product_attention(q, k, v)

    def pairs() -> None:
        for i in range(W):
            acc = None
            for j in range(W):
                part = attend(q[:, :, i * g:(i + 1) * g], k[:, :, j * g:(j + 1) * g], v[:, :, j * g:(j + 1) * g],
                              scale=scale, diagonal_causal=False, kernel=kernel)
                acc = merge(acc, part)

    def rows() -> None:
        for i in range(W):
            attend(q[:, :, i * g:(i + 1) * g], k, v, scale=scale, diagonal_causal=False, kernel=kernel)

    calls: dict[str, Callable[[], None]] = {"sdpa": sdpa, "pairs": pairs, "rows": rows}
    times: dict[str, list[float]] = {name: [] for name in calls}
    for r in range(a.rounds):
        for name, fn in calls.items():
            t = time.perf_counter()
            fn()
            times[name].append(time.perf_counter() - t)
        print(f"round {r}: " + "  ".join(f"{n} {s[-1]:.3f}s" for n, s in times.items()), flush=True)
    rec = {"kernel": kernel, "n": N, "h": H, "d": D, "w": W, "torch_threads": torch.get_num_threads(),
           "seconds": times, "sdpa_over_pairs": [s / p for s, p in zip(times["sdpa"], times["pairs"])],
           "date_utc": environment.now_utc(), "hardware": environment.hardware(),
           "versions": {"torch": torch.__version__}, "git": environment.git_info()}
    print(json.dumps({"sdpa_over_pairs": rec["sdpa_over_pairs"]}))
    if a.out:
        with open(a.out, "w") as f:
            json.dump(rec, f, indent=1)


if __name__ == "__main__":
    main()
