"""Kernel-module helpers, property-tested: the finite check against numpy's element-wise one."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from cqsa_dask.kernels.attention import all_finite

_DTYPES = {"float32": torch.float32, "float16": torch.float16, "bfloat16": torch.bfloat16}
_SPECIAL = {"nan": float("nan"), "inf": float("inf"), "-inf": float("-inf")}


@settings(max_examples=200, deadline=None)
@given(
    dtype=st.sampled_from(sorted(_DTYPES)),
    shape=st.tuples(st.integers(1, 3), st.integers(1, 40), st.integers(1, 9)),
    big=st.booleans(),
    specials=st.lists(st.tuples(st.sampled_from(sorted(_SPECIAL)), st.floats(0, 1, exclude_max=True)), max_size=3),
    seed=st.integers(0, 2**31 - 1),
)
def test_all_finite_matches_the_elementwise_check(dtype: str, shape: tuple[int, int, int], big: bool,
                                                  specials: list[tuple[str, float]], seed: int) -> None:
    """Random values, or all near the top of the dtype's range when ``big`` (then, but for float16,
    their float32 sum overflows while every element is finite), with NaN / +-Inf at random places."""
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(shape, generator=g, dtype=torch.float64)
    top = torch.finfo(_DTYPES[dtype]).max
    x = (torch.full_like(x, top * 0.9) if big else x).to(_DTYPES[dtype])
    flat = x.view(-1)
    for name, where in specials:
        flat[int(where * flat.numel())] = _SPECIAL[name]
    want = bool(np.isfinite(x.to(torch.float64).numpy()).all())
    assert all_finite(x) == want
    if big and x.numel() > 1 and not specials and dtype != "float16":
        assert not torch.isfinite(x.sum(dtype=torch.float32)), "the big case must overflow the sum"


@pytest.mark.parametrize("dtype", sorted(_DTYPES))
def test_all_finite_on_blocks_the_size_the_io_threads_check(dtype: str) -> None:
    """Blocks of 32K-1M elements (vectorised reductions, an odd tail): a NaN or an Inf anywhere, the
    first and last element included, is found; a block without one passes."""
    seed = int(torch.randint(0, 2**31 - 1, ()))
    print(f"seed {seed}")
    g = torch.Generator().manual_seed(seed)
    for n in (32 * 1024 + 7, 1024 * 1024):
        x = torch.randn(n, generator=g).to(_DTYPES[dtype])
        assert all_finite(x)
        for where in (0, n - 1, int(torch.randint(1, n - 1, (), generator=g))):
            for name, value in _SPECIAL.items():
                y = x.clone()
                y[where] = value
                assert not all_finite(y.view(1, 1, -1)), (n, where, name)
