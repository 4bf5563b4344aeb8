"""Hugging Face transformers backend: ``attn_implementation="cqsa"`` runs exact attention on the engine.

``register()`` adds one attention function to transformers' ``AttentionInterface``
and transformers' own SDPA mask builder, under the same name, to its
``AttentionMaskInterface``.  That mask builder returns None for a plain causal
(or full) pattern, so a causal model signals causality through the module's
``is_causal`` flag and no N x N mask is ever built; anything else (padding of
unequal lengths, packed sequences, sliding windows longer than the input, a
cache offset) arrives as a materialised mask.  A materialised mask that is
the plain causal pattern (older transformers build some) is accepted as causal.

Each call takes one of three routes (``route``)::

    queries < min_tokens  ─────────────────────────────> "sdpa"    transformers' SDPA function,
    (decode steps against a KV cache, short prompts)                 same tensors, same mask
    on a CUDA device and one task holds it all (W = 1) ─> "device"  the engine's kernel in this process
    otherwise ──────────────────────────────────────────> "engine"  cqsa_dask.attention() in the session

"device" exists because for such a call the engine would run that very task
after copying q, k, v to host memory and a store and the output back: on the
device the inputs already are, the same kernel does it without the round trip.

Contract (transformers' attention functions): ``fn(module, query, key, value,
attention_mask, scaling=None, dropout=0.0, **kwargs)`` with query (B, Hq, N, D),
key and value (B, Hkv, S, D), Hq a multiple of Hkv (GQA: k and v are not
repeated); returns (out (B, N, Hq, D) contiguous, None).

What the engine cannot compute is refused with :class:`NotImplementedError`
naming the model setting, never approximated: any other mask, dropout in
training, logit soft-capping, attention sinks, position biases, a sliding
window shorter than the input, cross-attention or a longer KV cache.  The
engine has no backward: a forward with gradients enabled works, a backward
through it raises.
"""

from __future__ import annotations

import atexit
import dataclasses
import functools
import logging
from collections.abc import Callable
from typing import Any, Literal

import torch

from cqsa_dask import config
from cqsa_dask.client.api import attention, plan_options
from cqsa_dask.client.forward_only import forward_only
from cqsa_dask.client.session import Session, current_session
from cqsa_dask.core.errors import InvalidInputError
from cqsa_dask.core.plan import Plan, make_plan
from cqsa_dask.core.units import parse_budget
from cqsa_dask.kernels.attention import attend, select_kernel

__all__ = ["Backend", "Route", "register", "route", "unregister"]

Route = Literal["sdpa", "device", "engine"]

MIN_TRANSFORMERS = (4, 53)

log = logging.getLogger(__name__)


@dataclasses.dataclass(frozen=True)
class Options:
    """What ``register`` was given (None: the session's or the configuration's)."""

    memory_budget: int | str | None
    client: Any
    scheduler: str | None
    min_tokens: int


class Backend:
    """The registered attention function and its settings.

    Without a current :class:`~cqsa_dask.Session`, the first call that needs the
    engine opens one from ``client``/``scheduler``/``memory_budget`` and keeps
    it until :meth:`close` (or ``unregister``); within a session the session's
    cluster and work directory are used, and ``memory_budget``, when given,
    overrides the session's.
    """

    def __init__(self, name: str, options: Options):
        self.name = name
        self.options = options
        self._own: Session | None = None
        self.calls: dict[Route, int] = {"sdpa": 0, "device": 0, "engine": 0}

    def __call__(self, module: torch.nn.Module, query: torch.Tensor, key: torch.Tensor, value: torch.Tensor,
                 attention_mask: torch.Tensor | None, scaling: float | None = None, dropout: float = 0.0,
                 **kwargs: Any) -> tuple[torch.Tensor, None]:
        """transformers' attention contract; see the module docstring."""
        if query.shape[2] < self.options.min_tokens:
            self.calls["sdpa"] += 1
            return _sdpa(module, query, key, value, attention_mask, scaling=scaling, dropout=dropout, **kwargs)
        causal = _refuse_unsupported(module, query, key, attention_mask, dropout, kwargs)
        if causal and key.shape[2] > query.shape[2]:  # an empty static cache's prefill: keys past N unused
            key, value = key[:, :, : query.shape[2]], value[:, :, : query.shape[2]]
        way = route(query, key, min_tokens=self.options.min_tokens, memory_budget=self._budget(), causal=causal)
        self.calls[way] += 1
        log.debug("%s: %s of %s, %d queries, %d keys", self.name, way, type(module).__name__, query.shape[2],
                  key.shape[2])
        scale = float(scaling) if scaling is not None else None
        compute = on_device if way == "device" else self._engine
        fn = functools.partial(compute, scale=scale, causal=causal)
        out = _tensor(forward_only(fn, NO_BACKWARD, query, key, value))  # (B, Hq, N, D)
        return out.transpose(1, 2).contiguous(), None  # (B, N, Hq, D)

    def _budget(self) -> int | str:
        s = current_session()
        for b in (self.options.memory_budget, s.memory_budget if s is not None else None):
            if b is not None:
                return b
        return "1GB"  # attention()'s own default

    def _engine(self, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, *, scale: float | None,
                causal: bool) -> torch.Tensor:
        if current_session() is not None:
            return _tensor(attention(q, k, v, causal=causal, scale=scale, memory_budget=self.options.memory_budget))
        if self._own is None or not self._own.is_open:
            o = self.options
            self._own = Session(client=o.client, scheduler=o.scheduler, memory_budget=o.memory_budget).open()
        with self._own.current():
            return _tensor(attention(q, k, v, causal=causal, scale=scale))

    def close(self) -> None:
        """Close the session this backend opened for itself, if any."""
        if self._own is not None:
            self._own.close()
            self._own = None


def _tensor(x: torch.Tensor | tuple[torch.Tensor, ...]) -> torch.Tensor:
    assert isinstance(x, torch.Tensor)
    return x


NO_BACKWARD = ("the cqsa attention backend computes forward passes only (prefill, generation, scoring): it has "
               "no backward; train with attn_implementation='sdpa' or 'eager', or run under torch.no_grad()")


def route(query: torch.Tensor, key: torch.Tensor, *, min_tokens: int, memory_budget: int | str,
          causal: bool = True) -> Route:
    """Which route a call with query (B, Hq, N, D) and key (B, Hkv, S, D) takes.

    "sdpa" below ``min_tokens`` queries; "device" when the inputs are on a CUDA
    device and the engine's plan under ``memory_budget`` is a single group
    with k and v whole on the device (one task holds the whole call); "engine" otherwise.
    """
    if query.shape[2] < min_tokens:
        return "sdpa"
    plan = _plan(query, key, memory_budget, causal) if query.device.type == "cuda" else None
    if plan is not None and plan.groups == 1 and not plan.stream_keys:
        return "device"
    return "engine"


def _plan(query: torch.Tensor, key: torch.Tensor, memory_budget: int | str, causal: bool) -> Plan:
    """The engine's plan for query (B, Hq, N, D) and key (B, Hkv, N, D) on this machine."""
    b, hq, n, d = query.shape
    return make_plan(seq_len=n, heads=hq, kv_heads=key.shape[1], head_dim=d, batch=b, dtype=str(query.dtype),
                     causal=causal, budget=memory_budget, **plan_options())


def on_device(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, *, scale: float | None, causal: bool
              ) -> torch.Tensor:
    """Exact attention with the engine's kernel where the tensors are, one batch element at a time.

    Args:
        q: (B, Hq, N, D); k, v: (B, Hkv, N, D), Hq a multiple of Hkv.
        scale: default 1/sqrt(D).  causal: top-left aligned triangular mask.

    Returns:
        out (B, Hq, N, D) in q's dtype on q's device.
    """
    kernel = select_kernel(q.device, q.dtype, q.shape[-1], str(config.get("kernel")))
    s = scale if scale is not None else q.shape[-1] ** -0.5
    outs = [attend(q[i : i + 1], k[i : i + 1], v[i : i + 1], scale=s, diagonal_causal=causal, kernel=kernel)[0]
            for i in range(q.shape[0])]  # each (1, Hq, N, D)
    return torch.cat(outs, dim=0)


def _sdpa(*args: Any, **kwargs: Any) -> tuple[torch.Tensor, Any]:
    from transformers.modeling_utils import ALL_ATTENTION_FUNCTIONS

    out, _ = ALL_ATTENTION_FUNCTIONS["sdpa"](*args, **kwargs)
    return out, None


def _refuse_unsupported(module: torch.nn.Module, query: torch.Tensor, key: torch.Tensor,
                        attention_mask: Any, dropout: float, kwargs: dict[str, Any]) -> bool:
    """Raise NotImplementedError for what the engine cannot compute exactly; return is_causal."""
    cls = type(module).__name__
    n, s = query.shape[2], key.shape[2]
    if dropout and dropout > 0:
        raise NotImplementedError(
            f"cqsa attention has no dropout: {cls} asks for dropout={dropout} (config.attention_dropout, in "
            "training mode); call model.eval() or set attention_dropout=0.0")
    if kwargs.get("softcap") is not None:
        raise NotImplementedError(
            f"cqsa attention has no logit soft-capping: {cls} passes softcap={kwargs['softcap']} "
            "(config.attn_logit_softcapping); use attn_implementation='eager' for this model")
    for name, setting in (("s_aux", "attention sinks"), ("sinks", "attention sinks"),
                          ("position_bias", "a learned position bias")):
        if kwargs.get(name) is not None:
            raise NotImplementedError(f"cqsa attention cannot add {setting} ({cls} passes {name}=...)")
    window = kwargs.get("sliding_window")
    if window is not None and s > int(window):
        raise NotImplementedError(
            f"cqsa attention computes full causal attention; {cls} uses a sliding window of {window} tokens "
            f"(config.sliding_window) over {s} keys; for inputs up to {window} tokens the two agree")
    if attention_mask is not None and _causal_mask(attention_mask, n, s):
        return True  # a materialised plain causal mask (older transformers build some): the same as none
    if attention_mask is not None:
        raise NotImplementedError(
            f"cqsa attention takes no mask, but {cls} received one of shape {tuple(attention_mask.shape)}: "
            "a padding mask (a batch of unequal lengths: run one sequence per batch or equal lengths), packed "
            "sequences, or queries after cached tokens (chunked prefill: prefill the whole input in one call)")
    is_causal = kwargs.get("is_causal")
    causal = bool(getattr(module, "is_causal", True) if is_causal is None else is_causal)
    if s != n and not (causal and s > n):
        raise NotImplementedError(
            f"cqsa attention is self-attention over one sequence: {cls} has {n} queries and {s} keys "
            "(cross-attention or a longer KV cache)")
    return causal


def _causal_mask(mask: Any, n: int, s: int, rows: int = 1024) -> bool:
    """Whether ``mask`` is the top-left causal pattern over the first ``n`` of ``s`` keys, nothing else.

    ``mask``: (B, 1 or H, n, s), bool (True: attend) or additive float (0: attend).  Checked in
    blocks of ``rows`` query rows, so the check adds little to the memory the mask already takes.
    """
    if not isinstance(mask, torch.Tensor) or mask.dim() != 4 or tuple(mask.shape[-2:]) != (n, s) or s < n:
        return False
    cols = torch.arange(s, device=mask.device)
    for r0 in range(0, n, rows):
        block = mask[..., r0 : r0 + rows, :]
        seen = block if block.dtype == torch.bool else block == 0  # (B, 1|H, r, s): attended
        want = cols[None, :] <= torch.arange(r0, r0 + block.shape[-2], device=mask.device)[:, None]  # (r, s)
        if not bool((seen == want).all()):
            return False
    return True


_BACKENDS: dict[str, Backend] = {}


def _interfaces() -> tuple[Any, Any, Callable[..., Any]]:
    """transformers' AttentionInterface, AttentionMaskInterface and its SDPA mask builder."""
    try:
        import transformers
        from transformers.masking_utils import AttentionMaskInterface, sdpa_mask
        from transformers.modeling_utils import AttentionInterface
    except ImportError as e:
        raise ImportError(
            "the cqsa attention backend needs transformers >= 4.53 (AttentionInterface and "
            f"AttentionMaskInterface): pip install 'cqsa-dask[transformers]' ({e})") from None
    version = tuple(int(p) for p in transformers.__version__.split(".")[:2] if p.isdigit())
    if version < MIN_TRANSFORMERS:
        raise ImportError(f"the cqsa attention backend needs transformers >= 4.53, found {transformers.__version__}")
    return AttentionInterface, AttentionMaskInterface, sdpa_mask


def register(name: str = "cqsa", *, memory_budget: int | str | None = None, client: Any = None,
             scheduler: str | None = None, min_tokens: int | None = None) -> Backend:
    """Make ``attn_implementation=name`` run attention on the engine.

    After it, ``from_pretrained(..., attn_implementation=name)``,
    ``_from_config(config, attn_implementation=name)`` and
    ``model.set_attn_implementation(name)`` route attention through the engine.

    Args:
        name: the implementation's name in transformers.
        memory_budget: per-worker device memory of each call, bytes or "4GB"
            (default: the current session's, else ``attention()``'s "1GB").
        client / scheduler: the cluster of the session the backend opens for
            itself when a call finds no current session (default: a local one).
        min_tokens: calls with fewer queries go to torch SDPA on the same
            tensors (default ``cqsa.transformers.min-tokens``).

    Returns:
        the registered :class:`Backend` (its ``calls`` count the routes taken).
    """
    attn_iface, mask_iface, sdpa_mask = _interfaces()
    if name in ("sdpa", "eager") or name.startswith("flash_attention") or name == "flex_attention":
        raise InvalidInputError(f"{name!r} is one of transformers' own implementations; choose another name")
    if client is not None and scheduler is not None:
        raise InvalidInputError("give register() either client= or scheduler=, not both")
    if memory_budget is not None:
        parse_budget(memory_budget)
    least = int(config.get("transformers.min-tokens", min_tokens))
    if least < 1:
        raise InvalidInputError(f"min_tokens must be >= 1, got {least}")
    unregister(name)
    backend = Backend(name, Options(memory_budget, client, scheduler, least))
    attn_iface.register(name, backend)
    mask_iface.register(name, sdpa_mask)
    _BACKENDS[name] = backend
    atexit.register(backend.close)  # a session the backend opened for itself: its cluster and directory
    return backend


def unregister(name: str = "cqsa") -> None:
    """Remove ``name`` from both interfaces and close the session its backend opened."""
    backend = _BACKENDS.pop(name, None)
    if backend is None:
        return
    backend.close()
    attn_iface, mask_iface, _ = _interfaces()
    for iface in (attn_iface, mask_iface):
        iface._global_mapping.pop(name, None)
