"""The memory-adaptive planner: how many groups, how many heads per task.

Pure arithmetic (no torch, dask or zarr).  Inputs: the problem shape
(B, Hq, Hkv, N, D), dtype, causal flag and a memory budget in bytes.
Output: a frozen :class:`Plan`.

Policy:
  1. Candidate group counts W, ascending: 1, 2, 3, then q^2 + q + 1 for
     prime q, never more groups than tokens.  Fewer groups means fewer
     re-reads of the inputs (each group is read by |D| ~ sqrt(W) tasks).
  2. For each W, the largest number of kv heads per task (a divisor of Hkv)
     whose predicted peak memory fits ``budget / tasks_in_flight``; at W = 1
     in query pieces, no more than leaves two tasks per task in flight.
  3. At W = 1 in pieces, when no task with k and v whole on the device fits
     ``budget / tasks_in_flight``: one such task in flight, if it fits the
     whole budget (its own pieces overlap its reads and writes; k and v
     resident measured 8 % faster than streamed at 4M).  Else, when the
     tasks' k and v fit ``stream_limit`` bytes of host memory (per task in
     flight): k and v streamed from host memory in key blocks
     (``stream_keys``), with the query piece halved (down to
     ``MIN_STREAM_PIECE``) until a task fits.  Only then W > 1.
  4. The first fit wins.  If none fits, :class:`BudgetError` names the
     smallest budget that would work.

Memory model of one task (bytes), G = ceil(N / W) tokens per group,
hk kv heads and hq = hk * Hq / Hkv query heads per task, e = element size:

    k, v of the |D| loaded groups   2 |D| G hk D e      (resident all task)
    query groups in flight          3 G hq D e          (one in use, two prefetched;
                                                         CUDA: 2, one in use, one uploaded ahead)
    float32 accumulator + lse       G hq (D + 1) 4
    kernel output + lse             G hq D e + G hq 4
    outputs waiting to be written   2 (G hq D 4 + G hq 4)  (float32 at most: a shared row's result
                                                         is a float32 partial; CUDA: one, the
                                                         previous slot's result waiting to be
                                                         copied back: G hq D 4 + G hq 4)
    GQA/causal diagonal expansion   2 G hq D e
    merge / kernel scratch          2 G hq D 4
    total x margin (config)  + 2 MiB fixed (kernel workspace, buffers)

At W = 1 every row is computed by one task alone, in query pieces of at
most P = ``query_piece`` tokens (``execution/pieces.py``): the terms of the
query side (query groups, accumulator, outputs, expansion, scratch) then
count P rows instead of G; k and v stay whole, or, streamed from host
memory in key blocks of P tokens (``execution/keyblocks.py``), count two
blocks: 4 P hk D e.  With ``cqsa.first-pieces`` 2 a non-causal row with k
and v resident computes its first two pieces together: their second q and
accumulator, and the next piece's q read ahead, take the terms such a task
leaves free (no result waits during its first step; no diagonal expansion),
and the task waits for those kernels before its next piece.

Causal plans use the same (upper-bound) model.  ``bytes_written`` is exact
for non-causal jobs and an upper bound for causal; ``bytes_read`` counts
|D| passes over the inputs (before the host cache), then the partials (for
bounded jobs, an estimate of what the folds read back).
"""

from __future__ import annotations

import dataclasses
import json
import math
from collections.abc import Sequence
from dataclasses import dataclass
from functools import cached_property
from typing import TYPE_CHECKING, Any, Literal

from cqsa_dask.core.dtypes import DTYPES, DType, parse_dtype
from cqsa_dask.core.errors import BudgetError, InvalidInputError
from cqsa_dask.core.quorums import QuorumSystem, base_set_size, is_prime, quorum_system
from cqsa_dask.core.shapes import validate_problem
from cqsa_dask.core.units import parse_budget

if TYPE_CHECKING:
    from cqsa_dask.execution.partials import PartialsPolicy

__all__ = ["AUTO_QUERY_PIECE", "IDENTITY", "MIN_STREAM_PIECE", "Plan", "budget_for", "capped_bytes", "make_plan", "resource_bytes", "task_memory",
           "usable_bytes"]

_FIXED_OVERHEAD = 2 * 2**20  # bytes: kernel workspace, small buffers
PLAN_VERSION = 3  # 2: tasks_in_flight and host_staging; 3: partials and query_groups
# (query_piece came later without a new version: a stored plan without it was sized for whole
# rows, which is what its default of 0 runs, so such a job resumes as it was planned)
#: Tokens of a query piece under ``cqsa.query-piece: auto`` (``execution/pieces.py``): a 1M-token
#: row computed alone is 8 pieces, each still a large kernel (131,072 queries x every key).
AUTO_QUERY_PIECE = 131_072
#: The smallest query piece (tokens) the planner halves to when k and v are streamed: below it the
#: kernels are small and the key blocks' copies (e / 2P bytes per flop) near what PCIe carries.
MIN_STREAM_PIECE = 32_768
#: The fields of a Plan that define its job (``Plan.identity``); the others size one run of it.
IDENTITY = ("batch", "heads_q", "heads_kv", "seq_len", "head_dim", "dtype", "causal", "scale",
            "groups", "quorum_size", "heads_per_task", "partials", "query_groups")
Partials = Literal["all", "bounded"]


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
    partials: Partials = "all"
    query_groups: tuple[int, ...] = ()
    query_piece: int = 0
    stream_keys: bool = False
    version: int = PLAN_VERSION

    # -- derived sizes ------------------------------------------------------
    @property
    def resource_bytes(self) -> int:
        """What one quorum task asks of the worker resource: its predicted peak, raised so that
        the tasks the budget admits at once also fit under the allocator cap (``capped_bytes``)
        of a CUDA worker.  The same as ``task_memory_bytes`` on the CPU (no cap)."""
        return resource_bytes(self.task_memory_bytes, self.budget_bytes, self.host_staging)

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
    def task_ids(self) -> list[int]:
        """Quorum indices that have work: all W, or the producers of ``query_groups``."""
        if not self.query_groups:
            return list(range(self.groups))
        return sorted({t for a in self.query_groups for t, _ in self.producers(a)})

    @property
    def merge_groups(self) -> list[int]:
        """Query groups whose row the job computes (non-empty ones)."""
        if self.query_groups:
            return list(self.query_groups)
        return list(range(self.nonempty_groups))

    @property
    def tasks(self) -> int:
        """Number of quorum tasks (every task owns at least its diagonal pair)."""
        n = len(self.task_ids) if self.query_groups else self.groups
        return n * self.batch * self.head_blocks

    @property
    def merges(self) -> int:
        """Number of merge tasks: one per computed non-empty (group, batch, head block); O(1)
        (``merge_groups`` lists up to W groups: 0.5 s at W = 24M, in every ``to_dict``)."""
        rows = len(self.query_groups) if self.query_groups else self.nonempty_groups
        return rows * self.batch * self.head_blocks

    @property
    def policy(self) -> PartialsPolicy:
        """The partials policy object (``execution/partials``: pure, torch-free imports)."""
        from cqsa_dask.execution.partials import policy_for

        return policy_for(self.partials)

    @property
    def folds(self) -> int:
        """Fold steps of the job's partials policy (bounded: one per (producer, group, batch,
        head block) of groups with several producers, an upper bound for causal plans; "all": 0)."""
        return self.policy.folds(self)

    @cached_property
    def shared_rows(self) -> tuple[int, int, int, int]:
        """(rows, their tokens, their producers, sum of producers x tokens per row) over the
        computed rows with several producers.

        Every row of a full non-causal plan has the same producers up to the
        cyclic shift, so one row stands for all (O(|D|), whatever W); causal
        rows have at most as many, so the figures are then upper bounds.
        Only ``query_groups`` or empty groups (the last groups, when
        W G > N) make rows differ: those are counted one by one when there
        are few (query groups, or W |D| <= 10^6); otherwise the non-empty
        rows are counted as full rows of |D| producers (an upper bound, found
        without building the quorum system, whose construction is O(W)).
        """
        few = self.groups * self.quorum_size <= 10**6
        if self.query_groups or (self.nonempty_groups < self.groups and few):
            counts = {a: len(self.producers(a)) for a in self.merge_groups}
            shared = [a for a, n in counts.items() if n > 1]
            sizes = {a: e - s for a, (s, e) in zip(shared, map(self.group_bounds, shared))}
            return (len(shared), sum(sizes.values()), sum(counts[a] for a in shared),
                    sum(counts[a] * sizes[a] for a in shared))
        # a huge W: |D| producers per row bounds it without building the quorum system (O(W) Python)
        n = len(self.quorums.producers(0, False)) if few else self.quorum_size
        rows = self.nonempty_groups
        return (rows, self.seq_len, n * rows, n * self.seq_len) if n > 1 else (0, 0, 0, 0)

    @property
    def output_bytes(self) -> int:
        """Bytes of out and lse (B, Hq, N, D) and (B, Hq, N) float32."""
        return self.batch * self.heads_q * self.seq_len * (self.head_dim * self.itemsize + 4)

    @property
    def partial_bytes(self) -> int:
        """Planned peak bytes the partials policy keeps on disk beyond out and lse
        ("all": |D| x the output at most; "bounded": fold states and journals)."""
        return self.policy.partial_bytes(self)

    @property
    def partial_token_bytes(self) -> int:
        """Bytes of one token's partial result (out and lse, float32) of every query head."""
        return self.batch * self.heads_q * (self.head_dim + 1) * 4

    @property
    def itemsize(self) -> int:
        return DTYPES[self.dtype]

    @property
    def flops(self) -> int:
        """Floating-point operations of exact attention (causal: only b <= a)."""
        n = self.seq_len
        if self.query_groups:
            pairs = 0
            for a in self.query_groups:
                s, e = self.group_bounds(a)
                pairs += (e * (e + 1) - s * (s + 1)) // 2 if self.causal else (e - s) * n
        else:
            pairs = n * (n + 1) // 2 if self.causal else n * n
        return 4 * self.batch * self.heads_q * self.head_dim * pairs

    @property
    def computed_tokens(self) -> int:
        """Query rows (tokens) the job computes: N unless ``query_groups``."""
        if not self.query_groups:
            return self.seq_len
        return sum(e - s for s, e in map(self.group_bounds, self.query_groups))

    def _row_fraction(self) -> float:
        """Share of the query rows the job computes (1 unless ``query_groups``)."""
        return self.computed_tokens / self.seq_len

    @property
    def bytes_read(self) -> int:
        """Bytes read from the store: |D| passes over q, k, v, then the partials."""
        e, n, d = self.itemsize, self.seq_len, self.head_dim
        qkv = self.batch * n * d * e * (self.heads_q + 2 * self.heads_kv)
        return int(self.quorum_size * (qkv + self.partial_token_bytes * n) * self._row_fraction())

    @property
    def bytes_written(self) -> int:
        """Bytes written to the store, out and lse included (the partials policy's exact
        figure for full attention, an upper bound for causal plans)."""
        return self.policy.bytes_written(self)

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
        chosen = set(self.query_groups)
        out = []
        for s, a, bs in self.quorums.pairs(task, self.causal):
            bs = [b for b in bs if b < ne]
            if a < ne and bs and (not chosen or a in chosen):
                out.append((s, a, bs))
        return out

    def producers(self, group: int) -> list[tuple[int, int]]:
        """(task, slot) pairs holding a partial result for query ``group``."""
        if group >= self.nonempty_groups or (self.query_groups and group not in self.query_groups):
            return []
        found = self.quorums.producers(group, self.causal)
        ne, w = self.nonempty_groups, self.groups
        if ne == w or self.causal:  # causal keys of a row are <= it, so never empty
            return found
        offsets = self.quorums.key_offsets  # a producer whose keys are all empty groups is dropped
        return [(t, s) for t, s in found if any((group + o) % w < ne for o in offsets[s])]

    def direct(self, group: int) -> bool:
        """True when one task computes all of query ``group``'s row.

        That task then writes ``out``/``lse`` itself (no partial, no merge
        work): always so with W = 1, and for group 0 of causal jobs.
        """
        return len(self.producers(group)) == 1

    # -- identity -------------------------------------------------------------
    def identity(self) -> dict[str, Any]:
        """What defines the job: the problem and the planner's decision (``IDENTITY``).

        Two plans with the same identity create the same arrays with the same
        chunks and compute the same tasks, so a stored job resumes under any
        sizing (budget, margin, tasks in flight, device kind: the run policy).
        """
        d = {name: getattr(self, name) for name in IDENTITY}
        d["query_groups"] = list(self.query_groups)
        return d

    # -- (de)serialisation ----------------------------------------------------
    def to_dict(self) -> dict[str, Any]:
        """Fields plus derived figures, as plain JSON-able values."""
        d = dataclasses.asdict(self)
        for name in ("group_size", "tasks", "merges", "folds", "flops", "bytes_read", "bytes_written",
                     "output_bytes", "partial_bytes"):
            d[name] = getattr(self, name)
        d["query_groups"] = list(self.query_groups)
        return d

    def to_json(self) -> str:
        return json.dumps(self.to_dict(), indent=2, sort_keys=True)

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> Plan:
        names = {f.name for f in dataclasses.fields(cls)}
        kw = {k: v for k, v in d.items() if k in names}
        if "query_groups" in kw:
            kw["query_groups"] = tuple(int(g) for g in kw["query_groups"])
        return cls(**kw)


_CAP_SHARE, _CAP_MIN, _CAP_MAX_SHARE = 0.01, 32 * 2**20, 0.1  # the cap's headroom below the budget


def capped_bytes(budget: float) -> float:
    """What a CUDA worker's allocator cap allows under a budget of ``budget`` bytes
    (``execution/process.py::cap_device``): 1 % (at least 32 MiB, at most 10 %) less, because with
    expandable segments the reserve can pass the cap by part of a page."""
    return budget - min(max(_CAP_SHARE * budget, _CAP_MIN), _CAP_MAX_SHARE * budget)


def usable_bytes(budget: float, capped: bool) -> float:
    """The bytes tasks may predict in all under ``budget``: ``capped_bytes`` on CUDA (``capped``),
    the budget itself elsewhere."""
    return capped_bytes(budget) if capped else budget


def budget_for(total: int, capped: bool) -> int:
    """The smallest budget whose ``usable_bytes`` hold ``total`` bytes."""
    if not capped:
        return total
    candidates = (math.ceil(total / (1 - _CAP_SHARE)), total + _CAP_MIN, math.ceil(total / (1 - _CAP_MAX_SHARE)))
    return min(b for b in candidates if capped_bytes(b) >= total)  # one per branch of the headroom


def resource_bytes(need: int, budget: int, capped: bool) -> int:
    """The resource a task predicting ``need`` bytes asks for under ``budget``: ``need`` scaled by
    budget / usable, so that tasks admitted together (sum of asks <= budget) predict at most the
    usable bytes.  Without it Dask ran three 331 MB tasks at once on a worker of 1 GB (993 MB)
    under its 966 MB cap: out of memory (docs/benchmarks.md)."""
    usable = usable_bytes(budget, capped)
    return need if usable >= budget else min(budget, need * budget // int(usable))


def task_memory(
    *, group_size: int, quorum_size: int, heads_kv: int, heads_q: int,
    head_dim: int, itemsize: int, margin: float, host_staging: bool = False, query_rows: int = 0,
    stream_keys: bool = False,
) -> int:
    """Predicted peak memory (bytes) of one task; see the module docstring.

    ``host_staging``: the device is not host memory (CUDA): one query group
    is uploaded ahead, and one result (float32 at most) waits on the device
    for its copy back while the next slot computes (``transfer.py``); the
    rest of the read-ahead and write-behind stays on the host.
    ``query_rows`` (> 0): the task's rows are computed in pieces of at most that many tokens.
    ``stream_keys`` (with ``query_rows``): k and v are on the device two key blocks of
    ``query_rows`` tokens at a time, not whole.
    """
    g, hk, hq, d, e = group_size, heads_kv, heads_q, head_dim, itemsize
    r = min(g, query_rows) if query_rows > 0 else g  # query rows at once
    keys = 2 * 2 * r * hk * d * e if stream_keys and query_rows > 0 else 2 * quorum_size * g * hk * d * e
    output = r * hq * d * e + r * hq * 4
    result = r * hq * d * 4 + r * hq * 4  # float32 at most (a shared row's partial)
    q_bufs, waiting = (2, result) if host_staging else (3, 2 * result)
    total = (
        keys
        + q_bufs * r * hq * d * e
        + r * hq * (d + 1) * 4
        + output + waiting
        + 2 * r * hq * d * e
        + 2 * r * hq * d * 4
    )
    return int(total * margin) + _FIXED_OVERHEAD


def parse_query_piece(value: Any) -> int:
    """``cqsa.query-piece``: tokens (a whole number >= 0; 0 = whole rows), or "auto" (``AUTO_QUERY_PIECE``)."""
    if value == "auto":
        return AUTO_QUERY_PIECE
    if isinstance(value, str) and value.strip().isdigit():
        value = int(value)
    if isinstance(value, bool) or not isinstance(value, int) or value < 0:
        raise InvalidInputError(f"cqsa.query-piece must be 'auto' or a whole number of tokens >= 0, got {value!r}")
    return value


def _finish(plan: Plan, partials: str, limit: int | str, query_groups: Sequence[int] | None) -> Plan:
    """Resolve the partials policy and validate ``query_groups`` for a chosen plan."""
    from cqsa_dask.execution.partials import policy_names

    if partials != "auto" and partials not in policy_names():
        names = ", ".join(repr(n) for n in (*policy_names(), "auto"))
        raise InvalidInputError(f"partials must be one of {names}, got {partials!r}")
    chosen: tuple[int, ...] = ()
    if query_groups is not None:
        try:
            ne = plan.nonempty_groups
            chosen = tuple(sorted({int(g) + ne if int(g) < 0 else int(g) for g in query_groups}))
        except (TypeError, ValueError):
            raise InvalidInputError(f"query groups must be integers, got {query_groups!r}") from None
        bad = [g for g in chosen if not 0 <= g < plan.nonempty_groups]
        if not chosen or bad:
            raise InvalidInputError(
                f"query groups must be a non-empty list of groups in 0..{plan.nonempty_groups - 1} "
                f"(this plan has W={plan.groups} groups of {plan.group_size} tokens), got {list(query_groups)!r}"
            )
        plan = dataclasses.replace(plan, query_groups=chosen)
    if partials == "auto":
        partials = "bounded" if plan.partial_bytes > parse_budget(limit) else "all"
    return dataclasses.replace(plan, partials=partials)  # type: ignore[arg-type]


def _candidate_groups(seq_len: int) -> list[int]:
    out = [w for w in (1, 2, 3) if w <= max(1, seq_len)]
    q = 2
    while q * q + q + 1 <= seq_len:
        if is_prime(q):
            out.append(q * q + q + 1)
        q += 1
    return out


def _stream_pieces(query_piece: int) -> list[int]:
    """The query pieces a streamed W = 1 task tries, largest first: ``query_piece``, then halved
    while at least ``MIN_STREAM_PIECE`` tokens."""
    out = [query_piece]
    while out[-1] // 2 >= MIN_STREAM_PIECE:
        out.append(out[-1] // 2)
    return out


def _divisors_desc(n: int) -> list[int]:
    return [h for h in range(n, 0, -1) if n % h == 0]


def _heads_choices(w: int, kv_heads: int, batch: int, query_piece: int, tasks_in_flight: int) -> list[int]:
    """The kv heads per task to try, most first.  At W = 1 in pieces every task reads all its k, v
    before its first piece, and a task's read overlaps only the other tasks' kernels: so no
    fewer tasks than two per task in flight where the heads allow (4 one-head tasks at 1M under
    12 GB ran at 0.91 of SDPA; docs/benchmarks.md, "Measurements behind the defaults")."""
    heads = _divisors_desc(kv_heads)
    if w != 1 or query_piece <= 0:
        return heads
    enough = [h for h in heads if batch * (kv_heads // h) >= 2 * max(1, tasks_in_flight)]
    return enough or [1]


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
    heads_per_task: int | None = None,
    tasks_in_flight: int = 1,
    margin: float = 1.10,
    host_staging: bool = False,
    partials: str = "all",
    partials_limit: int | str = "64GiB",
    query_groups: Sequence[int] | None = None,
    query_piece: int = 0,
    stream_limit: int = 0,
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
        heads_per_task: force the kv heads per task (a divisor of Hkv), as a
            stored job's decision is kept when it resumes.
        tasks_in_flight: tasks that must fit the budget at once.
        margin: multiplicative safety factor on predicted memory.
        host_staging: tasks run on a device other than host memory (CUDA):
            read-ahead and write-behind buffers are not device memory.
        partials: "all" keeps every producer's partial result until its
            row is merged (|D| x the output on disk, fastest); "bounded"
            folds them into each row as they arrive and deletes them (about
            half the output for half-precision jobs, see ``fold.py``);
            "auto": "bounded" when "all" would exceed ``partials_limit``.
        query_groups: compute only these query groups' rows (default all;
            negative numbers count from the last non-empty group).
        query_piece: a row one task computes alone is computed in pieces of at most this many
            query tokens (0: whole); at W = 1 (every row so) the memory model counts a piece.
        stream_limit: host bytes that the k and v of the tasks in flight may take when a W = 1 task
            streams them from host memory in key blocks (0: never stream; see the module docstring).

    Raises:
        InvalidInputError: bad shapes or dtype.  BudgetError: nothing fits.
    """
    kv_heads = heads if kv_heads is None else kv_heads
    validate_problem(batch, heads, kv_heads, seq_len, head_dim)
    name = parse_dtype(dtype)
    budget_bytes = parse_budget(budget)
    if scale is None:
        scale = 1.0 / math.sqrt(head_dim)
    elif not (isinstance(scale, (int, float)) and math.isfinite(scale) and scale > 0):
        raise InvalidInputError(f"scale must be a positive finite number, got {scale!r}")
    if groups is not None and (not isinstance(groups, int) or groups < 1):
        raise InvalidInputError(f"groups must be a positive integer, got {groups!r}")
    if heads_per_task is not None and (not isinstance(heads_per_task, int) or heads_per_task < 1
                                       or kv_heads % heads_per_task):
        raise InvalidInputError(f"heads per task must divide the kv heads ({kv_heads}), got {heads_per_task!r}")
    usable = int(usable_bytes(budget_bytes, host_staging))
    rep = heads // kv_heads

    query_piece = parse_query_piece(query_piece)

    def need(w: int, hk: int, piece: int = query_piece, stream: bool = False) -> int:
        return task_memory(
            group_size=max(1, -(-seq_len // w)), quorum_size=base_set_size(w),
            heads_kv=hk, heads_q=hk * rep, head_dim=head_dim,
            itemsize=DTYPES[name], margin=margin, host_staging=host_staging,
            query_rows=piece if w == 1 else 0, stream_keys=stream,
        )

    def fits(w: int) -> Plan | None:
        """The plan at ``w`` groups whose task fits: k and v whole with ``tasks_in_flight`` tasks,
        then (W = 1) whole with one task in flight, then streamed."""
        def heads_to_try(flight: int) -> list[int]:
            return [heads_per_task] if heads_per_task else _heads_choices(w, kv_heads, batch, query_piece, flight)

        flight = max(1, tasks_in_flight)
        choices = heads_to_try(flight)
        tries = [(hk, query_piece, False, flight) for hk in choices]
        if w == 1 and query_piece > 0:
            if flight > 1:  # k and v whole, one task at a time
                tries += [(hk, query_piece, False, 1) for hk in heads_to_try(1)]
            host = [hk for hk in choices  # k and v of every task in flight in host memory
                    if 2 * seq_len * hk * head_dim * DTYPES[name] * flight <= stream_limit]
            tries += [(hk, p, True, flight) for hk in host for p in _stream_pieces(query_piece)]
        for hk, piece, stream, n in tries:
            m = need(w, hk, piece, stream)
            if m <= usable // n:
                return Plan(
                    batch=batch, heads_q=heads, heads_kv=kv_heads, seq_len=seq_len,
                    head_dim=head_dim, dtype=name, causal=bool(causal), scale=float(scale),
                    budget_bytes=budget_bytes, groups=w, quorum_size=base_set_size(w),
                    heads_per_task=hk, task_memory_bytes=m, tasks_in_flight=n,
                    host_staging=host_staging, query_piece=piece, stream_keys=stream,
                )
        return None

    candidates = [groups] if groups is not None else _candidate_groups(seq_len)
    for w in candidates:
        plan = fits(w)
        if plan is not None:
            return _finish(plan, partials, partials_limit, query_groups)
    smallest = budget_for(min(need(w, heads_per_task or 1) for w in candidates) * max(1, tasks_in_flight),
                          host_staging)
    raise BudgetError(
        f"memory budget {budget_bytes:,} bytes is too small for N={seq_len}, "
        f"D={head_dim}, {name}: the smallest plan{' with ' + str(groups) + ' groups' if groups else ''} "
        f"needs {smallest:,} bytes ({smallest / 1e9:.3g} GB); raise the budget"
    )
