"""Float64 check of sampled output rows: ``cqsa verify`` (and ``cqsa demo``).

::

    STORE ─> plan, merge_done markers ─> sample rows (seed): R random (b, h, n) + the first and the last
          ─> keep the rows whose query group is merged; the others are counted as skipped
          ─> float64 reference of each kept row, on the CPU, over ALL its keys:
               stored q, k, v     online softmax over key chunks read from the store
               synthetic source   sum over the vocab, entry u weighted by the number of keys with
                                  token id u (bincount of the ids over all keys or the causal prefix)
          ─> errors of out and lse ─> tolerance of the job's dtype ─> passed, or the worst row

Memory stays O(chunk · D) (stored) or O(vocab · D) (synthetic): no N x N
matrix anywhere.  A synthetic key vector is the table row of its token id,
so sum_j f(k_j, v_j) = sum_u count(u) f(Tk[u], Tv[u]) exactly: one
streaming pass of integer hashing and counting per (batch, kv head) covers
all rows of that head, causal ones included (the counts are snapshotted at
each row's position).

Tolerances, per row (docs/synthetic.md has the measurements behind them)::

    max_d |out - ref|  <=  (TOLERANCES[dtype].out + 2 δ) · v_max     v_max = largest |v| entry among the row's keys
    |lse - ref_lse|    <=  TOLERANCES[dtype].lse · (1 + |ref_lse|) + δ
    δ = 4 · eps32 · scale · |q| · max_j |k_j|                  float32 rounding of the largest logit

out is a convex combination of v rows, so its natural scale is v_max; a
kernel rounds it (and the partials) to the job dtype, hence a few units of
that dtype's epsilon.  δ bounds the float32 error of a logit (kernels
compute logits and lse in float32), which shifts a softmax weight by a
factor exp(±δ).
"""

from __future__ import annotations

import math
import time
from collections.abc import Mapping
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from typing import Any

import numpy as np
import torch
import zarr

from cqsa_dask.core.dtypes import TOLERANCES
from cqsa_dask.core.errors import InvalidInputError
from cqsa_dask.core.plan import Plan
from cqsa_dask.store.chunkio import read_markers
from cqsa_dask.store.generated import SyntheticSource, source_of
from cqsa_dask.store.jobstate import same_inputs
from cqsa_dask.store.layout import array, engine, input_info, logical_dtype, open_store, read_block
from cqsa_dask.tools.reference import STREAM_CHUNK, Reference, RowInputs, streamed_reference

__all__ = [
    "RowCheck",
    "RowResult",
    "Verification",
    "check_rows",
    "counted_references",
    "key_counts",
    "reference_row",
    "references",
    "sample_rows",
    "verify",
]

Row = tuple[int, int, int]  # (batch b, query head h, token n)

_EPS32 = float(np.finfo(np.float32).eps)
_COUNT_CHUNK = 32767  # positions per step of the token counts: below torch's grain size, so one thread per op
_SPAN = 2**21  # positions per unit of work of the counting threads


class _StoredInputs:
    """q, k, v arrays of a store, read as float64 blocks."""

    def __init__(self, group: zarr.Group):
        self.q, self.k, self.v = (array(group, n) for n in ("q", "k", "v"))
        self.dtype = logical_dtype(self.q)

    def q_row(self, b: int, h: int, n: int) -> torch.Tensor:
        return read_block(self.q, (b, h, n), self.dtype).double()

    def kv(self, b: int, g: int, c0: int, c1: int) -> tuple[torch.Tensor, torch.Tensor]:
        idx = (b, g, slice(c0, c1))
        return read_block(self.k, idx, self.dtype).double(), read_block(self.v, idx, self.dtype).double()


class _GeneratedInputs:
    """q, k, v of a synthetic source, generated on the CPU as float64 blocks."""

    def __init__(self, source: SyntheticSource):
        self.source = source

    def q_row(self, b: int, h: int, n: int) -> torch.Tensor:
        return self.source.q(b, slice(h, h + 1), slice(n, n + 1))[0, 0].double()

    def kv(self, b: int, g: int, c0: int, c1: int) -> tuple[torch.Tensor, torch.Tensor]:
        heads, tokens = slice(g, g + 1), slice(c0, c1)
        return self.source.k(b, heads, tokens)[0].double(), self.source.v(b, heads, tokens)[0].double()


def _inputs(group: zarr.Group) -> RowInputs:
    source = source_of(group)
    return _GeneratedInputs(source) if source is not None else _StoredInputs(group)


def reference_row(group: zarr.Group, b: int, h: int, n: int, *, causal: bool, scale: float,
                  chunk: int = STREAM_CHUNK) -> tuple[np.ndarray, float]:
    """Float64 (out (D,), lse) of query row (b, h, n), keys streamed in chunks."""
    info = input_info(group)
    ref = streamed_reference(_inputs(group), info.heads_q // info.heads_kv, info.seq_len, (b, h, n),
                             causal=causal, scale=scale, chunk=chunk)
    return ref.out, ref.lse


# -- the counted reference (synthetic sources) ------------------------------------------


def key_counts(source: SyntheticSource, b: int, g: int, stops: list[int], chunk: int = _COUNT_CHUNK,
               threads: int | None = None) -> dict[int, torch.Tensor]:
    """For each stop, how many of the positions [0, stop) carry each token id: (vocab,) int64.

    One pass over [0, max(stops)): spans of ``_SPAN`` positions (never
    across a stop) are counted on ``threads`` threads (default: torch's
    intra-op thread count) in chunks of ``chunk`` positions, small enough
    that each torch op runs on its own thread only; the spans are then
    added in order.  (Large chunks on torch's OpenMP pool instead ran 10-20
    times slower as soon as other processes held cores: docs/synthetic.md.)
    """
    spans = []  # (start, end) of each span, a stop at the end of some
    pos = 0
    for stop in sorted(set(stops)):
        spans += [(p, min(stop, p + _SPAN)) for p in range(pos, stop, _SPAN)]
        pos = max(pos, stop)

    def count(span: tuple[int, int]) -> torch.Tensor:
        c = torch.zeros(source.vocab, dtype=torch.int64)
        for p in range(span[0], span[1], chunk):
            c += torch.bincount(source.token_ids(b, g, slice(p, min(span[1], p + chunk))), minlength=source.vocab)
        return c

    counts = torch.zeros(source.vocab, dtype=torch.int64)
    snapshots = {}
    with ThreadPoolExecutor(max(1, threads or torch.get_num_threads()), thread_name_prefix="cqsa-count") as pool:
        for (_, end), c in zip(spans, pool.map(count, spans)):
            counts += c
            if end in stops:
                snapshots[end] = counts.clone()
    return snapshots


def _from_counts(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, counts: torch.Tensor,
                 scale: float) -> Reference:
    """Reference of a query q (D,) over keys given as table rows k, v (vocab, D) and their counts (vocab,)."""
    present = counts > 0
    k, v, c = k[present], v[present], counts[present].double()  # (U, D), (U, D), (U,)
    logits = (k @ q) * scale  # (U,)
    m = float(logits.max())
    w = c * torch.exp(logits - m)  # (U,)
    s = float(w.sum())
    return Reference(((w @ v) / s).numpy(), m + math.log(s), float(v.abs().max()),
                     scale * float(q.norm()) * float(k.norm(dim=1).max()))


def counted_references(source: SyntheticSource, rows: list[Row], *, causal: bool, scale: float,
                       chunk: int = _COUNT_CHUNK) -> dict[Row, Reference]:
    """Float64 references of ``rows`` of a synthetic job from token counts (exact; see the module doc)."""
    tq, tk, tv = (t.double() for t in source.tables())  # the job-dtype values, exactly
    by_head: dict[tuple[int, int], list[Row]] = {}
    for row in rows:
        by_head.setdefault((row[0], row[1] // source.rep), []).append(row)
    refs = {}
    for (b, g), head_rows in by_head.items():
        stops = [n + 1 for _, _, n in head_rows] if causal else [source.seq_len]
        counts = key_counts(source, b, g, stops, chunk)
        for row in head_rows:
            _, h, n = row
            u = int(source.token_ids(b, g, slice(n, n + 1))[0])
            refs[row] = _from_counts(tq[h, u], tk[g], tv[g], counts[n + 1 if causal else source.seq_len], scale)
    return refs


def references(group: zarr.Group, rows: list[Row], *, causal: bool, scale: float) -> dict[Row, Reference]:
    """Float64 references of ``rows``: token counts for a synthetic store, streamed keys otherwise."""
    source = source_of(group)
    if source is not None:
        return counted_references(source, rows, causal=causal, scale=scale)
    info = input_info(group)
    inputs = _StoredInputs(group)
    return {row: streamed_reference(inputs, info.heads_q // info.heads_kv, info.seq_len, row, causal=causal,
                                    scale=scale) for row in rows}


# -- sampling and comparison ------------------------------------------------------------


def sample_rows(group: zarr.Group, count: int, seed: int = 0) -> list[Row]:
    """``count`` random (b, h, n) rows plus the first and last token."""
    info = input_info(group)
    rng = np.random.default_rng(seed)
    rows = {(0, 0, 0), (info.batch - 1, info.heads_q - 1, info.seq_len - 1)}
    while len(rows) < min(count + 2, info.batch * info.heads_q * info.seq_len):
        rows.add((int(rng.integers(info.batch)), int(rng.integers(info.heads_q)), int(rng.integers(info.seq_len))))
    return sorted(rows)


@dataclass(frozen=True)
class RowCheck:
    """Errors of ``out``/``lse`` against float64 on the sampled rows (rel: to max |ref| of the row)."""

    rows: int
    max_abs_out: float
    max_rel_out: float
    max_abs_lse: float


def _stored_row(group: zarr.Group, row: Row) -> tuple[np.ndarray, float]:
    """out (D,) float64 and lse of ``row`` as the job wrote them."""
    out = array(group, "out")
    return (read_block(out, row, logical_dtype(out)).double().numpy(),
            float(np.asarray(array(group, "lse")[row])))


def check_rows(group: zarr.Group, rows: list[Row], *, causal: bool, scale: float) -> RowCheck:
    """Compare ``out``/``lse`` of ``group`` with float64 references on ``rows``."""
    abs_o = rel_o = abs_l = 0.0
    for row, ref in references(group, rows, causal=causal, scale=scale).items():
        got, lse = _stored_row(group, row)
        err = float(np.abs(got - ref.out).max())
        abs_o = max(abs_o, err)
        rel_o = max(rel_o, err / max(float(np.abs(ref.out).max()), 1e-30))
        abs_l = max(abs_l, abs(lse - ref.lse))
    return RowCheck(len(rows), abs_o, rel_o, abs_l)


@dataclass(frozen=True)
class RowResult:
    """One checked row: its errors and what its tolerance allows (absolute)."""

    row: Row
    abs_out: float  # max_d |out - ref|
    rel_out: float  # abs_out / v_max
    abs_lse: float
    allowed_out: float
    allowed_lse: float

    @property
    def ratio(self) -> float:
        """Largest error over its allowance (<= 1 passes; inf when out or lse is not finite)."""
        r = max(self.abs_out / self.allowed_out, self.abs_lse / self.allowed_lse)
        return r if math.isfinite(r) else math.inf


def _compare(row: Row, ref: Reference, got: np.ndarray, lse: float, dtype: str) -> RowResult:
    delta = 4 * _EPS32 * ref.logit_bound
    err = float(np.abs(got - ref.out).max())
    v_max = max(ref.v_max, 1e-30)
    return RowResult(row, err, err / v_max, abs(lse - ref.lse),
                     (TOLERANCES[dtype].out + 2 * delta) * v_max, TOLERANCES[dtype].lse * (1 + abs(ref.lse)) + delta)


@dataclass(frozen=True)
class Verification:
    """What ``verify`` found.  ``method``: "token counts" (synthetic) or "streamed keys"."""

    dtype: str
    method: str
    results: tuple[RowResult, ...]
    skipped: int
    seconds: float

    @property
    def worst(self) -> RowResult:
        return max(self.results, key=lambda r: r.ratio)

    @property
    def passed(self) -> bool:
        return all(r.ratio <= 1.0 for r in self.results)

    def to_dict(self) -> dict[str, Any]:
        """JSON-able summary (what ``cqsa verify --json`` prints)."""
        w = self.worst
        return {
            "passed": self.passed, "rows_checked": len(self.results), "rows_skipped": self.skipped,
            "dtype": self.dtype, "method": self.method, "seconds": round(self.seconds, 3),
            "max_abs_out": max(r.abs_out for r in self.results),
            "max_rel_out": max(r.rel_out for r in self.results),
            "max_abs_lse": max(r.abs_lse for r in self.results),
            "tolerance": {"out": TOLERANCES[self.dtype].out, "lse": TOLERANCES[self.dtype].lse},
            "worst_row": {"b": w.row[0], "h": w.row[1], "n": w.row[2], "abs_out": w.abs_out, "rel_out": w.rel_out,
                          "abs_lse": w.abs_lse, "allowed_out": w.allowed_out, "allowed_lse": w.allowed_lse,
                          "ratio": w.ratio},
        }


def _complete(plan: Plan, merge_done: np.ndarray, row: Row) -> bool:
    b, h, n = row
    return bool(merge_done[n // plan.group_size, b, h // plan.q_heads_per_task])


def _sample_merged(plan: Plan, done: np.ndarray, count: int, seed: int) -> list[Row]:
    """For a partly merged job: ``count`` random rows of merged (group, batch, head block) cells,
    plus the first and last row of each of up to 8 such cells (none: an empty list)."""
    cells = np.argwhere(done > 0)  # (k, 3): group, batch, head block
    if not len(cells):
        return []
    rng = np.random.default_rng(seed)
    hq = plan.q_heads_per_task
    found: set[Row] = set()
    for a, b, j in cells[rng.permutation(len(cells))[:8]]:
        start, stop = plan.group_bounds(int(a))
        found |= {(int(b), int(j) * hq, start), (int(b), int(j) * hq + hq - 1, stop - 1)}
    for _ in range(count):
        a, b, j = cells[rng.integers(len(cells))]
        start, stop = plan.group_bounds(int(a))
        found.add((int(b), int(j) * hq + int(rng.integers(hq)), int(rng.integers(start, stop))))
    return sorted(found)


def verify(store: Any, rows: int = 16, seed: int = 0, storage_options: Mapping[str, Any] | None = None) -> Verification:
    """Check ``rows`` random rows (plus the first and the last) of a job's out and lse against float64.

    ``store``: a path, a URL (with ``storage_options``), a zarr Store or a
    ``StoreLocation``.  Only rows whose query group is merged are checked; in a partly merged
    job the rows are drawn from the merged groups.  Raises
    :class:`InvalidInputError` for bad arguments, a job whose inputs changed,
    or when no sampled row is complete; :class:`StoreError` for a missing
    store or job.
    """
    if isinstance(rows, bool) or not isinstance(rows, int) or rows < 1:
        raise InvalidInputError(f"rows must be an integer >= 1, got {rows!r}")
    if isinstance(seed, bool) or not isinstance(seed, int) or seed < 0:
        raise InvalidInputError(f"seed must be an integer >= 0, got {seed!r}")
    t0 = time.perf_counter()
    group = open_store(store, mode="r", storage_options=storage_options)
    eng = engine(group)
    plan = Plan.from_dict(dict(eng.attrs["plan"]))  # type: ignore[arg-type]
    _check_same_inputs(group, eng, plan)
    done = read_markers(array(eng, "merge_done"))  # (W, B, J)
    sampled = sample_rows(group, rows, seed) if done.all() else _sample_merged(plan, done, rows, seed)
    kept = [r for r in sampled if _complete(plan, done, r)]
    if not kept:
        raise InvalidInputError(f"none of the {len(sampled)} sampled rows is in a merged query group "
                                f"({int(done.sum())} of {done.size} merges done): finish the job with "
                                "`cqsa resume` first")
    refs = references(group, kept, causal=plan.causal, scale=plan.scale)
    results = tuple(_compare(row, refs[row], *_stored_row(group, row), plan.dtype) for row in kept)
    method = "token counts" if source_of(group) is not None else "streamed keys"
    return Verification(plan.dtype, method, results, len(sampled) - len(kept), time.perf_counter() - t0)


def _check_same_inputs(group: zarr.Group, eng: zarr.Group, plan: Plan) -> None:
    """Refuse a store whose inputs are not those the job ran on."""
    info = input_info(group)
    now = (info.batch, info.heads_q, info.heads_kv, info.seq_len, info.head_dim, info.dtype)
    then = (plan.batch, plan.heads_q, plan.heads_kv, plan.seq_len, plan.head_dim, plan.dtype)
    stored = eng.attrs.get("fingerprint")
    if now != then or (stored is not None and not same_inputs(group, stored)):
        raise InvalidInputError("the inputs changed since the job ran (shape, dtype or fingerprint differs): "
                                "its outputs cannot be checked against them; rerun it with --restart")
