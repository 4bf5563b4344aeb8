"""What an analysis of a finished job computes, where it keeps it, and what one task needs.

Pure arithmetic over the job's :class:`~cqsa_dask.core.plan.Plan` (no torch,
dask or zarr).  The analysis visits the job's quorum tasks again: task i
owns the same (query group a, key group b) pairs, so every pair is computed
once.  Its results per task::

    entropy partial  [slot s,     batch, heads, tokens of a = i + D[s]]   (row sums of the pairs it owns)
    mass partial     [key slot t, batch, heads, tokens of b = i + D[t]]   (column sums)
    block partial    [task i,     batch, heads, R, R]                     (with a resolution)

For a fixed slot (key slot) the group determines the task, so every chunk
has one writer.  Row a's producers are the job's (``Plan.producers``);
column b's are ``column_producers`` (at most |D|: tasks b - D[t]).
"""

from __future__ import annotations

from dataclasses import dataclass

from cqsa_dask.core.errors import InvalidInputError
from cqsa_dask.core.plan import Plan

__all__ = ["ANALYSIS_KERNELS", "Resolution", "analysis_memory", "check_analysis_kernel", "column_producers", "feature_width", "key_slot", "parse_resolution"]

ANALYSIS_KERNELS = ("auto", "fused", "attention")  # cqsa.analysis-kernel
LSE_FEATURES = 3  # columns carrying -lse / scale in three parts (pairs.query_features)
_FIXED_OVERHEAD = 2 * 2**20  # bytes: kernel workspace, small buffers


@dataclass(frozen=True)
class Resolution:
    """The block map's grid: ``blocks`` blocks of ``block_size`` tokens (the last may be shorter)."""

    blocks: int
    block_size: int

    def bounds(self, x: int, seq_len: int) -> tuple[int, int]:
        """Tokens [start, stop) of block ``x``."""
        return min(x * self.block_size, seq_len), min((x + 1) * self.block_size, seq_len)


def parse_resolution(resolution: object, seq_len: int) -> Resolution | None:
    """None, or R in [1, N] -> the grid of R blocks of ceil(N / R) tokens; else :class:`InvalidInputError`."""
    if resolution is None:
        return None
    if isinstance(resolution, bool) or not isinstance(resolution, int) or not 1 <= resolution <= seq_len:
        raise InvalidInputError(f"resolution must be an integer in 1..{seq_len} (the job's tokens), "
                                f"got {resolution!r}")
    return Resolution(resolution, -(-seq_len // resolution))


def check_analysis_kernel(how: object) -> str:
    """``cqsa.analysis-kernel`` = ``how`` if it is one of ``ANALYSIS_KERNELS``; else :class:`InvalidInputError`."""
    if how not in ANALYSIS_KERNELS:
        raise InvalidInputError(f"cqsa.analysis-kernel must be auto, fused or attention, got {how!r}")
    return str(how)


def feature_width(device_type: str, head_dim: int) -> int:
    """D', the width of the mass pass's queries and keys: D plus the three lse columns, padded with zeros.

    CUDA: to a multiple of 64 while that stays <= 256 (cuDNN's fast widths; timings in
    docs/analysis.md); elsewhere to a multiple of 8 (the CPU kernel's time grows with the width).
    """
    need = head_dim + LSE_FEATURES
    wide = -(-need // 64) * 64
    return wide if device_type == "cuda" and wide <= 256 else -(-need // 8) * 8


def key_slot(plan: Plan, task: int, group: int) -> int:
    """The slot t of task ``task`` whose group is ``group`` (group = task + D[t] mod W)."""
    q = plan.quorums
    return q.base.index((group - task) % plan.groups)


def column_producers(plan: Plan, group: int) -> list[tuple[int, int]]:
    """(task, key slot t) pairs that own a pair with key group ``group``: O(|D|^2)."""
    q, w, ne = plan.quorums, plan.groups, plan.nonempty_groups
    if group >= ne:
        return []
    out = []
    for t in range(q.size):
        task = (group - q.base[t]) % w
        for s, ts in enumerate(q.keys):
            a = (task + q.base[s]) % w
            if t in ts and a < ne and (not plan.causal or a >= group):
                out.append((task, t))
                break
    return out


def analysis_memory(plan: Plan, resolution: Resolution | None, margin: float = 1.10) -> int:
    """Predicted peak device memory (bytes) of one analysis task.

    G tokens per group, hk / hq kv / query heads per task, e element size,
    D' = ``feature_width`` on CUDA (the wider, so an upper bound):

        k of the |D| loaded groups        |D| G hk D e        (resident; v is not needed)
        q of the slot, its lse            G hq D e + G hq 4
        q', k', one-hot values, output    4 G hq D' e + G hq D' 4 (output in float32)
        entropy pass: output, float32     G hq D e + 2 G hq D 4
        mass accumulators (per key group) |D| G hq 4
        block accumulator                 hq R^2 8            (with a resolution)
        total x margin + 2 MiB
    """
    g, hk, hq, d, e = plan.group_size, plan.heads_per_task, plan.q_heads_per_task, plan.head_dim, plan.itemsize
    dd, s = max(feature_width("cuda", d), feature_width("cpu", d)), plan.quorum_size
    total = (s * g * hk * d * e + g * hq * d * e + g * hq * 4 + 4 * g * hq * dd * e + g * hq * dd * 4
             + g * hq * d * e + 2 * g * hq * d * 4 + s * g * hq * 4)
    if resolution is not None:
        total += hq * resolution.blocks**2 * 8
    return int(total * margin) + _FIXED_OVERHEAD
