"""Generated inputs (``cqsa_dask.store.generated``): definition, determinism, store integration, whole jobs.

What is checked::

    definition      ids and table entries equal a plain-int transcription of docs/synthetic.md
    determinism     same bits on regeneration, in another process, on CUDA (gpu marker); seeds differ
    blocks          any split of heads x tokens into blocks equals the one-shot generation
    dtypes          Tk, Tv exact in every dtype; Tq is the float64 value rounded once
    store           source <-> attributes, input_info, fingerprint, refusals (one-line errors)
    jobs            cqsa_dask.run on a synthetic store (several groups, GQA, causal, three dtypes)
                    == float64 attention of the regenerated q, k, v; no input byte read

Seeds come from os.urandom and are printed (``-s``) and put in every message.
"""

from __future__ import annotations

import dataclasses
import hashlib
import itertools
import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
import zarr
from reference import check_exact

import cqsa_dask
from cqsa_dask.core.errors import InvalidInputError, StoreError
from cqsa_dask.store import generated
from cqsa_dask.store.generated import SOURCE_ATTR, SyntheticSource, create_synthetic_store, source_of
from cqsa_dask.store.jobstate import fingerprint
from cqsa_dask.store.layout import STAT_FIELDS, input_info

DTYPES = {"float32": torch.float32, "float16": torch.float16, "bfloat16": torch.bfloat16}
BITS = {torch.float32: torch.int32, torch.float16: torch.int16, torch.bfloat16: torch.int16}


def _seed(bits: int = 64) -> int:
    seed = int.from_bytes(os.urandom(8), "little") % 2**bits
    print(f"seed {seed}")
    return seed


def _bits(t: torch.Tensor) -> torch.Tensor:
    """The raw bits of a float tensor, so that equality is bitwise."""
    return t.contiguous().view(BITS[t.dtype])


def _all(src: SyntheticSource, device: str = "cpu") -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """q (B, Hq, N, D), k, v (B, Hkv, N, D) generated in one call per batch element."""
    every = slice(None)
    q = torch.stack([src.q(b, every, every, device) for b in range(src.batch)])
    k = torch.stack([src.k(b, every, every, device) for b in range(src.batch)])
    v = torch.stack([src.v(b, every, every, device) for b in range(src.batch)])
    return q, k, v


# -- the definition, transcribed from docs/synthetic.md with plain Python ints ---------------

M, MUL, STEP = 2**32 - 1, 0x045D9F3B, 0x61C88647


def _mix32(x: int) -> int:
    x &= M
    x = ((x ^ (x >> 16)) * MUL) & M
    x = ((x ^ (x >> 16)) * MUL) & M
    return x ^ (x >> 16)


def _key(*words: int) -> int:
    h = 0
    for w in words:
        h = _mix32(((h * STEP) & M) ^ w)
    return h


def _stream(c: int, i: int) -> int:
    return _mix32(i * STEP + c)


def _doc_id(src: SyntheticSource, b: int, g: int, n: int) -> int:
    return _stream(_key(src.seed & M, src.seed >> 32, 1, b, g), n) % src.vocab


def _doc_entry(src: SyntheticSource, tag: int, head: int, u: int, d: int) -> float:
    c = _key(src.seed & M, src.seed >> 32, tag, head)
    return (_stream(c, u * src.head_dim + d) % 257 - 128) / 128


@pytest.mark.parametrize("dtype", list(DTYPES))
def test_values_follow_the_documented_definition(dtype: str) -> None:
    seed = _seed()
    rng = np.random.default_rng(seed % 2**32)
    src = SyntheticSource(seq_len=2**31 + 12345, heads_q=6, heads_kv=3, head_dim=40, dtype=dtype, batch=3,
                          seed=seed, vocab=1000, gain=1.7)
    tq, tk, tv = src.tables()
    for _ in range(40):
        b, h, n = int(rng.integers(3)), int(rng.integers(6)), int(rng.integers(src.seq_len))
        g, d = h // 2, int(rng.integers(40))
        u = _doc_id(src, b, g, n)
        assert int(src.token_ids(b, g, slice(n, n + 1))[0]) == u, f"seed {seed}: id of ({b}, {g}, {n})"
        k, v, p = (_doc_entry(src, tag, head, u, d) for tag, head in ((2, g), (3, g), (4, h)))
        want_q = torch.tensor(1.7 * (k + 0.5 * p), dtype=torch.float64).to(DTYPES[dtype])
        assert tk[g, u, d].item() == k and tv[g, u, d].item() == v, f"seed {seed}: K/V[{g}][{u}, {d}]"
        assert _bits(tq[h, u, d][None]).item() == _bits(want_q[None]).item(), f"seed {seed}: Q[{h}][{u}, {d}]"
        tokens = slice(n, n + 1)
        assert src.q(b, slice(h, h + 1), tokens)[0, 0, d].item() == tq[h, u, d].item()
        assert src.k(b, slice(g, g + 1), tokens)[0, 0, d].item() == k
        assert src.v(b, slice(g, g + 1), tokens)[0, 0, d].item() == v


def test_regeneration_is_bitwise_identical() -> None:

    src = SyntheticSource(seq_len=777, heads_q=4, heads_kv=2, head_dim=24, dtype="bfloat16", batch=2, seed=_seed())
    first = _all(src)
    generated._cpu_tables.cache_clear()
    generated._tables_on.cache_clear()
    again = _all(SyntheticSource.from_attrs(src.to_attrs()))
    for a, b in zip(first, again):
        assert torch.equal(_bits(a), _bits(b)), f"{src}"


def _digest(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> str:
    h = hashlib.sha256()
    for t in (q, k, v):
        h.update(_bits(t).numpy().tobytes())
    return h.hexdigest()


def test_another_process_generates_the_same_bits() -> None:
    src = SyntheticSource(seq_len=1000, heads_q=2, heads_kv=1, head_dim=16, dtype="float16", batch=1,
                          seed=_seed(), vocab=333, gain=3.25)
    code = (
        "import hashlib, json, sys\n"
        "from cqsa_dask.store.generated import SyntheticSource\n"
        "import torch\n"
        "src = SyntheticSource.from_attrs(json.loads(sys.argv[1]))\n"
        "h = hashlib.sha256()\n"
        "for name in ('q', 'k', 'v'):\n"
        "    t = getattr(src, name)(0, slice(None), slice(None))\n"
        "    h.update(t.contiguous().view(torch.int16).numpy().tobytes())\n"
        "print(h.hexdigest())\n"
    )
    out = subprocess.run([sys.executable, "-c", code, json.dumps(src.to_attrs())], capture_output=True, text=True,
                         timeout=120, check=True).stdout.strip()
    q, k, v = (t[0] for t in _all(src))
    assert out == _digest(q, k, v), f"{src}: another process generated other values"


def test_different_seeds_give_different_inputs() -> None:
    seed = _seed()
    a = SyntheticSource(seq_len=4096, heads_q=2, heads_kv=1, head_dim=16, dtype="float32", seed=seed)
    b = SyntheticSource(seq_len=4096, heads_q=2, heads_kv=1, head_dim=16, dtype="float32", seed=(seed + 1) % 2**64)
    same_ids = (a.token_ids(0, 0, slice(None)) == b.token_ids(0, 0, slice(None))).float().mean().item()
    assert same_ids < 0.01, f"seed {seed}: {same_ids:.3f} of the token ids agree across seeds"
    for x, y in zip(_all(a), _all(b)):
        assert (x != y).float().mean().item() > 0.9, f"seed {seed}"
    # and the kv heads and batch elements of one source differ from each other
    c = SyntheticSource(seq_len=4096, heads_q=2, heads_kv=2, head_dim=16, dtype="float32", batch=2, seed=seed)
    ids = [c.token_ids(bb, g, slice(None)) for bb in range(2) for g in range(2)]
    for i in range(4):
        for j in range(i):
            assert (ids[i] == ids[j]).float().mean().item() < 0.01, f"seed {seed}: streams {i} and {j}"


@pytest.mark.parametrize("which", ["q", "k", "v"])
def test_blocks_equal_the_one_shot_generation(which: str) -> None:
    seed = _seed()
    rng = np.random.default_rng(seed % 2**32)
    src = SyntheticSource(seq_len=1537, heads_q=6, heads_kv=3, head_dim=8, dtype="bfloat16", batch=2, seed=seed,
                          vocab=97)
    heads = src.heads_q if which == "q" else src.heads_kv
    make = getattr(src, which)
    for b in range(2):
        whole = make(b, slice(None), slice(None))  # (H, N, D)
        cuts = sorted({0, src.seq_len, *(int(x) for x in rng.integers(0, src.seq_len, 5))})
        hcut = int(rng.integers(1, heads))
        for t0, t1 in itertools.pairwise(cuts):
            for h0, h1 in ((0, hcut), (hcut, heads)):
                block = make(b, slice(h0, h1), slice(t0, t1))
                assert block.shape == (h1 - h0, t1 - t0, 8)
                assert torch.equal(_bits(block), _bits(whole[h0:h1, t0:t1])), f"seed {seed}: {which} block"


def test_tables_are_exact_in_every_dtype() -> None:
    seed = _seed()
    for dtype, tdtype in DTYPES.items():
        src = SyntheticSource(seq_len=10, heads_q=4, heads_kv=2, head_dim=32, dtype=dtype, seed=seed, vocab=512,
                              gain=2.0 + (seed % 1000) / 997)
        q64, k64, v64 = src.tables64()
        tq, tk, tv = src.tables()
        assert tq.dtype == tk.dtype == tv.dtype == tdtype
        for t64, t in ((k64, tk), (v64, tv)):
            assert torch.equal(t.double(), t64), f"seed {seed}: Tk/Tv not exact in {dtype}"
            steps = t64 * 128
            assert torch.equal(steps, steps.round()) and steps.abs().max() <= 128
        assert torch.equal(_bits(tq), _bits(q64.to(tdtype))), f"seed {seed}: Tq is not float64 rounded once"
        # the queries of a kv head share its K table: gain * (K + P / 2) with |P| <= 1
        kk = k64.repeat_interleave(2, dim=0)
        assert (q64 - src.gain * kk).abs().max() <= 0.5 * src.gain * (1 + 1e-12)


# -- the store ---------------------------------------------------------------------


def test_source_round_trips_through_the_store(tmp_path: Path) -> None:
    src = SyntheticSource(seq_len=2**30, heads_q=8, heads_kv=2, head_dim=128, dtype="bf16", batch=2, seed=_seed(),
                          vocab=5000, gain=2.5)
    assert src.dtype == "bfloat16"
    attrs = json.loads(json.dumps(src.to_attrs()))
    assert attrs["kind"] == "synthetic-v1" and SyntheticSource.from_attrs(attrs) == src
    create_synthetic_store(tmp_path / "s.zarr", src)
    group = zarr.open_group(str(tmp_path / "s.zarr"), mode="r")
    assert dict(group.attrs[SOURCE_ATTR]) == src.to_attrs() and source_of(group) == src
    assert not any(name in group for name in ("q", "k", "v"))
    info = input_info(group)
    assert (info.batch, info.heads_q, info.heads_kv, info.seq_len, info.head_dim, info.dtype) == \
        (2, 8, 2, 2**30, 128, "bfloat16")
    canonical = json.dumps(src.to_attrs(), sort_keys=True, separators=(",", ":"))
    assert fingerprint(group) == "2:" + hashlib.sha256(canonical.encode()).hexdigest()
    other = dataclasses.replace(src, seed=(src.seed + 1) % 2**64)
    create_synthetic_store(tmp_path / "t.zarr", other)
    assert fingerprint(zarr.open_group(str(tmp_path / "t.zarr"), mode="r")) != fingerprint(group)


def test_create_refuses_a_path_that_is_not_empty(tmp_path: Path) -> None:
    src = SyntheticSource(seq_len=100, heads_q=1, heads_kv=1, head_dim=8, dtype="float32", seed=_seed())
    (tmp_path / "full").mkdir()
    (tmp_path / "full" / "notes.txt").write_text("keep me")
    with pytest.raises(StoreError, match="not empty") as e:
        create_synthetic_store(tmp_path / "full", src)
    assert "\n" not in str(e.value)
    assert (tmp_path / "full" / "notes.txt").read_text() == "keep me"
    (tmp_path / "empty").mkdir()
    create_synthetic_store(tmp_path / "empty", src)  # an empty directory is fine
    with pytest.raises(StoreError, match="not empty"):
        create_synthetic_store(tmp_path / "empty", src)


GOOD = {"seq_len": 100, "heads_q": 4, "heads_kv": 2, "head_dim": 16, "dtype": "float32"}
BAD = {
    "seq_len": (0, "seq_len"), "heads_q": (3, "multiple of kv heads"), "head_dim": (512, "head_dim"),
    "dtype": ("float64", "float64"), "vocab": (0, "vocab"), "gain": (-1.0, "gain"), "seed": (-1, "seed"),
    "batch": (True, "batch"),
}


@pytest.mark.parametrize("field", list(BAD))
def test_invalid_source_raises_one_line(field: str) -> None:
    value, words = BAD[field]
    with pytest.raises(InvalidInputError) as e:
        SyntheticSource(**{**GOOD, field: value})  # type: ignore[arg-type]
    assert words in str(e.value) and "\n" not in str(e.value), str(e.value)


@pytest.mark.parametrize("attrs", [
    {"kind": "synthetic-v0", **GOOD}, {**GOOD}, {"kind": "synthetic-v1", "seq_len": 100},
    {"kind": "synthetic-v1", **GOOD, "colour": "red"}, "synthetic-v1",
])
def test_malformed_attributes_are_refused(attrs: object, tmp_path: Path) -> None:
    with pytest.raises(InvalidInputError) as e:
        SyntheticSource.from_attrs(attrs)
    assert "\n" not in str(e.value)
    group = zarr.open_group(str(tmp_path / "m.zarr"), mode="w", zarr_format=3)
    group.attrs[SOURCE_ATTR] = attrs
    with pytest.raises(InvalidInputError):
        input_info(group)


def test_a_store_with_a_source_and_arrays_is_refused(tmp_path: Path) -> None:
    src = SyntheticSource(seq_len=16, heads_q=1, heads_kv=1, head_dim=8, dtype="float32", seed=_seed())
    group = create_synthetic_store(tmp_path / "both.zarr", src)
    group.create_array("q", shape=(1, 1, 16, 8), dtype="float32")
    with pytest.raises(InvalidInputError, match="not both"):
        input_info(group)


# -- whole jobs ----------------------------------------------------------------------

JOBS = {  # name: (dtype, causal, batch, Hq, Hkv, D, budget: small enough for several groups)
    "fp32-gqa": ("float32", False, 1, 4, 2, 32, "2.6MB"),
    "bf16-causal-mqa": ("bfloat16", True, 1, 4, 1, 32, "2.6MB"),
    "fp16-causal-batch2": ("float16", True, 2, 2, 2, 16, "2.4MB"),
}


@pytest.mark.parametrize("name", list(JOBS))
def test_synthetic_job_matches_float64(name: str, tmp_path: Path, client) -> None:  # type: ignore[no-untyped-def]
    dtype, causal, batch, hq, hkv, d, budget = JOBS[name]
    seed = _seed()
    src = SyntheticSource(seq_len=3000, heads_q=hq, heads_kv=hkv, head_dim=d, dtype=dtype, batch=batch, seed=seed,
                          vocab=int(seed % 3000) + 50)
    path = tmp_path / "job.zarr"
    create_synthetic_store(path, src)
    res = cqsa_dask.run(path, causal=causal, memory_budget=budget, client=client)
    ctx = f"{name}, seed {seed}, vocab {src.vocab}, W={res.plan.groups}"
    assert res.plan.groups >= 7, f"the budget should force several groups: {ctx}"
    group = zarr.open_group(str(path), mode="r")
    assert sorted(group) == ["_cqsa", "lse", "out"], f"{ctx}: unexpected arrays {sorted(group)}"
    out = torch.from_numpy(np.asarray(group["out"][...]))
    if dtype == "bfloat16":
        out = out.view(torch.bfloat16)
    lse = torch.from_numpy(np.asarray(group["lse"][...]))
    q, k, v = _all(src)
    check_exact(q, k, v, out, lse, causal=causal, scale=None, context=ctx)
    stats = np.asarray(group["_cqsa/task_stats"][...])  # (W, B, J, F)
    read = stats[..., STAT_FIELDS.index("bytes_read")]
    ran = ~np.isnan(read)
    assert ran.any() and (read[ran] == 0).all(), f"{ctx}: quorum tasks read input bytes: {read[ran]}"


@pytest.mark.gpu
@pytest.mark.parametrize("dtype", list(DTYPES))
def test_cuda_generates_the_same_bits_as_the_cpu(dtype: str) -> None:
    src = SyntheticSource(seq_len=300_000, heads_q=4, heads_kv=2, head_dim=128, dtype=dtype, seed=_seed(),
                          vocab=4096)
    for g in range(2):
        ids = src.token_ids(0, g, slice(None))
        assert torch.equal(src.token_ids(0, g, slice(None), "cuda").cpu(), ids), f"{src}"
    for which in ("q", "k", "v"):
        cpu = getattr(src, which)(0, slice(None), slice(1000, 200_000))
        gpu = getattr(src, which)(0, slice(None), slice(1000, 200_000), "cuda")
        assert gpu.is_cuda and torch.equal(_bits(gpu.cpu()), _bits(cpu)), f"{src}: {which}"
