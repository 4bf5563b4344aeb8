"""Forward-only calls in an autograd graph: the engine computes no gradients, and says so.

    forward_only(fn, message, q, k, v)   fn(q, k, v) on detached inputs; its outputs stay
                                         connected to q, k, v, and a backward that reaches
                                         them raises NotImplementedError(message)

Returning detached outputs instead would let a backward through a model run on
and leave the attention's share of every gradient out, without a word.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import torch

Outputs = torch.Tensor | tuple[torch.Tensor, ...]


class _ForwardOnly(torch.autograd.Function):
    @staticmethod
    def forward(ctx: Any, fn: Callable[..., Outputs], message: str, q: torch.Tensor, k: torch.Tensor,
                v: torch.Tensor) -> Outputs:
        ctx.message = message
        return fn(q.detach(), k.detach(), v.detach())

    @staticmethod
    def backward(ctx: Any, *grad: torch.Tensor) -> Any:
        raise NotImplementedError(ctx.message)


def forward_only(fn: Callable[..., Outputs], message: str, q: torch.Tensor, k: torch.Tensor,
                 v: torch.Tensor) -> Outputs:
    """``fn(q, k, v)`` (a tensor or a tuple of tensors); when gradients are enabled and q, k or v
    requires them, the outputs require them too and a backward through them raises
    ``NotImplementedError(message)``.  Otherwise plain ``fn(q, k, v)``."""
    if torch.is_grad_enabled() and any(t.requires_grad for t in (q, k, v)):
        return _ForwardOnly.apply(fn, message, q, k, v)  # type: ignore[no-any-return]
    return fn(q, k, v)
