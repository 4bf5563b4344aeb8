"""Where a benchmark ran: hardware, versions, the code, the machine's load.

Every result file carries these three blocks, so a figure can be read
without the session that made it::

    hardware   cpu model, cores, RAM, gpu name, gpu count, gpu memory
    versions   python, torch, cuda, cudnn, dask, distributed, zarr, numcodecs, numpy, cqsa_dask
    git        commit, dirty (``git status --short`` of the engine), engine source hash

The source hash (sha256 over the engine's .py and .yaml files) says which
code ran where git is absent (the GPU machine gets a copy of the tree).
Nothing here fails: a figure that cannot be read is None.
"""

from __future__ import annotations

import datetime as _dt
import hashlib
import os
import platform
import subprocess
import sys
from typing import Any

__all__ = ["git_info", "hardware", "load", "now_utc", "versions"]

GB = 1e9
_HERE = os.path.dirname(os.path.abspath(__file__))


def now_utc() -> str:
    """The current UTC time, ISO 8601 to the second."""
    return _dt.datetime.now(_dt.UTC).isoformat(timespec="seconds")


def load() -> list[float] | None:
    """The 1, 5 and 15 minute load averages: other work on the machine distorts CPU timings."""
    try:
        return [round(x, 2) for x in os.getloadavg()]
    except OSError:
        return None


def hardware() -> dict[str, Any]:
    import torch

    hw: dict[str, Any] = {"cpu": _cpu_model(), "cpu_count": os.cpu_count(), "ram_gb": _ram_gb(),
                          "platform": platform.platform(), "gpu": None, "gpu_count": 0, "gpu_memory_gb": None}
    if torch.cuda.is_available():
        p = torch.cuda.get_device_properties(0)
        hw.update(gpu=p.name, gpu_count=torch.cuda.device_count(), gpu_memory_gb=round(p.total_memory / GB, 1))
    return hw


def versions() -> dict[str, Any]:
    import dask
    import distributed
    import numcodecs
    import numpy
    import torch
    import zarr

    import cqsa_dask

    return {
        "python": sys.version.split()[0], "torch": torch.__version__, "cuda": torch.version.cuda,
        "cudnn": torch.backends.cudnn.version() if torch.backends.cudnn.is_available() else None,
        "dask": dask.__version__, "distributed": distributed.__version__, "zarr": zarr.__version__,
        "numcodecs": numcodecs.__version__, "numpy": numpy.__version__, "cqsa_dask": cqsa_dask.__version__,
        "torch_threads": torch.get_num_threads(),
    }


def git_info() -> dict[str, Any]:
    import cqsa_dask

    engine = os.path.dirname(os.path.abspath(cqsa_dask.__file__))
    # a copy of the tree without its history (the GPU machine's): the commit given by who sent it
    commit = os.environ.get("CQSA_BENCH_COMMIT") or _git("rev-parse", "HEAD")
    dirty = _git("status", "--short", "--", engine)
    return {"commit": commit or None, "dirty": dirty, "engine_sha256": _source_hash(engine)}


def _git(*args: str) -> str | None:
    try:
        r = subprocess.run(["git", "-C", _HERE, *args], check=False, capture_output=True, text=True, timeout=5)
    except (OSError, subprocess.SubprocessError):
        return None
    return r.stdout.strip() if r.returncode == 0 else None


def _source_hash(folder: str) -> str:
    """sha256 over the .py and .yaml files under ``folder``, in path order (16 hex digits)."""
    h = hashlib.sha256()
    for root, dirs, files in sorted(os.walk(folder)):
        dirs[:] = sorted(d for d in dirs if d != "__pycache__")
        for name in sorted(files):
            if name.endswith((".py", ".yaml")):
                path = os.path.join(root, name)
                with open(path, "rb") as f:
                    h.update(os.path.relpath(path, folder).encode() + b"\0" + f.read())
    return h.hexdigest()[:16]


def _cpu_model() -> str:
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith("model name"):
                    return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor()


def _ram_gb() -> float | None:
    try:
        with open("/proc/meminfo") as f:
            return round(int(f.readline().split()[1]) * 1024 / GB, 1)
    except (OSError, ValueError, IndexError):
        return None
