"""Prefill a long input through a causal LM with attn_implementation="cqsa" under a memory budget.

One call does the whole measurement and prints one JSON line:

  1. builds a random-initialised Llama from a config (no downloads): ``--preset
     llama-1b`` (the Llama 3.2 1B shapes, 1.24e9 parameters) or the sizes given;
  2. caps this process's device memory (``--device-cap-gb``:
     ``torch.cuda.set_per_process_memory_fraction``);
  3. prefills ``--seq-len`` random tokens with "cqsa" inside one Session whose
     threaded local cluster runs the tasks in this process, so the cap and
     the peak device memory cover the model and the engine alike (the engine's
     own allocator cap is turned off: it would replace the cap of step 2);
  4. the same forward with "sdpa" under the same cap: its time and peak, or
     "oom" when it runs out of memory;
  5. ``--overhead-calls`` times one layer's attention call, in the phases of
     ``cqsa_dask.attention``: store write, plan + graph (``run`` minus the
     task execution), execution, read back; and SDPA on the same tensors.

Only the last token's logits are computed (``logits_to_keep=1``): the full
(N, vocab) logits would need more memory than anything measured here.  Both
forwards' last logits are compared when both ran.

    python workflows/long_document_prefill.py --seq-len 2048 --budget 3MB          # tiny, on the CPU
    python workflows/long_document_prefill.py --preset llama-1b --dtype bfloat16 \\
        --seq-len 262144 --budget 8GB --device-cap-gb 40                          # GPU
"""

from __future__ import annotations

import argparse
import gc
import json
import os
import resource
import shutil
import sys
import tempfile
import time
from collections.abc import Callable, Sequence
from typing import Any

import dask.config
import torch
from distributed import Client, LocalCluster
from transformers import AutoModelForCausalLM, LlamaConfig

import cqsa_dask
from cqsa_dask.client.api import plan_options, run
from cqsa_dask.core.units import parse_budget
from cqsa_dask.integrations import transformers as hf
from cqsa_dask.store.layout import array, read_block, write_tensor

PRESETS = {  # Llama 3.2 1B's shapes
    "llama-1b": {"hidden": 2048, "intermediate": 8192, "layers": 16, "heads": 32, "kv_heads": 8, "vocab": 128256},
}
DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}


def parse(argv: Sequence[str] | None) -> argparse.Namespace:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--preset", choices=sorted(PRESETS), help="model shapes (overrides the size options)")
    ap.add_argument("--layers", type=int, default=2)
    ap.add_argument("--hidden", type=int, default=64)
    ap.add_argument("--intermediate", type=int, default=None, help="MLP width (default 4 x hidden)")
    ap.add_argument("--heads", type=int, default=4)
    ap.add_argument("--kv-heads", type=int, default=2)
    ap.add_argument("--vocab", type=int, default=128)
    ap.add_argument("--seq-len", type=int, default=2048, help="tokens of the input")
    ap.add_argument("--dtype", choices=sorted(DTYPES), default="float32")
    ap.add_argument("--device", default="auto", help="auto (cuda when present), cpu, cuda")
    ap.add_argument("--budget", default="3MB", help="the engine's memory budget per call")
    ap.add_argument("--device-cap-gb", type=float, default=None, help="cap this process's device memory (GiB)")
    ap.add_argument("--min-tokens", type=int, default=256, help="shorter calls go to SDPA")
    ap.add_argument("--no-sdpa", action="store_true", help="skip the SDPA forward")
    ap.add_argument("--overhead-calls", type=int, default=3, help="timed single-layer calls (0: none)")
    ap.add_argument("--attn-name", default="cqsa", help="the name registered with transformers")
    ap.add_argument("--seed", type=int, default=0)
    a = ap.parse_args(argv)
    for k, v in PRESETS.get(a.preset or "", {}).items():
        setattr(a, k, v)
    a.intermediate = a.intermediate or 4 * a.hidden
    return a


def build(a: argparse.Namespace, device: torch.device) -> Any:
    cfg = LlamaConfig(vocab_size=a.vocab, hidden_size=a.hidden, intermediate_size=a.intermediate,
                      num_hidden_layers=a.layers, num_attention_heads=a.heads, num_key_value_heads=a.kv_heads,
                      max_position_embeddings=max(a.seq_len, 8192), rope_theta=500000.0,
                      tie_word_embeddings=True, use_cache=False)
    torch.manual_seed(a.seed)
    with torch.device(device):
        model = AutoModelForCausalLM.from_config(cfg, attn_implementation="sdpa")
    return model.to(DTYPES[a.dtype]).eval()


class Device:
    """Peak memory and synchronisation of the device the model runs on."""

    def __init__(self, device: torch.device):
        self.device = device
        self.cuda = device.type == "cuda"

    def sync(self) -> None:
        if self.cuda:
            torch.cuda.synchronize(self.device)

    def reset(self) -> None:
        gc.collect()
        if self.cuda:
            torch.cuda.empty_cache()
            torch.cuda.reset_peak_memory_stats(self.device)

    def peaks(self) -> dict[str, int | None]:
        if not self.cuda:
            return {"peak_allocated_bytes": None, "peak_reserved_bytes": None}
        return {"peak_allocated_bytes": torch.cuda.max_memory_allocated(self.device),
                "peak_reserved_bytes": torch.cuda.max_memory_reserved(self.device)}


def forward(model: Any, impl: str, ids: torch.Tensor, dev: Device) -> dict[str, Any]:
    """One prefill with ``impl``: seconds, device peaks, last logits (or the OOM)."""
    if hasattr(model, "set_attn_implementation"):
        model.set_attn_implementation(impl)
    else:  # transformers before 4.56
        model.config._attn_implementation = impl
    dev.reset()
    t0 = time.perf_counter()
    try:
        with torch.no_grad():
            last = model(ids, logits_to_keep=1, use_cache=False).logits[:, -1].float().cpu()
        dev.sync()
    except (torch.OutOfMemoryError, cqsa_dask.CQSAError) as e:  # a task's OOM fails its job
        dev.reset()
        status = "oom" if "out of memory" in str(e).lower() else "failed"
        return {"status": status, "error": f"{type(e).__name__}: {str(e).splitlines()[0][:300]}"}
    return {"status": "ok", "seconds": time.perf_counter() - t0, **dev.peaks(), "last_logits": last}


def timed(fn: Callable[[], Any], dev: Device) -> tuple[Any, float]:
    t0 = time.perf_counter()
    r = fn()
    dev.sync()
    return r, time.perf_counter() - t0


def overhead(a: argparse.Namespace, dev: Device, session: cqsa_dask.Session) -> dict[str, Any]:
    """One layer's attention call, step by step as ``cqsa_dask.attention`` takes it (medians of the calls)."""
    d = a.hidden // a.heads
    dtype = DTYPES[a.dtype]
    g = torch.Generator().manual_seed(a.seed)
    q = torch.randn(1, a.heads, a.seq_len, d, generator=g).to(dev.device, dtype)  # (B, Hq, N, D)
    k = torch.randn(1, a.kv_heads, a.seq_len, d, generator=g).to(dev.device, dtype)  # (B, Hkv, N, D)
    v = torch.randn(1, a.kv_heads, a.seq_len, d, generator=g).to(dev.device, dtype)  # (B, Hkv, N, D)
    rows = [_one_call(a, q, k, v, dev, session) for _ in range(a.overhead_calls)]
    med = {key: sorted(r[key] for r in rows)[len(rows) // 2] for key in rows[0]}
    return {"calls": len(rows), **{key: round(val, 4) for key, val in med.items()}}


def _one_call(a: argparse.Namespace, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, dev: Device,
              session: cqsa_dask.Session) -> dict[str, float]:
    """The phases of one call on q (1, Hq, N, D), k, v (1, Hkv, N, D), then the whole call and SDPA."""
    import zarr

    tmp = tempfile.mkdtemp(dir=session.workdir)
    path = os.path.join(tmp, "job.zarr")
    d = q.shape[-1]

    def write() -> tuple[Any, Any]:
        plan = cqsa_dask.make_plan(seq_len=a.seq_len, heads=a.heads, kv_heads=a.kv_heads, head_dim=d,
                                   dtype=a.dtype, causal=True, budget=a.budget, **plan_options())
        group = zarr.open_group(path, mode="w", zarr_format=3)
        for name, t, h in (("q", q, plan.q_heads_per_task), ("k", k, plan.heads_per_task),
                           ("v", v, plan.heads_per_task)):
            write_tensor(group, name, t, (1, h, plan.group_size, d))
        return plan, group

    (plan, group), t_write = timed(write, dev)
    res, t_run = timed(lambda: run(path, causal=True, memory_budget=a.budget, client=session.client), dev)
    _, t_read = timed(lambda: read_block(array(group, "out"), (...,), plan.dtype).to(dev.device), dev)
    shutil.rmtree(tmp, ignore_errors=True)
    _, t_call = timed(lambda: cqsa_dask.attention(q, k, v, causal=True, memory_budget=a.budget), dev)
    try:
        _, t_sdpa = timed(lambda: torch.nn.functional.scaled_dot_product_attention(
            q, k, v, is_causal=True, enable_gqa=True), dev)
    except torch.OutOfMemoryError:
        dev.reset()
        t_sdpa = float("nan")  # out of memory under the cap
    return {"store_write_s": t_write, "plan_graph_s": t_run - res.seconds, "execute_s": res.seconds,
            "read_back_s": t_read, "attention_call_s": t_call, "sdpa_s": t_sdpa}


def main(argv: Sequence[str] | None = None) -> dict[str, Any]:
    a = parse(argv)
    device = torch.device("cuda" if a.device == "auto" and torch.cuda.is_available() else
                          ("cpu" if a.device == "auto" else a.device))
    dev = Device(device)
    if a.device_cap_gb is not None and dev.cuda:
        total = torch.cuda.get_device_properties(device).total_memory
        torch.cuda.set_per_process_memory_fraction(min(1.0, a.device_cap_gb * 2**30 / total), device)
    t0 = time.perf_counter()
    model = build(a, device)
    params = sum(p.numel() for p in model.parameters())
    built_s = time.perf_counter() - t0
    ids = torch.randint(0, a.vocab, (1, a.seq_len), generator=torch.Generator().manual_seed(a.seed + 1)).to(device)
    backend = hf.register(a.attn_name, memory_budget=a.budget, min_tokens=a.min_tokens)
    out: dict[str, Any] = {
        "device": torch.cuda.get_device_name(device) if dev.cuda else "cpu", "torch_threads": torch.get_num_threads(),
        "params": params, "layers": a.layers, "hidden": a.hidden, "heads": a.heads, "kv_heads": a.kv_heads,
        "seq_len": a.seq_len, "dtype": a.dtype, "budget": a.budget, "device_cap_gb": a.device_cap_gb,
        "build_s": round(built_s, 2),
    }
    opts = plan_options()
    threads = int(opts["tasks_in_flight"]) + int(opts["host_staging"])
    try:
        with dask.config.set({"cqsa.cap-device-memory": False}), \
                LocalCluster(n_workers=1, threads_per_worker=threads, processes=False, dashboard_address=":0",
                             resources={"device_mem": float(parse_budget(a.budget))}) as lc, \
                Client(lc) as c, cqsa_dask.Session(client=c, memory_budget=a.budget) as s:
            plan = cqsa_dask.make_plan(seq_len=a.seq_len, heads=a.heads, kv_heads=a.kv_heads,
                                       head_dim=a.hidden // a.heads, dtype=a.dtype, causal=True, budget=a.budget,
                                       **opts)
            out["plan"] = {"groups": plan.groups, "quorum_size": plan.quorum_size, "tasks": plan.tasks,
                           "task_memory_bytes": plan.task_memory_bytes}
            cq = forward(model, a.attn_name, ids, dev)
            out["routes"] = dict(backend.calls)
            sd = {"status": "skipped"} if a.no_sdpa else forward(model, "sdpa", ids, dev)
            if cq["status"] == sd["status"] == "ok":
                ref = sd["last_logits"]
                out["last_logits_rel_diff"] = float((cq["last_logits"] - ref).abs().max() / ref.abs().max())
            out["cqsa"] = {k: v for k, v in cq.items() if k != "last_logits"}
            out["sdpa"] = {k: v for k, v in sd.items() if k != "last_logits"}
            if a.overhead_calls > 0:
                out["per_call"] = overhead(a, dev, s)
    finally:
        hf.unregister(a.attn_name)
    out["peak_host_rss_bytes"] = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024
    print(json.dumps(out), flush=True)
    return out


if __name__ == "__main__":
    main(sys.argv[1:])
