"""Cyclic quorum sets: which task computes which pair of token groups.

Pure combinatorics (no torch, dask or zarr).  The N tokens are split into W
contiguous groups.  A base set ``D`` of residues mod W whose differences
cover every nonzero residue gives W quorums ``S_i = {i + d mod W : d in D}``.

Ownership policy (the invariant every other module relies on): every ordered
group pair (a, b) is computed by exactly one (task, slot).

- For each nonzero difference r we keep one representative (d1, d2) with
  d1 - d2 = r (mod W), chosen symmetrically: rep(-r) = (d2, d1).  Task i owns
  the ordered pair (i + d1, i + d2).  Given (a, b), r = a - b fixes the
  representative and i = a - d1 fixes the task, hence exactly once.
- The diagonal pair (a, a) belongs to slot 0 of task a - D[0].

Because ownership depends only on differences, every task has the same
*template*: for each query slot s (query group i + D[s]) the tuple of key slots
t (key groups i + D[t]) it owns.  The template has |D|^2 entries at most, so
a plan for W ~ 2e4 groups never enumerates its W^2 pairs.

::

    W = 7, D = (0, 1, 3)              task i = 2 loads groups {2, 3, 5}
    slot s  query group   key slots   key groups
    0       2             (0, 1, 2)   2 (diagonal), 3, 5
    1       3             (0, 2)      2, 5
    2       5             (0, 1)      2, 3
    -> 7 ordered pairs per task; 7 tasks x 7 = 49 pairs = 7^2, each once.

Causal attention keeps only pairs with key group < query group plus the
masked diagonal; the owner of each surviving pair is unchanged.

Base sets: Singer perfect difference sets for W = q^2 + q + 1 with q prime
(|D| = q + 1, every difference exactly once), and for any other W a
"ruler" construction {0..k-1} U {k, 2k, ...} with k = ceil(sqrt(W))
(|D| ~ 2 sqrt(W)), pruned greedily when small.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from functools import cached_property, lru_cache

__all__ = [
    "QuorumSystem",
    "base_set",
    "is_prime",
    "quorum_system",
    "singer_prime",
]


def is_prime(n: int) -> bool:
    """Return True when ``n`` is a prime (trial division; n up to ~1e12)."""
    if n < 2:
        return False
    if n % 2 == 0:
        return n == 2
    f = 3
    while f * f <= n:
        if n % f == 0:
            return False
        f += 2
    return True


def _prime_factors(n: int) -> list[int]:
    out: list[int] = []
    f = 2
    while f * f <= n:
        if n % f == 0:
            out.append(f)
            while n % f == 0:
                n //= f
        f += 1 if f == 2 else 2
    if n > 1:
        out.append(n)
    return out


def singer_prime(w: int) -> int | None:
    """Return the prime q with w = q^2 + q + 1, or None if there is none."""
    q = int((math.isqrt(4 * w - 3) - 1) // 2) if w >= 3 else 0
    if q >= 2 and q * q + q + 1 == w and is_prime(q):
        return q
    return None


# -- GF(q^3) arithmetic, elements as coefficient tuples (c0, c1, c2) ---------

_Poly = tuple[int, int, int]


def _mul(a: _Poly, b: _Poly, f: _Poly, q: int) -> _Poly:
    """Product of a and b modulo the monic cubic x^3 + f2 x^2 + f1 x + f0."""
    c = [0] * 5
    for i in range(3):
        if a[i]:
            for j in range(3):
                c[i + j] += a[i] * b[j]
    for k in (4, 3):  # x^k = x^(k-3) * (-f0 - f1 x - f2 x^2)
        t = c[k] % q
        if t:
            c[k - 3] -= t * f[0]
            c[k - 2] -= t * f[1]
            c[k - 1] -= t * f[2]
        c[k] = 0
    return (c[0] % q, c[1] % q, c[2] % q)


def _pow(a: _Poly, e: int, f: _Poly, q: int) -> _Poly:
    r: _Poly = (1, 0, 0)
    while e:
        if e & 1:
            r = _mul(r, a, f, q)
        a = _mul(a, a, f, q)
        e >>= 1
    return r


def _irreducible_cubic(q: int) -> _Poly:
    """A monic cubic without roots in GF(q), hence irreducible."""
    for f2 in range(q):
        for f1 in range(q):
            for f0 in range(1, q):
                if all((x * x * x + f2 * x * x + f1 * x + f0) % q for x in range(q)):
                    return (f0, f1, f2)
    raise AssertionError(f"no irreducible cubic over GF({q})")  # pragma: no cover


def _singer_set(q: int) -> tuple[int, ...]:
    """Singer difference set for W = q^2 + q + 1 (q prime), |D| = q + 1.

    With g primitive in GF(q^3), {i mod W : g^i in V} for a 2-dimensional
    subspace V (here: elements with no x^2 term) is a perfect difference set.
    Membership depends on i mod W only, because g^W lies in GF(q).
    """
    w = q * q + q + 1
    f = _irreducible_cubic(q)
    order = q**3 - 1
    factors = _prime_factors(order)
    g = next(
        c
        for c in ((c0, c1, c2) for c2 in range(q) for c1 in range(q) for c0 in range(q))
        if c != (0, 0, 0) and all(_pow(c, order // p, f, q) != (1, 0, 0) for p in factors)
    )
    out = []
    x: _Poly = (1, 0, 0)
    for i in range(w):
        if x[2] == 0:
            out.append(i)
        x = _mul(x, g, f, q)
    assert len(out) == q + 1, (q, len(out))
    return tuple(out)


def _covers(d: tuple[int, ...], w: int) -> bool:
    seen = {(a - b) % w for a in d for b in d}
    return len(seen) == w


def _ruler_set(w: int) -> tuple[int, ...]:
    """A relaxed difference set for any W: {0..k-1} U {jk mod W}, k=ceil(sqrt W)."""
    k = math.isqrt(w - 1) + 1 if w > 1 else 1
    d = set(range(min(k, w)))
    j = 1
    while j * k - (k - 1) <= w - 1:
        d.add((j * k) % w)
        j += 1
    out = sorted(d)
    if w <= 2048:  # greedy pruning: cheap for small W, keeps the set near-minimal
        for x in sorted(out, reverse=True):
            trial = tuple(y for y in out if y != x)
            if trial and _covers(trial, w):
                out = list(trial)
    return tuple(out)


@lru_cache(maxsize=64)
def base_set(w: int) -> tuple[int, ...]:
    """Sorted cyclic (relaxed) difference set for ``w`` groups.

    Singer (|D| = q + 1) when w = q^2 + q + 1 with q prime, otherwise the
    ruler construction (|D| <= ~2 sqrt(w)).  Every nonzero residue mod w is a
    difference of two elements.
    """
    if w < 1:
        raise ValueError(f"the number of groups must be >= 1, got {w}")
    if w <= 3:
        return tuple(range(min(w, 2)))
    q = singer_prime(w)
    d = _singer_set(q) if q is not None else _ruler_set(w)
    assert _covers(d, w), (w, d)
    return d


def base_set_size(w: int) -> int:
    """|D| for ``w`` groups without building the set when it is a Singer one."""
    if w <= 3:
        return min(w, 2)
    q = singer_prime(w)
    return q + 1 if q is not None else len(base_set(w))


@dataclass(frozen=True)
class QuorumSystem:
    """Ownership template for W groups.

    Attributes:
        groups: W, the number of token groups.
        base: the base set D (sorted residues mod W), one entry per slot.
        keys: for each slot s, the key slots t whose pair (s, t) this task owns
            (slot 0 also owns its diagonal).
    """

    groups: int
    base: tuple[int, ...]
    keys: tuple[tuple[int, ...], ...]

    @property
    def size(self) -> int:
        """|D|, the number of groups one task loads."""
        return len(self.base)

    def group(self, task: int, slot: int) -> int:
        """Group index of ``slot`` in quorum ``task``."""
        return (task + self.base[slot]) % self.groups

    def pairs(self, task: int, causal: bool) -> list[tuple[int, int, list[int]]]:
        """Owned work of ``task``: [(slot s, query group a, [key groups b ...]), ...].

        Key lists are sorted; a slot whose list is empty is omitted.  With
        ``causal``, only b < a survive, plus the diagonal b == a (which the
        kernel masks triangularly).
        """
        out = []
        for s, ts in enumerate(self.keys):
            a = self.group(task, s)
            bs = sorted(self.group(task, t) for t in ts)
            if causal:
                bs = [b for b in bs if b <= a]
            if bs:
                out.append((s, a, bs))
        return out

    def producers(self, group: int, causal: bool) -> list[tuple[int, int]]:
        """The (task, slot) pairs that write a partial result for query ``group``.

        O(|D|): a causal slot s of task i = a - D[s] owns a key b <= a iff it is
        the diagonal slot or its largest forward offset (D[t] - D[s]) mod W
        wraps past the end, i.e. is >= W - a.
        """
        out = []
        reach = self.max_offset
        for s, ts in enumerate(self.keys):
            if not ts:
                continue
            if causal and s != 0 and reach[s] < self.groups - group:
                continue
            out.append(((group - self.base[s]) % self.groups, s))
        return out

    @cached_property
    def key_offsets(self) -> tuple[tuple[int, ...], ...]:
        """Per slot s, the offsets (D[t] - D[s]) mod W of its key groups from its query group."""
        w, d = self.groups, self.base
        return tuple(tuple((d[t] - d[s]) % w for t in ts) for s, ts in enumerate(self.keys))

    @cached_property
    def max_offset(self) -> tuple[int, ...]:
        """Per slot, max over its key slots t != s of (D[t] - D[s]) mod W (0 if none)."""
        w, d = self.groups, self.base
        return tuple(
            max([(d[t] - d[s]) % w for t in ts if t != s], default=0)
            for s, ts in enumerate(self.keys)
        )


@lru_cache(maxsize=64)
def quorum_system(w: int) -> QuorumSystem:
    """Build the ownership template for ``w`` groups (see module docstring)."""
    d = base_set(w)
    rep: dict[int, tuple[int, int]] = {}
    for x in d:
        for y in d:
            r = (x - y) % w
            if r and r not in rep:
                rep[r] = (x, y)
                rep.setdefault((y - x) % w, (y, x))
    keys = []
    for s, x in enumerate(d):
        ts = [t for t, y in enumerate(d) if x != y and rep[(x - y) % w] == (x, y)]
        if s == 0:
            ts.insert(0, 0)
        keys.append(tuple(sorted(ts)))
    return QuorumSystem(groups=w, base=d, keys=tuple(keys))
