"""What cutting a causal row into query pieces costs in kernels alone (no store, no Dask).

    python -m benchmarks.causal_pieces [--tokens N] [--piece P] [--out FILE.json]

One head of (1, 1, N, 128) bfloat16 on the GPU.  Times, with the engine's own ``attend`` and
``merge`` (``kernels/attention.py``) on the chosen kernel:

  whole         one causal call over the row (what SDPA does)
  pieces        per piece [r0, r1): the earlier pieces' keys unmasked, a piece at a time
                (``--prefix``: [0, r0) in one call) + [r0, r1) under the mask, merged (what a
                task does with ``cqsa.query-piece``), in a fresh thread the first time
                (the kernel library builds its plans per thread and shape) and then again
  pieces-full   the same pieces without the mask (every piece the same shape), for comparison

each three times after one warm-up (first-call times kept apart).  Seconds are wall time with
the device synchronised.
"""

from __future__ import annotations

import argparse
import json
import threading
import time
from collections.abc import Callable
from typing import Any

import torch

from benchmarks import environment
from cqsa_dask.execution.pieces import Step
from cqsa_dask.kernels.attention import attend, merge, select_kernel


def _timed(fn: Callable[[], Any]) -> float:
    torch.cuda.synchronize()
    t = time.perf_counter()
    fn()
    torch.cuda.synchronize()
    return time.perf_counter() - t


def _in_thread(fn: Callable[[], Any]) -> float:
    box: list[float] = []
    th = threading.Thread(target=lambda: box.append(_timed(fn)))
    th.start()
    th.join()
    return box[0]


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--tokens", type=int, default=2**20)
    ap.add_argument("--piece", type=int, default=131_072)
    ap.add_argument("--prefix", action="store_true", help="keys before a piece in one call, not per piece")
    ap.add_argument("--out", default=None)
    a = ap.parse_args()
    dev = torch.device("cuda")
    q, k, v = (torch.randn(1, 1, a.tokens, 128, device=dev, dtype=torch.bfloat16) for _ in range(3))
    kernel = select_kernel(dev, torch.bfloat16, 128, "auto")
    scale = 128 ** -0.5
    n = a.tokens
    cuts = [(r0, min(n, r0 + a.piece)) for r0 in range(0, n, a.piece)]

    def whole() -> None:
        attend(q, k, v, scale=scale, diagonal_causal=True, kernel=kernel)

    def blocks(r0: int, r1: int) -> list[tuple[int, int, bool]]:
        if a.prefix:  # keys [0, r0) in one call (a shape per piece)
            return ([(0, r0, False)] if r0 else []) + [(r0, r1, True)]
        return Step(0, 0, (0,), slice(r0, r1), a.piece).key_blocks()  # the engine's blocks

    def pieces(mask: bool) -> Callable[[], None]:
        def run() -> None:
            for r0, r1 in cuts:
                qp = q[:, :, r0:r1].contiguous()
                if not mask:
                    attend(qp, k, v, scale=scale, diagonal_causal=False, kernel=kernel)
                    continue
                acc = None
                for k0, k1, masked in blocks(r0, r1):
                    acc = merge(acc, attend(qp, k[:, :, k0:k1], v[:, :, k0:k1], scale=scale,
                                            diagonal_causal=masked, kernel=kernel))
                assert acc is not None
                acc[0].to(torch.bfloat16)
        return run

    rec: dict[str, Any] = {"date": environment.now_utc(), "hardware": environment.hardware(),
                           "versions": environment.versions(), "tokens": n, "piece": a.piece, "kernel": kernel,
                           "prefix": a.prefix}
    rec["whole_first_s"] = _timed(whole)
    rec["whole_s"] = [_timed(whole) for _ in range(3)]
    rec["pieces_fresh_thread_s"] = _in_thread(pieces(True))
    rec["pieces_first_here_s"] = _timed(pieces(True))
    rec["pieces_s"] = [_timed(pieces(True)) for _ in range(3)]
    rec["pieces_fresh_thread_again_s"] = _in_thread(pieces(True))
    rec["pieces_full_s"] = [_timed(pieces(False)) for _ in range(3)]
    rec["full_whole_s"] = [_timed(lambda: attend(q, k, v, scale=scale, diagonal_causal=False, kernel=kernel))
                           for _ in range(3)]
    print(json.dumps(rec, indent=1))
    if a.out:
        with open(a.out, "w") as f:
            json.dump(rec, f, indent=1)


if __name__ == "__main__":
    main()
