"""The baseline: torch SDPA on the whole problem in memory, on the same inputs as cqsa.

Policy::

    inputs     q, k, v read from the case's store onto the device (the same
               values cqsa reads), after the peak statistics are reset, so
               the peak includes inputs and output
    backend    CUDA: cuDNN, else flash (the first that runs); CPU: the default
    timing     CUDA events after a warm-up (N > 2M: a warm-up on the first
               65,536 tokens, then one full call, host clock after a sync);
               CPU: perf_counter
    peak       CUDA: max_memory_reserved and max_memory_allocated; CPU: None

GQA inputs (Hkv < Hq) are expanded with repeat_interleave before the call,
as SDPA needs; the copy is in SDPA's peak.  FLOPs: 4 B Hq N^2 D, causal
counts N(N+1)/2 pairs.
"""

from __future__ import annotations

import contextlib
import statistics
import time
from typing import Any

__all__ = ["attention_flops", "ceilings", "load_inputs", "reset_peak", "time_sdpa"]

GB = 1e9
_BIG = 2**21


def attention_flops(b: int, h: int, n: int, d: int, causal: bool) -> int:
    """4 B H D times the number of (query, key) pairs; causal: N(N+1)/2."""
    pairs = n * (n + 1) // 2 if causal else n * n
    return 4 * b * h * d * pairs


def reset_peak(device: str) -> None:
    import torch

    if device.startswith("cuda"):
        torch.cuda.synchronize()
        torch.cuda.empty_cache()
        torch.cuda.reset_peak_memory_stats()


def load_inputs(store: str, device: str) -> tuple[Any, Any, Any]:
    """q (B, Hq, N, D), k and v (B, Hkv, N, D) of ``store``, in their logical dtype, on ``device``."""
    import zarr

    from cqsa_dask.store.layout import logical_dtype, read_block

    g = zarr.open_group(store, mode="r")
    dt = logical_dtype(g["q"])
    return tuple(read_block(g[name], (...,), dt).to(device) for name in ("q", "k", "v"))  # type: ignore[return-value]


def _backends(cuda: bool) -> list[Any]:
    if not cuda:
        return [None]
    from torch.nn.attention import SDPBackend

    return [SDPBackend.CUDNN_ATTENTION, SDPBackend.FLASH_ATTENTION]


def _backend(be: Any) -> Any:
    if be is None:
        return contextlib.nullcontext()
    from torch.nn.attention import sdpa_kernel

    return sdpa_kernel([be])


def _call(q: Any, k: Any, v: Any, causal: bool) -> Any:
    import torch.nn.functional as F

    if k.shape[1] != q.shape[1]:  # GQA: SDPA wants Hq heads of k and v
        rep = q.shape[1] // k.shape[1]
        k, v = k.repeat_interleave(rep, dim=1), v.repeat_interleave(rep, dim=1)
    return F.scaled_dot_product_attention(q, k, v, is_causal=causal)


def _timed(q: Any, k: Any, v: Any, causal: bool, cuda: bool) -> tuple[float, Any]:
    import torch

    if cuda:
        e0, e1 = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        e0.record()
        o = _call(q, k, v, causal)
        e1.record()
        torch.cuda.synchronize()
        return e0.elapsed_time(e1) / 1e3, o
    t = time.perf_counter()
    o = _call(q, k, v, causal)
    return time.perf_counter() - t, o


def _pick_backend(q: Any, k: Any, v: Any, causal: bool, cuda: bool) -> tuple[Any, float | None]:
    """The first backend that runs, and (N > 2M) the seconds of its first full call."""
    import torch

    last: Exception | None = None
    for be in _backends(cuda):
        try:
            with _backend(be):
                if q.shape[2] > _BIG:  # warm on a small shape, then one full call is the measurement
                    _call(q[:, :, :65536], k[:, :, :65536], v[:, :, :65536], causal)
                    if cuda:
                        torch.cuda.synchronize()
                    t = time.perf_counter()
                    _call(q, k, v, causal)
                    if cuda:
                        torch.cuda.synchronize()
                    return be, time.perf_counter() - t
                _call(q, k, v, causal)  # the warm-up
            return be, None
        except RuntimeError as e:  # this backend cannot run the shape (or out of memory): try the next
            last = e
    raise RuntimeError(f"no SDPA backend ran: {last}")


def time_sdpa(q: Any, k: Any, v: Any, *, causal: bool, reps: int, warm: bool = False) -> dict[str, Any]:
    """Seconds of SDPA on q (B, Hq, N, D), k, v (B, Hkv, N, D): the median of ``reps`` timed calls.

    ``warm``: the backend was picked and warmed by an earlier call of this
    shape (later rounds of a paired case).  Raises RuntimeError (out of
    memory included) when no backend runs.
    """
    import torch

    cuda = q.is_cuda
    backend, first = (None, None) if warm and not cuda else _pick_backend(q, k, v, causal, cuda)
    times = [first] if first is not None else []
    with _backend(backend):
        for _ in range(reps - len(times)):
            sec, o = _timed(q, k, v, causal, cuda)
            times.append(sec)
            if not bool(torch.isfinite(o).all()):
                raise RuntimeError("SDPA returned non-finite values")
            del o
    b, h, n, d = q.shape
    sec = statistics.median(times)
    rec: dict[str, Any] = {"backend": str(backend).split(".")[-1] if backend is not None else "default",
                           "seconds": sec, "seconds_all": times,
                           "tflops": attention_flops(b, h, n, d, causal) / sec / 1e12}
    if cuda:
        rec["peak_reserved_bytes"] = int(torch.cuda.max_memory_reserved())
        rec["peak_allocated_bytes"] = int(torch.cuda.max_memory_allocated())
    return rec


def ceilings(device: str) -> dict[str, Any]:
    """Dense bf16 matmul TFLOP/s and pageable / pinned host-to-device GB/s ({} off CUDA)."""
    import torch

    if not device.startswith("cuda"):
        return {}
    out: dict[str, Any] = {}
    a = torch.randn(8192, 8192, device=device, dtype=torch.bfloat16)
    for _ in range(3):
        a @ a
    torch.cuda.synchronize()
    e0, e1 = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
    e0.record()
    for _ in range(20):
        a @ a
    e1.record()
    torch.cuda.synchronize()
    out["matmul_bf16_8192_tflops"] = 20 * 2 * 8192**3 / (e0.elapsed_time(e1) / 1e3) / 1e12
    del a
    host = torch.randn(128 * 2**20).to(torch.bfloat16)  # 256 MiB
    for name, src in (("pageable", host), ("pinned", host.pin_memory())):
        src.to(device)
        torch.cuda.synchronize()
        t = time.perf_counter()
        for _ in range(3):
            src.to(device)
        torch.cuda.synchronize()
        out[f"h2d_{name}_gb_s"] = 3 * src.nbytes / (time.perf_counter() - t) / GB
    torch.cuda.empty_cache()
    return out
