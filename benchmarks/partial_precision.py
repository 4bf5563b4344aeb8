"""How far the engine's out is from float64, in units of SDPA's own error, over many fresh seeds.

    python -m benchmarks.partial_precision [--seeds 150] [--first 1000]

For float16 and bfloat16, N = 150, Hq = Hkv = 2, D = 80, W = 3 (three key groups, so every row
is merged from partials), it runs ``cqsa_dask.attention`` (a threaded local cluster) on the
tests' inputs (``tests/conftest.draw_inputs``: N(0, 1) logits) and prints, per dtype, the median,
99th percentile and maximum over seeds of max|out - ref64| / max|sdpa - ref64|, and how many
seeds the tests' criterion (``tests/reference.check_exact``) rejects.  docs/design.md ("Partials
stored in float32") quotes it for partials stored in the job dtype and in float32.
"""

from __future__ import annotations

import argparse
import os
import sys


def main(argv: list[str] | None = None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--seeds", type=int, default=150)
    ap.add_argument("--first", type=int, default=1000, help="first seed")
    args = ap.parse_args(argv)
    sys.path.insert(0, os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "tests"))
    import dask
    import numpy as np
    import torch
    from conftest import draw_inputs
    from reference import check_exact, reference_attention, sdpa

    import cqsa_dask

    dask.config.set({"cqsa.local-cluster.processes": False})
    for dtype in (torch.float16, torch.bfloat16):
        ratios, rejected = [], 0
        for seed in range(args.first, args.first + args.seeds):
            inp = draw_inputs(1, 2, 2, 150, 80, dtype, seed=seed)
            out, lse = cqsa_dask.attention(inp.q, inp.k, inp.v, groups=3, memory_budget="1GB", return_lse=True)
            ref, _ = reference_attention(inp.q, inp.k, inp.v, False, None)
            err = (out.double() - ref).abs().max().item()
            base = (sdpa(inp.q, inp.k, inp.v, False, None).double() - ref).abs().max().item()
            ratios.append(err / base)
            try:
                check_exact(inp.q, inp.k, inp.v, out, lse, causal=False, scale=None)
            except AssertionError:
                rejected += 1
        r = np.asarray(ratios)
        print(f"{dtype!s:15s} seeds {args.first}..{args.first + args.seeds - 1}: error / SDPA's median "
              f"{np.median(r):.2f}, p99 {np.quantile(r, 0.99):.2f}, max {r.max():.2f}; rejected {rejected}",
              flush=True)


if __name__ == "__main__":
    main()
