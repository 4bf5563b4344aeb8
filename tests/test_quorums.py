"""Cyclic quorum sets: every ordered pair of token groups has exactly one owner.

The invariant under test (``cqsa_dask.quorums``)::

    for all a, b in range(W)          (causal: only b <= a)
        #{(task i, slot s) : (s, a, [.. b ..]) in pairs(i)} == 1

drawn for W = 7, D = (0, 1, 3): the cell (a, b) holds the one task that
computes queries of group a against keys of group b (non-causal)::

          b=0 1 2 3 4 5 6
    a=0     0 0 6 0 4 4 6          task 2 loads {2, 3, 5}:
    a=1     0 1 1 0 1 5 5            query 2 <- keys 2, 3, 5
    a=2     6 1 2 2 1 2 6            query 3 <- keys 2, 5
    a=3     0 0 2 3 3 2 3            query 5 <- keys 2, 3
    a=4     4 1 1 3 4 4 3          7 tasks x 7 pairs = 49 = W^2
    a=5     4 5 2 2 4 5 5
    a=6     6 5 6 3 3 5 6

The checks count ownership in a (W, W) matrix built from ``pairs`` alone, so
they do not share the module's difference bookkeeping.  Brute force is
O(W^2); beyond a few hundred groups the equivalent template property is
checked instead: over all template entries (slot s, key slot t) the
differences D[s] - D[t] mod W hit every residue exactly once.
"""

from __future__ import annotations

import math
from collections import Counter

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from cqsa_dask.core.plan import make_plan
from cqsa_dask.core.quorums import QuorumSystem, base_set, is_prime, quorum_system, singer_prime

SINGER = {7: 2, 13: 3, 31: 5, 57: 7, 133: 11, 183: 13, 307: 17, 381: 19}
# Singer W of the sizes the planner picks for long sequences (q = 59, 101, 127).
LARGE_SINGER = {3541: 59, 10303: 101, 16257: 127}
# Not of the form q^2 + q + 1 with q prime (21: q = 4, 43: q = 6, 91: q = 9).
NOT_SINGER = [1, 2, 3, 4, 5, 6, 8, 12, 14, 21, 43, 91, 100, 111, 158, 400]


def _size_bound(w: int) -> int:
    return 2 * math.ceil(math.sqrt(w)) + 1


def _ownership(qs: QuorumSystem, causal: bool) -> tuple[np.ndarray, dict[int, set[tuple[int, int]]]]:
    """Count matrix c[a, b] = #(task, slot) computing (a, b), and writers per query group."""
    w = qs.groups
    count = np.zeros((w, w), dtype=np.int32)
    writers: dict[int, set[tuple[int, int]]] = {}
    for task in range(w):
        for slot, a, bs in qs.pairs(task, causal):
            assert bs, f"W={w} task {task} slot {slot}: empty key list is returned, must be omitted"
            assert bs == sorted(bs) and len(set(bs)) == len(bs), f"W={w} task {task} slot {slot}: keys {bs}"
            count[a, bs] += 1
            assert (task, slot) not in writers.setdefault(a, set())
            writers[a].add((task, slot))
    return count, writers


def _expected(w: int, causal: bool) -> np.ndarray:
    full = np.ones((w, w), dtype=np.int32)
    return np.tril(full) if causal else full


def _check_exactly_once(w: int, causal: bool) -> None:
    qs = quorum_system(w)
    count, writers = _ownership(qs, causal)
    bad = np.argwhere(count != _expected(w, causal))
    assert bad.size == 0, (
        f"W={w} causal={causal}: pairs (a, b) not computed exactly once: "
        + ", ".join(f"({a}, {b}) x{count[a, b]}" for a, b in bad[:10])
    )
    for a in range(w):
        got = qs.producers(a, causal)
        assert len(got) == len(set(got)), f"W={w} causal={causal}: duplicate producers of {a}: {got}"
        assert set(got) == writers.get(a, set()), (
            f"W={w} causal={causal} group {a}: producers {sorted(got)} != writers {sorted(writers.get(a, ()))}"
        )


def _check_quorum_locality(w: int, causal: bool) -> None:
    """Task i reads and writes only groups of its quorum S_i = {i + d mod W}."""
    qs = quorum_system(w)
    for task in range(w):
        quorum = {(task + d) % w for d in qs.base}
        for slot, a, bs in qs.pairs(task, causal):
            assert a == qs.group(task, slot) == (task + qs.base[slot]) % w
            assert a in quorum and set(bs) <= quorum, f"W={w} task {task}: {a} <- {bs} outside {sorted(quorum)}"


def _check_base_set(w: int) -> tuple[int, ...]:
    d = base_set(w)
    assert list(d) == sorted(set(d)), f"W={w}: base set {d} is not sorted and distinct"
    assert all(0 <= x < w for x in d), f"W={w}: base set {d} has residues outside [0, {w})"
    diffs = {(x - y) % w for x in d for y in d}
    assert diffs == set(range(w)), f"W={w}: residues {sorted(set(range(w)) - diffs)} are no difference of {d}"
    assert len(d) <= _size_bound(w), f"W={w}: |D| = {len(d)} > 2 ceil(sqrt W) + 1"
    return d


def _check_template(w: int) -> None:
    """Every residue r is D[s] - D[t] for exactly one template entry (s, t)."""
    qs = quorum_system(w)
    assert qs.groups == w and qs.size == len(qs.base) == len(qs.keys)
    assert 0 in qs.keys[0], f"W={w}: slot 0 does not own its diagonal"
    hits = Counter((qs.base[s] - qs.base[t]) % w for s, ts in enumerate(qs.keys) for t in ts)
    assert set(hits) == set(range(w)) and set(hits.values()) == {1}, (
        f"W={w}: template differences missing {sorted(set(range(w)) - set(hits))[:10]}, "
        f"repeated {sorted(r for r, c in hits.items() if c > 1)[:10]}"
    )


# -- every W in 1..60, the Singer sizes, and random W up to 400 -----------------

EXPLICIT_W = sorted(set(range(1, 61)) | set(SINGER))


@pytest.mark.parametrize("causal", [False, True], ids=["full", "causal"])
@pytest.mark.parametrize("w", EXPLICIT_W)
def test_every_pair_has_exactly_one_owner(w: int, causal: bool) -> None:
    _check_exactly_once(w, causal)
    _check_quorum_locality(w, causal)


@settings(max_examples=40, deadline=None)
@given(w=st.integers(1, 400), causal=st.booleans())
def test_every_pair_has_exactly_one_owner_random_w(w: int, causal: bool) -> None:
    _check_exactly_once(w, causal)
    _check_quorum_locality(w, causal)


@settings(max_examples=200, deadline=None)
@given(data=st.data(), w=st.integers(1, 400), causal=st.booleans())
def test_owner_of_one_random_pair(data: st.DataObject, w: int, causal: bool) -> None:
    """Look a random pair up from its query side: exactly one slot of one candidate task has it."""
    a = data.draw(st.integers(0, w - 1), label="a")
    b = data.draw(st.integers(0, a if causal else w - 1), label="b")
    qs = quorum_system(w)
    owners = [
        (task, s)
        for task in {(a - d) % w for d in qs.base}  # only tasks whose quorum contains a
        for s, qa, bs in qs.pairs(task, causal)
        if qa == a and b in bs
    ]
    assert len(owners) == 1, f"W={w} causal={causal}: pair ({a}, {b}) owned by {owners}"
    assert owners[0] in qs.producers(a, causal)


@settings(max_examples=100, deadline=None)
@given(data=st.data(), w=st.integers(1, 400))
def test_tasks_are_shifts_of_one_template(data: st.DataObject, w: int) -> None:
    """Non-causal work of task i is the work of task 0 shifted by i (ownership is cyclic)."""
    task = data.draw(st.integers(0, w - 1), label="task")
    qs = quorum_system(w)
    zero = {(s, a, tuple(bs)) for s, a, bs in qs.pairs(0, False)}
    shifted = {(s, (a + task) % w, tuple(sorted((b + task) % w for b in bs))) for s, a, bs in zero}
    assert {(s, a, tuple(bs)) for s, a, bs in qs.pairs(task, False)} == shifted


@pytest.mark.parametrize("w", list(range(1, 401)))
def test_base_set_differences_cover_all_residues(w: int) -> None:
    _check_base_set(w)


@settings(max_examples=60, deadline=None)
@given(w=st.integers(401, 20_000))
def test_large_w_template_covers_each_difference_once(w: int) -> None:
    """Beyond brute force: base set and ownership template of up to 2e4 groups."""
    _check_base_set(w)
    _check_template(w)


@pytest.mark.parametrize("w", [*range(1, 101), *SINGER, *LARGE_SINGER, 2048, 2049, 19_999])
def test_template_covers_each_difference_once(w: int) -> None:
    _check_template(w)


# -- Singer perfect difference sets -------------------------------------------


@pytest.mark.parametrize("w", sorted({**SINGER, **LARGE_SINGER}))
def test_singer_sets_are_perfect(w: int) -> None:
    q = {**SINGER, **LARGE_SINGER}[w]
    assert singer_prime(w) == q
    d = base_set(w)
    assert len(d) == q + 1, f"W={w}: |D| = {len(d)}, expected q + 1 = {q + 1}"
    diffs = Counter((x - y) % w for x in d for y in d if x != y)
    assert set(diffs) == set(range(1, w)), f"W={w}: missing differences {sorted(set(range(1, w)) - set(diffs))[:10]}"
    assert set(diffs.values()) == {1}, f"W={w}: repeated differences {[r for r, c in diffs.items() if c > 1][:10]}"


@pytest.mark.parametrize("w", sorted(SINGER))
def test_singer_groups_lie_in_q_plus_1_quorums(w: int) -> None:
    """Perfect case: each group in exactly q + 1 quorums, each unordered pair in exactly one."""
    qs = quorum_system(w)
    quorums = [{(i + d) % w for d in qs.base} for i in range(w)]
    per_group = Counter(g for s in quorums for g in s)
    assert set(per_group.values()) == {SINGER[w] + 1}
    together = Counter((a, b) for s in quorums for a in s for b in s if a < b)
    assert len(together) == w * (w - 1) // 2 and set(together.values()) == {1}


@pytest.mark.parametrize("w", NOT_SINGER)
def test_singer_prime_rejects_other_w(w: int) -> None:
    assert singer_prime(w) is None


@settings(max_examples=100, deadline=None)
@given(q=st.integers(2, 3000))
def test_singer_prime_inverts_q2_q_1(q: int) -> None:
    w = q * q + q + 1
    assert singer_prime(w) == (q if is_prime(q) else None)
    assert singer_prime(w + 1) is None and singer_prime(w - 1) is None


def test_is_prime_matches_sieve() -> None:
    n = 5000
    sieve = np.ones(n, dtype=bool)
    sieve[:2] = False
    for p in range(2, int(n**0.5) + 1):
        if sieve[p]:
            sieve[p * p :: p] = False
    assert [is_prime(i) for i in range(n)] == sieve.tolist()


@pytest.mark.parametrize("w", [0, -1, -7])
def test_base_set_rejects_nonpositive_w(w: int) -> None:
    with pytest.raises(ValueError, match="groups"):
        base_set(w)


# -- Plan.work / Plan.producers with empty groups (W > N) ---------------------


def _check_plan_ownership(seq_len: int, groups: int, causal: bool) -> None:
    p = make_plan(seq_len=seq_len, heads=1, head_dim=8, groups=groups, causal=causal, budget="1GB")
    ne = p.nonempty_groups
    ctx = f"N={seq_len} W={groups} causal={causal} (G={p.group_size}, {ne} nonempty)"
    bounds = [p.group_bounds(g) for g in range(groups)]
    assert bounds[0][0] == 0 and all(bounds[g][1] == bounds[g + 1][0] for g in range(groups - 1)), ctx
    assert bounds[-1][1] == seq_len, ctx
    assert [g for g in range(groups) if bounds[g][1] > bounds[g][0]] == list(range(ne)), ctx

    count = np.zeros((groups, groups), dtype=np.int32)
    writers: dict[int, set[tuple[int, int]]] = {}
    for task in range(groups):
        for slot, a, bs in p.work(task):
            assert a < ne and all(b < ne for b in bs) and bs, f"{ctx}: task {task} touches an empty group"
            count[a, bs] += 1
            writers.setdefault(a, set()).add((task, slot))
    expected = np.zeros_like(count)
    expected[:ne, :ne] = _expected(ne, causal)
    bad = np.argwhere(count != expected)
    assert bad.size == 0, f"{ctx}: pairs not covered exactly once: {[tuple(x) for x in bad[:10]]}"
    for g in range(groups):
        got = p.producers(g)
        assert len(got) == len(set(got)), f"{ctx}: duplicate producers of {g}"
        assert set(got) == writers.get(g, set()), f"{ctx} group {g}: {sorted(got)} != {sorted(writers.get(g, ()))}"
    assert all(writers.get(g) for g in range(ne)), f"{ctx}: a nonempty group has no producer"


@pytest.mark.parametrize("causal", [False, True], ids=["full", "causal"])
def test_plan_with_more_groups_than_tokens(causal: bool) -> None:
    """N=5, W=13: groups 5..12 are empty; every pair of groups 0..4 still has one owner."""
    p = make_plan(seq_len=5, heads=1, head_dim=8, groups=13, budget="1GB", causal=causal)
    assert p.groups == 13 and p.group_size == 1 and p.nonempty_groups == 5
    assert all(p.producers(g) == [] for g in range(5, 13))
    _check_plan_ownership(5, 13, causal)


@settings(max_examples=150, deadline=None)
@given(seq_len=st.integers(1, 80), groups=st.integers(1, 60), causal=st.booleans())
def test_plan_ownership_with_empty_groups(seq_len: int, groups: int, causal: bool) -> None:
    _check_plan_ownership(seq_len, groups, causal)
