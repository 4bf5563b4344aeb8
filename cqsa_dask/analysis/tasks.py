"""The functions Dask runs for an analysis: one analysis task per job quorum task, one reduction
per group, one block-map reduction per head block.

Small arguments in (store, tokens, indices), small dicts out; tensors move
through the store (``analysis/layout.py``).

Analysis task (task i, batch b, head block j), the job's quorum task again::

    load k of every key group the task owns pairs for           (resident; v is not read)
    for each slot s with query group a and key groups [b1, b2, ...]:
        read q and the job's lse of group a
        entropy_a = sum over bk of entropy_term(q_a, lse_a, k_bk)        (float32)
        mass[bk] += mass_terms(q'_a, k'_bk) for each bk; block terms into the block map
        write _entropy_part[s, b, heads_j, a]
    write _mass_part[t, b, heads_j, group of t] for each key group; _block_part[i, b, heads_j]
    write task_done[i, b, j] = 1                                 (after all data)

Reduction (group g, batch b, head block j): sum the entropy partials of row g
(the job's producers) and the mass partials of column g (``column_producers``)
in float64; write entropy and key_mass, then reduce_done; delete the partials.
Block reduction (batch b, head block j): sum the W block partials; write
block_mass, then block_done; delete the partials.
"""

from __future__ import annotations

import functools
import time
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from typing import Any

import torch

from cqsa_dask import config
from cqsa_dask.analysis.fused import fused_available, fused_fits, fused_terms
from cqsa_dask.analysis.layout import Analysis, open_analysis
from cqsa_dask.analysis.pairs import entropy_term, key_features, mass_terms, query_features, value_width
from cqsa_dask.analysis.spec import check_analysis_kernel, column_producers, feature_width, key_slot, parse_resolution
from cqsa_dask.core.errors import InvalidInputError, StoreError
from cqsa_dask.execution.telemetry import report_task, task_started
from cqsa_dask.kernels.attention import resolve_device, select_kernel
from cqsa_dask.store.layout import TORCH_DTYPES, Job, delete_chunk, open_job, read_block, write_block

__all__ = ["analysis_options", "analysis_task", "block_task", "reduce_task"]


def analysis_options() -> dict[str, Any]:
    """The client-side settings the tasks need (dask.config on the client does not reach workers)."""
    keys = ("device", "kernel", "torch-threads", "analysis-precision", "analysis-kernel")
    return {k: config.get(k) for k in keys}


@functools.cache
def _threads(n: int | None) -> None:
    """Once per process: torch's intra-op threads (``cqsa.torch-threads``; None: all cores)."""
    if n:
        torch.set_num_threads(int(n))


def _heads(plan: Any, block: int) -> tuple[slice, slice]:
    hk, hq = plan.heads_per_task, plan.q_heads_per_task
    return slice(block * hk, (block + 1) * hk), slice(block * hq, (block + 1) * hq)


def _input(job: Job, name: str, batch: int, heads: slice, group: int, dev: torch.device) -> torch.Tensor:
    """Input ``name`` (q or k) of ``group``: (h, G, D) on ``dev``, from the store or the generated source."""
    tokens = slice(*job.plan.group_bounds(group))
    if job.source is not None:
        return getattr(job.source, name)(batch, heads, tokens, dev)
    arr = job.q if name == "q" else job.k
    assert arr is not None
    return read_block(arr, (batch, heads, tokens), job.plan.dtype).to(dev)


class _BlockMap:
    """Block-map terms of one task: an (hq, R, R) float64 accumulator on the device."""

    def __init__(self, job: Job, resolution: Any, hq: int, dev: torch.device):
        self.plan, self.res = job.plan, resolution
        self.acc = torch.zeros((hq, resolution.blocks, resolution.blocks), dtype=torch.float64, device=dev)

    def columns(self, a: int) -> tuple[int, torch.Tensor]:
        """First block x0 of query group ``a`` and each row's block column (L,) int64."""
        s, e = self.plan.group_bounds(a)
        rows = torch.arange(s, e, device=self.acc.device) // self.res.block_size
        return int(rows[0]), rows - int(rows[0])

    def add(self, b: int, x0: int, terms: torch.Tensor, ncols: int) -> None:
        """Add terms (1, hq, S, C) float32 (sum over rows of block x0 + c, per key j of group ``b``)."""
        s, e = self.plan.group_bounds(b)
        ys = torch.arange(s, e, device=terms.device) // self.res.block_size  # (S,) key blocks
        y0 = int(ys[0])
        ny = int(ys[-1]) - y0 + 1
        per_y = torch.zeros((terms.shape[1], ny, ncols), dtype=torch.float64, device=terms.device)
        per_y.index_add_(1, ys - y0, terms[0, :, :, :ncols].double())  # (hq, ny, C)
        self.acc[:, x0:x0 + ncols, y0:y0 + ny] += per_y.transpose(1, 2)


@dataclass(frozen=True)
class _Kernels:
    """How one worker computes the pairs.

    ``fused``: the one-pass kernel (``fused.py``: entropy and key mass from one Q K^T per
    pair, float32-exact in every dtype), chosen by ``cqsa.analysis-kernel`` ("auto": where
    it runs, CUDA with triton).  Otherwise two attention calls (``pairs.py``): the entropy
    pass's kernel and dtype (the job's, or float32 by ``cqsa.analysis-precision``; "auto":
    float32 on the CPU), the mass pass's kernel on D' features (``feature_width``) in the
    job's dtype, and its value columns per call (``value_width``); those also give the block
    map's terms when one is asked for.
    """

    fused: bool
    entropy: str
    entropy_dtype: torch.dtype
    mass: str
    features: int
    width: int

    @classmethod
    def choose(cls, plan: Any, dev: torch.device, opt: dict[str, Any]) -> _Kernels:
        dtype = TORCH_DTYPES[plan.dtype]
        how = check_analysis_kernel(opt.get("analysis-kernel", "auto"))
        fused = (how == "fused" or (how == "auto" and dev.type == "cuda")) and fused_available(dev)
        if how == "fused" and not fused:
            raise InvalidInputError(f"cqsa.analysis-kernel is fused, but the fused kernel does not run on "
                                    f"{dev.type} here (it needs CUDA and triton); set it to auto")
        precision = opt["analysis-precision"]
        wide = precision == "float32" or (precision == "auto" and dev.type == "cpu")
        e_dtype = torch.float32 if wide else dtype
        features = feature_width(dev.type, plan.head_dim)
        mass = select_kernel(dev, dtype, features, opt["kernel"])
        return cls(fused, select_kernel(dev, e_dtype, plan.head_dim, opt["kernel"]), e_dtype, mass, features,
                   value_width(mass, dev, dtype, features))

    @property
    def name(self) -> str:
        """The kernel named in the task records."""
        return "fused" if self.fused else self.mass


def _slot(plan: Any, kn: _Kernels, a: int, bs: list[int], q: torch.Tensor, lse: torch.Tensor,
          ks: dict[int, torch.Tensor], mass: dict[int, torch.Tensor], blocks: _BlockMap | None) -> torch.Tensor:
    """The pairs (a, b) of one slot: q (1, hq, L, D) and lse (1, hq, L) of group a, k (1, hk, S, D) of each b.

    Adds each pair's key-mass terms (1, hq, S) into ``mass[b]`` and its block terms into ``blocks``;
    returns the slot's entropy terms (1, hq, L) float32.
    """
    rep = plan.heads_q // plan.heads_kv
    entropy = torch.zeros_like(lse)
    fused = kn.fused and all(fused_fits(q, ks[b]) for b in bs)  # larger pairs: the attention calls
    if fused:
        for b in bs:
            e, m = fused_terms(q, lse, ks[b], scale=plan.scale, diagonal_causal=plan.causal and a == b)
            entropy += e
            mass[b] = mass[b] + m if b in mass else m
        if blocks is None:
            return entropy
    qe = q.to(kn.entropy_dtype) if not fused else q
    qf = query_features(q, lse, plan.scale, kn.features)  # (1, hq, L, D')
    x0, cols = blocks.columns(a) if blocks else (0, torch.zeros(q.shape[2], dtype=torch.int64, device=q.device))
    ncols = int(cols[-1]) + 1
    for b in bs:
        diag = plan.causal and a == b
        if not fused:
            entropy += entropy_term(qe, lse, ks[b].to(kn.entropy_dtype), scale=plan.scale, diagonal_causal=diag,
                                    kernel=kn.entropy)
        kf = key_features(ks[b], rep, kn.features)  # (1, hq, S, D')
        for c0 in range(0, ncols, kn.width):  # one-hot block columns, ``width`` at a time
            values = qf.new_zeros((*qf.shape[:3], kn.width))  # (1, hq, L, V)
            inside = (cols >= c0) & (cols < c0 + kn.width)
            values[:, :, inside, (cols[inside] - c0)] = 1
            m, terms = mass_terms(qf, kf, values, scale=plan.scale, diagonal_causal=diag, kernel=kn.mass)
            if c0 == 0 and not fused:
                mass[b] = mass[b] + m if b in mass else m
            if blocks is not None:
                blocks.add(b, x0 + c0, terms, min(kn.width, ncols - c0))
    return entropy


def analysis_task(store: str, job_token: str, token: str, task: int, batch: int, block: int,
                  resolution: int | None, options: dict[str, Any] | None) -> dict[str, Any]:
    """Entropy, key-mass and block-map partials of the pairs quorum task ``task`` owns."""
    opt = options or analysis_options()
    _threads(opt["torch-threads"])
    t0, start = time.perf_counter(), task_started(token, "quorum", (task, batch, block))
    job, ana = open_job(store, job_token), open_analysis(store, token)
    plan = job.plan
    res = parse_resolution(resolution, plan.seq_len)
    dev = resolve_device(opt["device"])
    kv_h, q_h = _heads(plan, block)
    kn = _Kernels.choose(plan, dev, opt)
    work = plan.work(task)
    blocks = _BlockMap(job, res, plan.q_heads_per_task, dev) if res else None
    mass: dict[int, torch.Tensor] = {}
    t_io, nread, nwritten = 0.0, 0, 0
    with ThreadPoolExecutor(2, thread_name_prefix="cqsa-analysis-io") as pool:

        def read_q(a: int) -> tuple[torch.Tensor, torch.Tensor]:
            rows = slice(*plan.group_bounds(a))
            lse = read_block(job.lse, (batch, q_h, rows), "float32").to(dev)
            return _input(job, "q", batch, q_h, a, dev)[None], lse[None]  # (1, hq, L, D), (1, hq, L)

        keys = sorted({b for _, _, bs in work for b in bs})
        k_futs = {b: pool.submit(_input, job, "k", batch, kv_h, b, dev) for b in keys}  # (hk, S, D) each
        q_fut = pool.submit(read_q, work[0][1]) if work else None
        for n, (slot, a, bs) in enumerate(work):
            tw = time.perf_counter()
            assert q_fut is not None
            q, lse = q_fut.result()
            q_fut = pool.submit(read_q, work[n + 1][1]) if n + 1 < len(work) else None  # the next slot's, ahead
            ks = {b: k_futs[b].result()[None] for b in bs}  # (1, hk, S, D)
            t_io += time.perf_counter() - tw
            nread += q.nbytes + lse.nbytes
            entropy = _slot(plan, kn, a, bs, q, lse, ks, mass, blocks)[0].cpu()  # (hq, L)
            write_block(ana.entropy_part, (slot, batch, q_h, slice(*plan.group_bounds(a))), entropy)
            nwritten += entropy.nbytes
        nread += sum(f.result().nbytes for f in k_futs.values())
        for b, m in mass.items():
            part = m[0].cpu()  # (hq, S)
            write_block(ana.mass_part, (key_slot(plan, task, b), batch, q_h, slice(*plan.group_bounds(b))), part)
            nwritten += part.nbytes
    if blocks is not None:
        assert ana.block_part is not None
        acc = blocks.acc.float().cpu()  # (hq, R, R)
        write_block(ana.block_part, (task, batch, q_h), acc)
        nwritten += acc.nbytes
    ana.task_done[task, batch, block] = 1
    seconds = time.perf_counter() - t0
    rec = {"kind": "quorum", "task": task, "batch": batch, "block": block, "seconds": seconds,
           "compute_seconds": seconds - t_io, "io_seconds": t_io, "bytes_read": nread, "bytes_written": nwritten,
           "kernel": kn.name, "pairs": sum(len(bs) for _, _, bs in work)}
    report_task(token, (task, batch, block), rec, start)
    return rec


def _sum_parts(ana: Analysis, arr: Any, producers: list[tuple[int, int]], batch: int, block: int, q_h: slice,
               rows: slice, what: str) -> torch.Tensor:
    """Sum in float64 of the partials (hq, L) of ``producers`` (task, slot) of ``arr``; a producer without
    its marker or its chunk is an error (StoreError: resume the analysis)."""
    total = None
    for task, slot in producers:
        if not ana.task_done[task, batch, block]:
            raise StoreError(f"analysis task {task} (batch {batch}, head block {block}) has no marker; "
                             "run `cqsa analyze` again to finish it")
        part = read_block(arr, (slot, batch, q_h, rows), "float32").double()
        if not bool(torch.isfinite(part).all()):
            ana.task_done[task, batch, block] = 0
            raise StoreError(f"the {what} partial of analysis task {task} (batch {batch}, head block {block}) is "
                             "missing; its marker was cleared, run `cqsa analyze` again")
        total = part if total is None else total + part
    assert total is not None, "every non-empty group has a producer"
    return total


def reduce_task(store: str, job_token: str, token: str, group: int, batch: int, block: int, *deps: Any
                ) -> dict[str, Any]:
    """key_mass and entropy of ``group``'s tokens from their partials; ``deps`` only order it after them."""
    t0, start = time.perf_counter(), task_started(token, "merge", (group, batch, block))
    job, ana = open_job(store, job_token), open_analysis(store, token)
    plan = job.plan
    _, q_h = _heads(plan, block)
    rows = slice(*plan.group_bounds(group))
    rows_of, cols_of = plan.producers(group), column_producers(plan, group)
    if not ana.reduce_done[group, batch, block]:
        entropy = _sum_parts(ana, ana.entropy_part, rows_of, batch, block, q_h, rows, "entropy")
        mass = _sum_parts(ana, ana.mass_part, cols_of, batch, block, q_h, rows, "key mass")
        write_block(ana.entropy, (batch, q_h, rows), entropy.float())
        write_block(ana.key_mass, (batch, q_h, rows), mass.float())
        ana.reduce_done[group, batch, block] = 1
    for arr, producers in ((ana.entropy_part, rows_of), (ana.mass_part, cols_of)):
        for _, slot in producers:  # best effort: a chunk left behind is garbage, not an error
            try:
                delete_chunk(arr, (slot, batch, block, group))
            except OSError:
                pass
    rec = {"kind": "merge", "group": group, "batch": batch, "block": block, "seconds": time.perf_counter() - t0,
           "bytes_read": 0, "bytes_written": 0}
    report_task(token, (group, batch, block), rec, start)
    return rec


def block_task(store: str, job_token: str, token: str, batch: int, block: int, *deps: Any) -> dict[str, Any]:
    """block_mass (hq, R, R) of one head block: the sum of the W task partials, in float64."""
    t0 = time.perf_counter()
    job, ana = open_job(store, job_token), open_analysis(store, token)
    plan = job.plan
    _, q_h = _heads(plan, block)
    assert ana.block_part is not None and ana.block_mass is not None
    if not ana.block_done[batch, block]:
        total = None
        for task in plan.task_ids:  # the block partial of a task lives at index task
            if not ana.task_done[task, batch, block]:
                raise StoreError(f"analysis task {task} (batch {batch}, head block {block}) has no marker; "
                                 "run `cqsa analyze` again to finish it")
            part = read_block(ana.block_part, (task, batch, q_h), "float32").double()
            total = part if total is None else total + part
        assert total is not None
        write_block(ana.block_mass, (batch, q_h), total.float())
        ana.block_done[batch, block] = 1
    for task in plan.task_ids:
        try:
            delete_chunk(ana.block_part, (task, batch, block, 0, 0))
        except OSError:
            pass
    return {"kind": "blocks", "batch": batch, "block": block, "seconds": time.perf_counter() - t0}
