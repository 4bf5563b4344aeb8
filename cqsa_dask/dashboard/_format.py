"""Number formatting shared by the live page and the static report (bytes: ``core.units.format_bytes``)."""

from __future__ import annotations

from cqsa_dask.core.units import format_bytes

__all__ = ["byte_unit", "fmt_rate", "fmt_seconds"]


def fmt_rate(n: float | None) -> str:
    """Bytes per second as '12.3 MB/s'."""
    return "n/a" if n is None else f"{format_bytes(n)}/s"


def fmt_seconds(s: float | None) -> str:
    """Seconds as '42s', '3m 05s' or '2h 07m'; None -> '-'."""
    if s is None:
        return "-"
    s = max(0.0, float(s))
    if s < 60:
        return f"{s:.1f}s" if s < 10 else f"{s:.0f}s"
    m, sec = divmod(round(s), 60)
    if m < 60:
        return f"{m}m {sec:02d}s"
    h, m = divmod(m, 60)
    return f"{h}h {m:02d}m"


def byte_unit(largest: float) -> tuple[float, str]:
    """(divisor, name) of the decimal unit to plot values up to ``largest`` bytes in."""
    for scale, name in ((1e12, "TB"), (1e9, "GB"), (1e6, "MB"), (1e3, "kB")):
        if largest >= 10 * scale:
            return scale, name
    return 1.0, "bytes"
