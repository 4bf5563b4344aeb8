"""Defaults: one YAML file registered with dask.config under ``cqsa``.

Functions take ``arg=None`` and resolve it here, so ``dask.config.set`` and
``DASK_CQSA__*`` environment variables work everywhere.
"""

from __future__ import annotations

import os
from typing import Any

import dask.config
import yaml

__all__ = ["get"]

_fn = os.path.join(os.path.dirname(__file__), "cqsa.yaml")
with open(_fn) as _f:
    _defaults = yaml.safe_load(_f)

dask.config.update_defaults(_defaults)


def get(key: str, override: Any = None) -> Any:
    """Return ``cqsa.<key>`` from dask.config unless ``override`` is given."""
    if override is not None:
        return override
    return dask.config.get(f"cqsa.{key}")
