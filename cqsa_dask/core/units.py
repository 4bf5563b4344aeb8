"""Sizes in bytes: parsing what users write ("12GB", "1.5GiB") and formatting what we print.

Decimal units (kB, MB, GB: powers of 1000) unless the user writes binary
ones (KiB, MiB, GiB).  One formatter for the CLI, the dashboard and the
reports, so a size reads the same everywhere.
"""

from __future__ import annotations

import math
import re

from cqsa_dask.core.errors import BudgetError

__all__ = ["format_bytes", "parse_budget"]

_UNITS = {
    "": 1, "b": 1,
    "k": 10**3, "kb": 10**3, "m": 10**6, "mb": 10**6,
    "g": 10**9, "gb": 10**9, "t": 10**12, "tb": 10**12,
    "kib": 2**10, "mib": 2**20, "gib": 2**30, "tib": 2**40,
}


def parse_budget(budget: float | str) -> int:
    """Return a memory budget in bytes from 4096, "512MB", "12GB" or "1.5GiB"."""
    if isinstance(budget, bool):
        raise BudgetError(f"memory budget must be bytes or a string like '12GB', got {budget!r}")
    if isinstance(budget, int):
        value = budget
    elif isinstance(budget, float):
        value = int(budget) if math.isfinite(budget) else 0
    else:
        m = re.fullmatch(r"\s*([0-9]*\.?[0-9]+(?:[eE][0-9]+)?)\s*([a-zA-Z]*)\s*", str(budget))
        unit = m.group(2).lower() if m else None
        if m is None or unit not in _UNITS:
            raise BudgetError(
                f"memory budget {budget!r} is not understood: use bytes or a number "
                "with a unit such as '512MB', '12GB' or '1.5GiB'"
            )
        value = int(float(m.group(1)) * _UNITS[unit])
    if value <= 0:
        raise BudgetError(f"memory budget must be at least 1 byte, got {budget!r}")
    return value


def format_bytes(n: float | None) -> str:
    """1234567 -> '1.23 MB' (decimal units, three significant digits); None -> 'n/a'."""
    if n is None:
        return "n/a"
    x = float(n)
    for unit in ("B", "kB", "MB", "GB", "TB", "PB"):
        if abs(x) < 1000 or unit == "PB":
            return f"{int(x)} B" if unit == "B" else f"{x:.3g} {unit}"
        x /= 1000
    raise AssertionError  # pragma: no cover
