"""Generated inputs: q, k, v computed group by group from a seed, never stored.

A synthetic store is a Zarr v3 group whose attribute ``cqsa_source`` holds
a :class:`SyntheticSource` (``to_attrs()``) and which has no q, k, v
arrays.  Tasks generate the blocks they need, on their own device, so a
2**30-token job needs no input files (docs/synthetic.md).

Definition (everything is 32-bit unsigned integer arithmetic carried in
int64, every intermediate below 2**63, so the values are bitwise the same
on CPU and CUDA and in every process; no random number generator)::

    mix32(x)     = x & M;  x = ((x ^ (x >> 16)) * MUL) & M;  x = ((x ^ (x >> 16)) * MUL) & M;  x ^ (x >> 16)
    key(w1..wk)  = h = 0;  for each word w: h = mix32(((h * STEP) & M) ^ w)
    stream(c, i) = mix32(i * STEP + c)                          i < 2**32, c < 2**32
        M = 2**32 - 1,  MUL = 0x045D9F3B,  STEP = 0x61C88647,  s0, s1 = seed & M, seed >> 32

    id(b, g, n)  = stream(key(s0, s1, 1, b, g), n) mod vocab   token of position n, batch b, kv head g
    K[g][u, d]   = (stream(key(s0, s1, 2, g), u * D + d) mod 257 - 128) / 128     float64, exact
    V[g][u, d]   = the same with tag 3;   P[h][u, d]: the same with tag 4 (h a query head)
    Q[h]         = gain * (K[g(h)] + 0.5 * P[h])                g(h) = h // (Hq / Hkv)

    tables (vocab, D), rounded once to the job dtype:  Tq[h], Tk[g], Tv[g]
    q[b, h, n] = Tq[h][id(b, g(h), n)]    k[b, g, n] = Tk[g][id(b, g, n)]    v[b, g, n] = Tv[g][id(b, g, n)]

A query therefore attends strongly to the keys carrying its own token id
(its logit with them is about gain * |K[g][u]|^2 * scale), weakly to the
rest: peaky attention, as on real text.  Tk and Tv are exact in every
dtype (multiples of 1/128 of magnitude <= 1); Tq is the float64 value
rounded once.  Because every key vector is a table row picked by its id, a
sum over keys is a sum over the vocab weighted by how many keys carry each
id, which is what makes ``cqsa verify`` fast at N = 2**30 (verify.py).

The tables are built once per process (CPU, float64, then rounded) and
copied once per device; q, k, v blocks are gathers from them.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import asdict, dataclass, fields
from functools import lru_cache
from typing import Any, TypeVar

import torch
import zarr

from cqsa_dask.core.dtypes import MAX_HEAD_DIM, parse_dtype
from cqsa_dask.core.errors import InvalidInputError, StoreError

__all__ = [
    "KIND",
    "SOURCE_ATTR",
    "SyntheticSource",
    "create_synthetic_store",
    "key",
    "mix32",
    "source_of",
    "stream",
]

#: Store attribute holding a synthetic source; its ``kind`` tag.
SOURCE_ATTR = "cqsa_source"
KIND = "synthetic-v1"

M = 0xFFFFFFFF
MUL = 0x045D9F3B  # odd, < 2**31: a product of it and a 32-bit value stays below 2**63
STEP = 0x61C88647  # odd, < 2**31 (2**32 minus the golden-ratio constant 0x9E3779B9)
_TAG_ID, _TAG_K, _TAG_V, _TAG_P = 1, 2, 3, 4
MAX_SEQ_LEN = 2**32  # positions are 32-bit words
MAX_VOCAB = 2**16  # keeps the tables small: (Hq + 2 Hkv) * vocab * D elements per process and device
MAX_GAIN = 1000.0

_X = TypeVar("_X", int, torch.Tensor)


def mix32(x: _X) -> _X:
    """The 32-bit finaliser of the definition, on a Python int or an int64 tensor.

    ``x`` must be in [0, 2**63); the result is in [0, 2**32).
    """
    x = x & M
    x = ((x ^ (x >> 16)) * MUL) & M
    x = ((x ^ (x >> 16)) * MUL) & M
    return x ^ (x >> 16)


def key(*words: int) -> int:
    """The 32-bit key of a stream, from words in [0, 2**32)."""
    h = 0
    for w in words:
        h = mix32(((h * STEP) & M) ^ w)
    return h


def stream(c: int, i: torch.Tensor) -> torch.Tensor:
    """Element ``i`` (int64 tensor, values in [0, 2**32)) of the stream with key ``c``.

    Works in place on ``i`` (which it returns), to keep ``cqsa verify``'s
    pass over 2**30 positions cheap.  i * STEP + c < 2**32 * 2**31 - 2**31 < 2**63.
    """
    x = i.mul_(STEP).add_(c).bitwise_and_(M)
    x.bitwise_xor_(x >> 16).mul_(MUL).bitwise_and_(M)
    x.bitwise_xor_(x >> 16).mul_(MUL).bitwise_and_(M)
    return x.bitwise_xor_(x >> 16)


def _check_int(name: str, value: Any, low: int, high: int) -> int:
    if isinstance(value, bool) or not isinstance(value, int):
        raise InvalidInputError(f"synthetic source: {name} must be an integer, got {value!r}")
    if not low <= value <= high:
        raise InvalidInputError(f"synthetic source: {name} must be in [{low}, {high}], got {value}")
    return value


@dataclass(frozen=True)
class SyntheticSource:
    """Inputs q (batch, heads_q, seq_len, head_dim), k, v (batch, heads_kv, seq_len, head_dim).

    ``dtype``: float32, float16 or bfloat16 (any spelling ``parse_dtype``
    accepts).  ``seed``: [0, 2**64).  ``vocab``: number of distinct token
    ids, [1, 2**16].  ``gain``: query scale, [0, 1000]; with gain 2 and
    D = 128, a query's logit with a key of its own token is about 7.5
    above the rest.  Invalid values raise :class:`InvalidInputError`.
    """

    seq_len: int
    heads_q: int
    heads_kv: int
    head_dim: int
    dtype: str
    batch: int = 1
    seed: int = 0
    vocab: int = 4096
    gain: float = 2.0

    def __post_init__(self) -> None:
        _check_int("seq_len", self.seq_len, 1, MAX_SEQ_LEN)
        _check_int("heads_q", self.heads_q, 1, M)
        _check_int("heads_kv", self.heads_kv, 1, M)
        _check_int("head_dim", self.head_dim, 1, MAX_HEAD_DIM)
        _check_int("batch", self.batch, 1, M)
        _check_int("seed", self.seed, 0, 2**64 - 1)
        _check_int("vocab", self.vocab, 1, MAX_VOCAB)
        if self.heads_q % self.heads_kv:
            raise InvalidInputError(f"synthetic source: query heads ({self.heads_q}) must be a multiple of kv "
                                    f"heads ({self.heads_kv})")
        gain = self.gain
        if isinstance(gain, bool) or not isinstance(gain, (int, float)) or not 0 <= gain <= MAX_GAIN:
            raise InvalidInputError(f"synthetic source: gain must be a number in [0, {MAX_GAIN:g}], got {gain!r}")
        object.__setattr__(self, "gain", float(gain))
        object.__setattr__(self, "dtype", parse_dtype(self.dtype))

    # -- attributes ------------------------------------------------------------------

    def to_attrs(self) -> dict[str, Any]:
        """The JSON-able description kept in the store (attribute ``cqsa_source``)."""
        return {"kind": KIND, **asdict(self)}

    @classmethod
    def from_attrs(cls, attrs: Any) -> SyntheticSource:
        """The source described by ``attrs`` (as ``to_attrs`` wrote it); InvalidInputError if malformed."""
        if not isinstance(attrs, dict) or attrs.get("kind") != KIND:
            got = attrs.get("kind") if isinstance(attrs, dict) else type(attrs).__name__
            raise InvalidInputError(f"{SOURCE_ATTR} must be a {{'kind': {KIND!r}, ...}} mapping, got kind {got!r}; "
                                    "this engine knows only that kind")
        names = {f.name for f in fields(cls)}
        required = {f.name for f in fields(cls) if f.name not in ("batch", "seed", "vocab", "gain")}
        extra, missing = set(attrs) - names - {"kind"}, required - set(attrs)
        if extra or missing:
            raise InvalidInputError(f"{SOURCE_ATTR} is malformed: missing {sorted(missing)}, unknown {sorted(extra)}")
        return cls(**{k: v for k, v in attrs.items() if k != "kind"})

    # -- generation ------------------------------------------------------------------

    @property
    def rep(self) -> int:
        """Query heads per kv head: query head h reads kv head h // rep."""
        return self.heads_q // self.heads_kv

    def _seed_words(self) -> tuple[int, int]:
        return self.seed & M, self.seed >> 32

    def token_ids(self, b: int, g: int, tokens: slice, device: torch.device | str | None = None) -> torch.Tensor:
        """Token ids (T,) int64 of positions ``tokens`` of batch ``b``, kv head ``g``."""
        _check_int("batch index", b, 0, self.batch - 1)
        _check_int("kv head", g, 0, self.heads_kv - 1)
        t0, t1 = _bounds(tokens, self.seq_len, "tokens")
        pos = torch.arange(t0, t1, dtype=torch.int64, device=device)
        return stream(key(*self._seed_words(), _TAG_ID, b, g), pos).remainder_(self.vocab)

    def tables(self, device: torch.device | str | None = None) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """Tq (Hq, vocab, D), Tk and Tv (Hkv, vocab, D) in the job dtype on ``device`` (cached)."""
        return _tables_on(self, str(_device(device)))

    def tables64(self) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """The float64 tables Q (Hq, vocab, D), K, V (Hkv, vocab, D) before rounding (not cached)."""
        s0, s1 = self._seed_words()

        def table(tag: int, head: int) -> torch.Tensor:  # (vocab, D) float64, k / 128 with |k| <= 128
            i = torch.arange(self.vocab * self.head_dim, dtype=torch.int64)  # i = u * D + d
            k = stream(key(s0, s1, tag, head), i).remainder_(257).sub_(128)
            return (k.double() / 128).view(self.vocab, self.head_dim)

        k = torch.stack([table(_TAG_K, g) for g in range(self.heads_kv)])
        v = torch.stack([table(_TAG_V, g) for g in range(self.heads_kv)])
        p = torch.stack([table(_TAG_P, h) for h in range(self.heads_q)])
        q = self.gain * (k.repeat_interleave(self.rep, dim=0) + 0.5 * p)  # (Hq, vocab, D)
        return q, k, v

    def q(self, b: int, heads: slice, tokens: slice, device: torch.device | str | None = None) -> torch.Tensor:
        """q[b, heads, tokens]: (h, T, D) over query heads, in the job dtype on ``device``."""
        h0, h1 = _bounds(heads, self.heads_q, "query heads")
        return self._gather(0, b, range(h0, h1), [h // self.rep for h in range(h0, h1)], tokens, device)

    def k(self, b: int, heads: slice, tokens: slice, device: torch.device | str | None = None) -> torch.Tensor:
        """k[b, heads, tokens]: (h, T, D) over kv heads, in the job dtype on ``device``."""
        g0, g1 = _bounds(heads, self.heads_kv, "kv heads")
        return self._gather(1, b, range(g0, g1), list(range(g0, g1)), tokens, device)

    def v(self, b: int, heads: slice, tokens: slice, device: torch.device | str | None = None) -> torch.Tensor:
        """v[b, heads, tokens]: (h, T, D) over kv heads, in the job dtype on ``device``."""
        g0, g1 = _bounds(heads, self.heads_kv, "kv heads")
        return self._gather(2, b, range(g0, g1), list(range(g0, g1)), tokens, device)

    def _gather(self, which: int, b: int, rows: range, kv_heads: list[int], tokens: slice,
                device: torch.device | str | None) -> torch.Tensor:
        """(h, T, D): row id(b, kv_heads[i], t) of table ``which`` (0 q, 1 k, 2 v) at head rows[i]."""
        dev = _device(device)
        t0, t1 = _bounds(tokens, self.seq_len, "tokens")
        table = self.tables(dev)[which]  # (H, vocab, D)
        if not rows:
            return table.new_empty((0, t1 - t0, self.head_dim))
        ids = {g: self.token_ids(b, g, tokens, dev) for g in sorted(set(kv_heads))}  # (T,) each
        heads = torch.arange(rows.start, rows.stop, device=dev)[:, None]  # (h, 1)
        return table[heads, torch.stack([ids[g] for g in kv_heads])]  # (h, T, D)

def _bounds(s: slice, n: int, what: str) -> tuple[int, int]:
    """(start, stop) of a contiguous slice within [0, n]; InvalidInputError otherwise."""
    start, stop, step = s.indices(n)
    if step != 1 or (s.start is not None and not 0 <= s.start <= n) or (s.stop is not None and not 0 <= s.stop <= n):
        raise InvalidInputError(f"{what} {s} must be a contiguous range within [0, {n}]")
    return start, max(start, stop)


def _device(device: torch.device | str | None) -> torch.device:
    dev = torch.device("cpu" if device is None else device)
    if dev.type == "cuda" and dev.index is None:
        dev = torch.device("cuda", torch.cuda.current_device())
    return dev


@lru_cache(maxsize=8)
def _cpu_tables(source: SyntheticSource) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Tq, Tk, Tv: the float64 tables rounded once to the job dtype, built once per process."""
    dtype = getattr(torch, source.dtype)
    return tuple(t.to(dtype) for t in source.tables64())  # type: ignore[return-value]


@lru_cache(maxsize=8)
def _tables_on(source: SyntheticSource, device: str) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """The tables on ``device`` ("cpu", "cuda:0", ...), copied once per process and device."""
    tables = _cpu_tables(source)
    if device == "cpu":
        return tables
    return tuple(t.to(device) for t in tables)  # type: ignore[return-value]


def source_of(group: zarr.Group) -> SyntheticSource | None:
    """The synthetic source of a store, or None when it holds stored inputs."""
    attrs = group.attrs.get(SOURCE_ATTR)
    if attrs is None:
        return None
    both = [n for n in ("q", "k", "v") if n in group]
    if both:
        raise InvalidInputError(f"the store has both a {SOURCE_ATTR} attribute and arrays {both}: a store holds "
                                "generated or stored inputs, not both; remove one")
    return SyntheticSource.from_attrs(dict(attrs) if isinstance(attrs, dict) else attrs)


def create_synthetic_store(path: Any, source: SyntheticSource,
                           storage_options: Mapping[str, Any] | None = None) -> zarr.Group:
    """Create a synthetic store at ``path`` (a new or empty directory, a URL with
    ``storage_options``, or a zarr Store: ``location.parse_store``) and return it.

    Refuses (:class:`StoreError`) to touch a path that exists and is not empty,
    or a URL or Store that already holds a Zarr node.
    """
    from cqsa_dask.store.location import parse_store

    location = parse_store(path, storage_options)
    try:
        group = location.create_group()
        group.attrs[SOURCE_ATTR] = source.to_attrs()
    except OSError as e:
        if isinstance(e, StoreError):
            raise
        raise StoreError(f"cannot create the synthetic store {location.describe()}: {e}") from None
    return group
