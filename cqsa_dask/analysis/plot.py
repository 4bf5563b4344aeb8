"""Draw an analysis as a PNG: per head, key mass and entropy against position, and the block map.

matplotlib is an optional extra (``pip install cqsa-dask[plot]``); it is imported only here.
Long sequences are drawn from at most ``_POINTS`` positions per curve (the
maximum of key mass and the mean of entropy over each stretch), so a plot
of a billion-token analysis reads a bounded amount at a time.
"""

from __future__ import annotations

import os

import numpy as np
import zarr

from cqsa_dask.core.errors import InvalidInputError, StoreError
from cqsa_dask.store.layout import open_store

__all__ = ["plot_analysis", "require_matplotlib"]

_POINTS = 4096  # positions drawn per curve


def require_matplotlib() -> None:
    """InvalidInputError (one line) when matplotlib is not installed."""
    try:
        import matplotlib  # noqa: F401
    except ImportError:
        raise InvalidInputError("--plot needs matplotlib: pip install matplotlib (or cqsa-dask[plot])") from None


def _curve(arr: zarr.Array, b: int, h: int, reduce: str) -> tuple[np.ndarray, np.ndarray]:
    """(positions, values) of arr[b, h, :] (N,), reduced to at most ``_POINTS`` stretches."""
    n = arr.shape[2]
    step = max(1, -(-n // _POINTS))
    xs, ys = [], []
    for s in range(0, n, step * 256):  # read 256 stretches at a time
        x = np.asarray(arr[b, h, s:min(n, s + step * 256)], dtype=np.float64)
        pad = -len(x) % step
        blocks = np.pad(x, (0, pad), constant_values=np.nan).reshape(-1, step)
        ys.append(np.nanmax(blocks, axis=1) if reduce == "max" else np.nanmean(blocks, axis=1))
        xs.append(s + np.arange(blocks.shape[0]) * step)
    return np.concatenate(xs), np.concatenate(ys)


def plot_analysis(store: str | os.PathLike[str], out: str | os.PathLike[str], batch: int = 0) -> str:
    """Write the PNG ``out`` for batch element ``batch``: one row per head; return its path."""
    require_matplotlib()
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    group = open_store(os.fspath(store), mode="r")
    ana = group.get("analysis")
    if not isinstance(ana, zarr.Group) or "key_mass" not in ana:
        raise StoreError(f"store {os.fspath(store)!r} holds no analysis: run `cqsa analyze` first")
    km, ent = ana["key_mass"], ana["entropy"]
    blocks = ana.get("block_mass")
    assert isinstance(km, zarr.Array) and isinstance(ent, zarr.Array)
    heads = km.shape[1]
    cols = 3 if isinstance(blocks, zarr.Array) else 2
    fig, axes = plt.subplots(heads, cols, figsize=(5 * cols, 2.8 * heads), squeeze=False)
    for h in range(heads):
        x, y = _curve(km, batch, h, "max")
        axes[h][0].semilogy(x, y, lw=0.7)
        axes[h][0].set(title=f"head {h}: key mass (max per stretch)", xlabel="key position")
        x, y = _curve(ent, batch, h, "mean")
        axes[h][1].plot(x, y, lw=0.7, color="tab:orange")
        axes[h][1].set(title=f"head {h}: entropy (nats, mean per stretch)", xlabel="query position")
        if isinstance(blocks, zarr.Array):
            m = np.asarray(blocks[batch, h], dtype=np.float64)
            logm = np.where(m > 0, np.log10(np.where(m > 0, m, 1.0)), np.nan)  # masked blocks: blank
            im = axes[h][2].imshow(logm, cmap="viridis", vmin=float(np.nanmax(logm)) - 12 if m.max() > 0 else None)
            axes[h][2].set(title=f"head {h}: log10 block mass", xlabel="key block", ylabel="query block")
            fig.colorbar(im, ax=axes[h][2])
    fig.tight_layout()
    fig.savefig(out, dpi=110)
    plt.close(fig)
    return os.fspath(out)
