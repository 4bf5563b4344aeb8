"""attention() in an autograd graph: the forward is exact, a backward through it raises.

    q, k, v with requires_grad    out, lse = attention(...)      out.requires_grad; exact against float64
    loss = f(out) + g(q)          loss.backward()                NotImplementedError "no backward" (the
                                                                 attention's share is never dropped silently)
    under torch.no_grad()         out.requires_grad is False     nothing recorded
"""

from __future__ import annotations

from collections.abc import Callable

import pytest
import torch
from conftest import Inputs
from distributed import Client
from reference import check_exact

import cqsa_dask


@pytest.mark.parametrize("needs_grad", ["q", "k", "v", "qkv"])
def test_a_backward_through_attention_raises_instead_of_dropping_its_gradient(
        client: Client, make_inputs: Callable[..., Inputs], needs_grad: str) -> None:
    inp = make_inputs(1, 4, 2, 700, 16, magnitude=4.0)  # GQA, uneven groups, large logits
    q, k, v = (t.clone().requires_grad_(name in needs_grad) for name, t in zip("qkv", (inp.q, inp.k, inp.v)))
    out, lse = cqsa_dask.attention(q, k, v, causal=True, memory_budget="3MB", return_lse=True, client=client)
    assert out.requires_grad and lse.requires_grad
    check_exact(inp.q, inp.k, inp.v, out.detach(), lse.detach(), causal=True, scale=None, context=inp.ctx)
    leaf = dict(zip("qkv", (q, k, v)))[needs_grad[0]]
    loss = (out * torch.randn_like(out)).sum() + (leaf * 2.0).sum()  # another path to the same leaf
    with pytest.raises(NotImplementedError, match="attention computes the forward pass only: it has no backward"):
        loss.backward()
    assert leaf.grad is None  # no partial gradient left behind


def test_without_gradients_nothing_is_recorded(client: Client, make_inputs: Callable[..., Inputs]) -> None:
    inp = make_inputs(1, 2, 2, 300, 8)
    q = inp.q.clone().requires_grad_()
    with torch.no_grad():
        out = cqsa_dask.attention(q, inp.k, inp.v, memory_budget="3MB", client=client)
    assert not out.requires_grad and out.grad_fn is None
    check_exact(inp.q, inp.k, inp.v, out, None, causal=False, scale=None, context=inp.ctx)
