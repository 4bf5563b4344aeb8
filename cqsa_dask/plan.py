"""The memory-adaptive planner: how many groups, how many heads per task.

Pure arithmetic (no torch, dask or zarr).  Inputs: the problem shape
(B, Hq, Hkv, N, D), dtype, causal flag and a memory budget in bytes.
Output: a frozen :class:`Plan`.

Policy:
  1. Candidate group counts W, ascending: 1, 2, 3, then q^2 + q + 1 for
     prime q, never more groups than tokens.  Fewer groups means fewer
     re-reads of the inputs (each group is read by |D| ~ sqrt(W) tasks).
  2. For each W, the largest number of kv heads per task (a divisor of Hkv)
     whose predicted peak memory fits ``budget / tasks_in_flight``.
  3. The first fit wins.  If none fits, :class:`BudgetError` names the
     smallest budget that would work.

Memory model of one task (bytes), G = ceil(N / W) tokens per group,
hk kv heads and hq = hk * Hq / Hkv query heads per task, e = element size:

    k, v of the |D| loaded groups   2 |D| G hk D e      (resident all task)
    query groups in flight          3 G hq D e          (one in use, two prefetched;
                                                         CUDA: only one on the device)
    float32 accumulator + lse       G hq (D + 1) 4
    kernel output + lse             G hq D e + G hq 4
    outputs waiting to be written   2 (G hq D e + G hq 4)  (CUDA: on the host, not counted)
    GQA/causal diagonal expansion   2 G hq D e
    merge / kernel scratch          2 G hq D 4
    total x margin (config)  + 2 MiB fixed (kernel workspace, buffers)

Causal plans use the same (upper-bound) model; ``bytes_read`` and
``bytes_written`` are exact for non-causal jobs and upper bounds for causal.
"""

from __future__ import annotations

import dataclasses
import json
import math
import re
from dataclasses import dataclass
from typing import Any, Literal

from .errors import BudgetError, InvalidInputError
from .quorums import QuorumSystem, base_set_size, is_prime, quorum_system

__all__ = [
    "DTYPES",
    "Plan",
    "make_plan",
    "parse_budget",
    "parse_dtype",
]

DType = Literal["float32", "float16", "bfloat16"]
DTYPES: dict[str, int] = {"float32": 4, "float16": 2, "bfloat16": 2}
_ALIASES = {
    "fp32": "float32", "float": "float32", "f32": "float32",
    "fp16": "float16", "half": "float16", "f16": "float16",
    "bf16": "bfloat16",
}
MAX_HEAD_DIM = 256
PLAN_VERSION = 2  # 2: tasks_in_flight and host_staging joined the plan
_FIXED_OVERHEAD = 2 * 2**20
_UNITS = {
    "": 1, "b": 1,
    "k": 10**3, "kb": 10**3, "m": 10**6, "mb": 10**6,
    "g": 10**9, "gb": 10**9, "t": 10**12, "tb": 10**12,
    "kib": 2**10, "mib": 2**20, "gib": 2**30, "tib": 2**40,
}


def parse_budget(budget: float | str) -> int:
    """Return a memory budget in bytes from 4096, "512MB", "12GB" or "1.5GiB"."""
    if isinstance(budget, bool):
        raise BudgetError(f"memory budget must be bytes or a string like '12GB', got {budget!r}")
    if isinstance(budget, int):
        value = budget
    elif isinstance(budget, float):
        value = int(budget) if math.isfinite(budget) else 0
    else:
        m = re.fullmatch(r"\s*([0-9]*\.?[0-9]+(?:[eE][0-9]+)?)\s*([a-zA-Z]*)\s*", str(budget))
        unit = m.group(2).lower() if m else None
        if m is None or unit not in _UNITS:
            raise BudgetError(
                f"memory budget {budget!r} is not understood: use bytes or a number "
                "with a unit such as '512MB', '12GB' or '1.5GiB'"
            )
        value = int(float(m.group(1)) * _UNITS[unit])
    if value <= 0:
        raise BudgetError(f"memory budget must be at least 1 byte, got {budget!r}")
    return value


def parse_dtype(dtype: str) -> DType:
    """Canonical dtype name from 'float32', 'fp16', 'bf16', 'torch.bfloat16', ..."""
    name = str(dtype).lower().removeprefix("torch.")
    name = _ALIASES.get(name, name)
    if name not in DTYPES:
        raise InvalidInputError(
            f"dtype {dtype!r} is not supported: use float32, float16 or bfloat16 "
            "(short forms fp32, fp16, bf16)"
        )
    return name  # type: ignore[return-value]


@dataclass(frozen=True)
class Plan:
    """A complete, serialisable description of one CQS attention job.

    Shapes: q (batch, heads_q, seq_len, head_dim); k, v (batch, heads_kv,
    seq_len, head_dim).  Group g holds tokens [g * group_size,
    min((g + 1) * group_size, seq_len)), possibly empty when groups > seq_len.
    One task = (quorum, batch index, head block of ``heads_per_task`` kv heads).
    """

    batch: int
    heads_q: int
    heads_kv: int
    seq_len: int
    head_dim: int
    dtype: DType
    causal: bool
    scale: float
    budget_bytes: int
    groups: int
    quorum_size: int
    heads_per_task: int
    task_memory_bytes: int
    tasks_in_flight: int = 1
    host_staging: bool = False
    version: int = PLAN_VERSION

    # -- derived sizes ------------------------------------------------------
    @property
    def group_size(self) -> int:
        """Tokens per group (the last groups may be shorter or empty)."""
        return max(1, -(-self.seq_len // self.groups))

    @property
    def head_blocks(self) -> int:
        """Number of kv-head blocks per batch element."""
        return self.heads_kv // self.heads_per_task

    @property
    def q_heads_per_task(self) -> int:
        """Query heads per task: heads_per_task * heads_q / heads_kv."""
        return self.heads_per_task * (self.heads_q // self.heads_kv)

    @property
    def tasks(self) -> int:
        """Number of quorum tasks (every task owns at least its diagonal pair)."""
        return self.groups * self.batch * self.head_blocks

    @property
    def merges(self) -> int:
        """Number of merge tasks: one per non-empty (group, batch, head block)."""
        return self.nonempty_groups * self.batch * self.head_blocks

    @property
    def itemsize(self) -> int:
        return DTYPES[self.dtype]

    @property
    def flops(self) -> int:
        """Floating-point operations of exact attention (causal: only b <= a)."""
        n = self.seq_len
        pairs = n * (n + 1) // 2 if self.causal else n * n
        return 4 * self.batch * self.heads_q * self.head_dim * pairs

    @property
    def bytes_read(self) -> int:
        """Bytes read from the store: |D| passes over q, k, v, then the partials."""
        e, n, d = self.itemsize, self.seq_len, self.head_dim
        qkv = self.batch * n * d * e * (self.heads_q + 2 * self.heads_kv)
        partial = self.batch * self.heads_q * n * (d * e + 4)
        return self.quorum_size * (qkv + partial)

    @property
    def bytes_written(self) -> int:
        """Bytes written: |D| partial outputs with lse, then out and lse."""
        out = self.batch * self.heads_q * self.seq_len * (self.head_dim * self.itemsize + 4)
        return (self.quorum_size + 1) * out

    def group_bounds(self, g: int) -> tuple[int, int]:
        """Token range [start, stop) of group ``g`` (stop may equal start)."""
        start = min(g * self.group_size, self.seq_len)
        return start, min(start + self.group_size, self.seq_len)

    @property
    def nonempty_groups(self) -> int:
        """Groups holding at least one token (all of them unless W > N / G)."""
        return min(self.groups, -(-self.seq_len // self.group_size))

    @property
    def quorums(self) -> QuorumSystem:
        """The ownership template for ``groups`` (cached)."""
        return quorum_system(self.groups)

    def work(self, task: int) -> list[tuple[int, int, list[int]]]:
        """[(slot, query group, [key groups])] of quorum ``task``, empty groups dropped."""
        ne = self.nonempty_groups
        out = []
        for s, a, bs in self.quorums.pairs(task, self.causal):
            bs = [b for b in bs if b < ne]
            if a < ne and bs:
                out.append((s, a, bs))
        return out

    def producers(self, group: int) -> list[tuple[int, int]]:
        """(task, slot) pairs holding a partial result for query ``group``."""
        if group >= self.nonempty_groups:
            return []
        found = self.quorums.producers(group, self.causal)
        if self.nonempty_groups == self.groups:
            return found
        return [(t, s) for t, s in found if any(ws == s for ws, _, _ in self.work(t))]

    def direct(self, group: int) -> bool:
        """True when one task computes all of query ``group``'s row.

        That task then writes ``out``/``lse`` itself (no partial, no merge
        work): always so with W = 1, and for group 0 of causal jobs.
        """
        return len(self.producers(group)) == 1

    # -- (de)serialisation ----------------------------------------------------
    def to_dict(self) -> dict[str, Any]:
        """Fields plus derived figures, as plain JSON-able values."""
        d = dataclasses.asdict(self)
        for name in ("group_size", "tasks", "merges", "flops", "bytes_read", "bytes_written"):
            d[name] = getattr(self, name)
        return d

    def to_json(self) -> str:
        return json.dumps(self.to_dict(), indent=2, sort_keys=True)

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> Plan:
        names = {f.name for f in dataclasses.fields(cls)}
        return cls(**{k: v for k, v in d.items() if k in names})


def task_memory(
    *, group_size: int, quorum_size: int, heads_kv: int, heads_q: int,
    head_dim: int, itemsize: int, margin: float, host_staging: bool = False,
) -> int:
    """Predicted peak memory (bytes) of one task; see the module docstring.

    ``host_staging``: the device is not host memory (CUDA), so the query
    groups read ahead and the outputs waiting to be written stay on the
    host and are not counted.
    """
    g, hk, hq, d, e = group_size, heads_kv, heads_q, head_dim, itemsize
    q_bufs, out_bufs = (1, 1) if host_staging else (3, 3)
    total = (
        2 * quorum_size * g * hk * d * e
        + q_bufs * g * hq * d * e
        + g * hq * (d + 1) * 4
        + out_bufs * (g * hq * d * e + g * hq * 4)
        + 2 * g * hq * d * e
        + 2 * g * hq * d * 4
    )
    return int(total * margin) + _FIXED_OVERHEAD


def _candidate_groups(seq_len: int) -> list[int]:
    out = [w for w in (1, 2, 3) if w <= max(1, seq_len)]
    q = 2
    while q * q + q + 1 <= seq_len:
        if is_prime(q):
            out.append(q * q + q + 1)
        q += 1
    return out


def _divisors_desc(n: int) -> list[int]:
    return [h for h in range(n, 0, -1) if n % h == 0]


def _validate_shape(batch: int, heads_q: int, heads_kv: int, seq_len: int, head_dim: int) -> None:
    for name, v in (("batch", batch), ("heads", heads_q), ("kv heads", heads_kv),
                    ("sequence length", seq_len), ("head dim", head_dim)):
        if not isinstance(v, int) or isinstance(v, bool) or v < 1:
            raise InvalidInputError(f"{name} must be a positive integer, got {v!r}")
    if heads_q % heads_kv:
        raise InvalidInputError(
            f"query heads ({heads_q}) must be a multiple of kv heads ({heads_kv}) for GQA/MQA"
        )
    if head_dim > MAX_HEAD_DIM:
        raise InvalidInputError(f"head dim {head_dim} is larger than the supported {MAX_HEAD_DIM}")


def make_plan(
    *,
    seq_len: int,
    heads: int,
    head_dim: int,
    kv_heads: int | None = None,
    batch: int = 1,
    dtype: str = "bfloat16",
    causal: bool = False,
    scale: float | None = None,
    budget: int | str = "12GB",
    groups: int | None = None,
    tasks_in_flight: int = 1,
    margin: float = 1.10,
    host_staging: bool = False,
) -> Plan:
    """Choose W and heads per task so that every task fits the budget.

    Args:
        seq_len: N, tokens per sequence.
        heads: Hq, query heads.  kv_heads: Hkv (default Hq); Hq % Hkv == 0.
        head_dim: D (<= 256).  batch: B.
        dtype: float32 / float16 / bfloat16 (or fp32, fp16, bf16).
        scale: softmax scale, default 1 / sqrt(D).
        budget: bytes or a string like "12GB" for one worker.
        groups: force W (any W >= 1, also W > N); default: the planner picks.
        tasks_in_flight: tasks that must fit the budget at once.
        margin: multiplicative safety factor on predicted memory.
        host_staging: tasks run on a device other than host memory (CUDA):
            read-ahead and write-behind buffers are not device memory.

    Raises:
        InvalidInputError: bad shapes or dtype.  BudgetError: nothing fits.
    """
    kv_heads = heads if kv_heads is None else kv_heads
    _validate_shape(batch, heads, kv_heads, seq_len, head_dim)
    name = parse_dtype(dtype)
    budget_bytes = parse_budget(budget)
    if scale is None:
        scale = 1.0 / math.sqrt(head_dim)
    elif not (isinstance(scale, (int, float)) and math.isfinite(scale) and scale > 0):
        raise InvalidInputError(f"scale must be a positive finite number, got {scale!r}")
    if groups is not None and (not isinstance(groups, int) or groups < 1):
        raise InvalidInputError(f"groups must be a positive integer, got {groups!r}")
    per_task = budget_bytes // max(1, tasks_in_flight)
    rep = heads // kv_heads

    def need(w: int, hk: int) -> int:
        return task_memory(
            group_size=max(1, -(-seq_len // w)), quorum_size=base_set_size(w),
            heads_kv=hk, heads_q=hk * rep, head_dim=head_dim,
            itemsize=DTYPES[name], margin=margin, host_staging=host_staging,
        )

    candidates = [groups] if groups is not None else _candidate_groups(seq_len)
    for w in candidates:
        for hk in _divisors_desc(kv_heads):
            m = need(w, hk)
            if m <= per_task:
                return Plan(
                    batch=batch, heads_q=heads, heads_kv=kv_heads, seq_len=seq_len,
                    head_dim=head_dim, dtype=name, causal=bool(causal), scale=float(scale),
                    budget_bytes=budget_bytes, groups=w, quorum_size=base_set_size(w),
                    heads_per_task=hk, task_memory_bytes=m, tasks_in_flight=max(1, tasks_in_flight),
                    host_staging=host_staging,
                )
    smallest = min(need(w, 1) for w in candidates) * max(1, tasks_in_flight)
    raise BudgetError(
        f"memory budget {budget_bytes:,} bytes is too small for N={seq_len}, "
        f"D={head_dim}, {name}: the smallest plan{' with ' + str(groups) + ' groups' if groups else ''} "
        f"needs {smallest:,} bytes ({smallest / 1e9:.3g} GB); raise the budget"
    )
