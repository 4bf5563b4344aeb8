"""Shape validation, the one place that says which problems a job accepts.

Shape legend: B batch, Hq query heads, Hkv kv heads (Hq % Hkv == 0: GQA/MQA),
N tokens, D head dim (<= ``MAX_HEAD_DIM``).  q is (B, Hq, N, D); k and v are
(B, Hkv, N, D) (self-attention: the same N).
"""

from __future__ import annotations

from collections.abc import Sequence

from cqsa_dask.core.dtypes import MAX_HEAD_DIM
from cqsa_dask.core.errors import InvalidInputError

__all__ = ["validate_problem", "validate_shapes"]


def validate_problem(batch: int, heads_q: int, heads_kv: int, seq_len: int, head_dim: int) -> None:
    """Check the sizes of a problem; raise :class:`InvalidInputError` naming the bad one."""
    for name, v in (("batch", batch), ("heads", heads_q), ("kv heads", heads_kv),
                    ("sequence length", seq_len), ("head dim", head_dim)):
        if not isinstance(v, int) or isinstance(v, bool) or v < 1:
            raise InvalidInputError(f"{name} must be a positive integer, got {v!r}")
    if heads_q % heads_kv:
        raise InvalidInputError(f"query heads ({heads_q}) must be a multiple of kv heads ({heads_kv}) for GQA/MQA")
    if head_dim > MAX_HEAD_DIM:
        raise InvalidInputError(f"head dim {head_dim} is larger than the supported {MAX_HEAD_DIM}")


def validate_shapes(qs: Sequence[int], ks: Sequence[int], vs: Sequence[int]) -> None:
    """Check q (B, Hq, N, D), k and v (B, Hkv, N, D) agree; raise :class:`InvalidInputError`."""
    qs, ks, vs = tuple(qs), tuple(ks), tuple(vs)
    for name, s in (("q", qs), ("k", ks), ("v", vs)):
        if len(s) != 4:
            raise InvalidInputError(f"{name} must have 4 dimensions (B, H, N, D), got shape {s}")
    if ks != vs:
        raise InvalidInputError(f"k and v must have the same shape, got {ks} and {vs}")
    if qs[0] != ks[0] or qs[3] != ks[3]:
        raise InvalidInputError(f"q {qs} and k {ks} must agree in batch (dim 0) and head dim (dim 3)")
    if qs[2] != ks[2]:
        raise InvalidInputError(f"q and k must have the same sequence length (self-attention), got {qs[2]} and {ks[2]}")
    if qs[2] == 0:
        raise InvalidInputError("the sequence length is 0: there is nothing to attend")
    validate_problem(int(qs[0]), int(qs[1]), int(ks[1]), int(qs[2]), int(qs[3]))
