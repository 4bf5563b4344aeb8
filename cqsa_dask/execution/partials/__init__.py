"""Partials policies: how a job combines the results of a row's producers.

``policy_for(name)`` is the one place a policy is chosen; every site that
depends on it (the store's arrays, the planner's byte figures, the graph's
priorities, what producers and merges do) asks the policy object
(``base.py``).  Policies: "all" (``all.py``) and "bounded" (``bounded.py``,
its fold machinery in ``fold.py``).  A new policy is a new module and one
entry in ``_POLICIES``.  Importing this package loads neither torch nor zarr.
"""

from __future__ import annotations

from cqsa_dask.core.errors import InvalidInputError
from cqsa_dask.execution.partials.all import AllPartials
from cqsa_dask.execution.partials.base import Cell, Merged, PartialsPolicy, Producer
from cqsa_dask.execution.partials.bounded import BoundedPartials

__all__ = ["AllPartials", "BoundedPartials", "Cell", "Merged", "PartialsPolicy", "Producer", "policy_for",
           "policy_names"]

_POLICIES: dict[str, PartialsPolicy] = {p.name: p for p in (AllPartials(), BoundedPartials())}


def policy_names() -> tuple[str, ...]:
    """Names of the known policies."""
    return tuple(_POLICIES)


def policy_for(name: str) -> PartialsPolicy:
    """The policy called ``name``; :class:`InvalidInputError` for an unknown one."""
    try:
        return _POLICIES[name]
    except KeyError:
        raise InvalidInputError(f"partials must be one of {sorted(_POLICIES)}, got {name!r}") from None
