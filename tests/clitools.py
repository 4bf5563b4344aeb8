"""Helpers shared by the tests that drive the ``cqsa`` command and inspect stores."""

from __future__ import annotations

import hashlib
import os
import shutil
import signal
import subprocess
import sys
import time
from dataclasses import dataclass
from pathlib import Path

__all__ = ["CliResult", "cqsa_command", "invoke", "snapshot"]


def cqsa_command() -> list[str]:
    """The installed ``cqsa`` next to this interpreter, else any on PATH, else ``python -m``."""
    exe = shutil.which("cqsa", path=os.path.dirname(sys.executable)) or shutil.which("cqsa")
    return [exe] if exe else [sys.executable, "-m", "cqsa_dask"]


@dataclass(frozen=True)
class CliResult:
    """One finished ``cqsa`` invocation."""

    args: tuple[str, ...]
    returncode: int
    stdout: str
    stderr: str
    seconds: float

    def __str__(self) -> str:
        return (f"`cqsa {' '.join(self.args)}` -> {self.returncode} in {self.seconds:.1f}s\n"
                f"--- stdout ---\n{self.stdout[-3000:]}\n--- stderr ---\n{self.stderr[-3000:]}")


def snapshot(path: Path) -> dict[str, str | None]:
    """Every file (SHA-256) and directory (None) under ``path``, by relative path."""
    if not path.exists():
        return {}
    return {p.relative_to(path).as_posix(): hashlib.sha256(p.read_bytes()).hexdigest() if p.is_file() else None
            for p in sorted(path.rglob("*"))}


def invoke(args: list[str], timeout: float, env: dict[str, str] | None = None) -> CliResult:
    """Run ``cqsa args`` in its own session; kill that session (cluster processes included)
    if it outlives ``timeout``."""
    t0 = time.perf_counter()
    proc = subprocess.Popen(cqsa_command() + args, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                            env={**os.environ, **(env or {})}, start_new_session=True)
    try:
        out, err = proc.communicate(timeout=timeout)
    except subprocess.TimeoutExpired:
        os.killpg(proc.pid, signal.SIGKILL)
        out, err = proc.communicate()
        raise AssertionError(f"`cqsa {' '.join(args)}` did not finish in {timeout}s\n{out[-2000:]}\n{err[-2000:]}")
    return CliResult(tuple(args), proc.returncode, out, err, time.perf_counter() - t0)
