"""The cqsa command in a real terminal (tmux): Ctrl-C, SIGTERM and kill -9, then resume at once.

    tmux pane: cqsa run STORE ──Ctrl-C──> one line "interrupted after X of Y tasks; resume with ...",
               exit 130, no traceback from the workers ──> cqsa resume STORE finishes the job
"""

from __future__ import annotations

import os
import re
import shutil
import subprocess
import time
import uuid
from pathlib import Path

import pytest
from clitools import cqsa_command

from cqsa_dask.store.random_inputs import write_random_inputs

pytestmark = pytest.mark.integration


class Pane:
    """A tmux session running bash, read back as text."""

    def __init__(self, cwd: Path):
        assert shutil.which("tmux"), "these tests need tmux (.ci/run installs it)"
        self.name = f"cqsa-{uuid.uuid4().hex[:8]}"
        env = [f"{k}={os.environ[k]}" for k in ("PATH", "PYTHONPATH", "HOME") if k in os.environ]
        subprocess.run(["tmux", "new-session", "-d", "-s", self.name, "-x", "220", "-y", "60", "-c", str(cwd),
                        *[a for kv in env for a in ("-e", kv)], "bash --norc --noprofile"], check=True)

    def type(self, *keys: str) -> None:
        subprocess.run(["tmux", "send-keys", "-t", self.name, *keys], check=True)

    def text(self) -> str:
        return subprocess.run(["tmux", "capture-pane", "-p", "-S", "-500", "-t", self.name], check=True,
                              capture_output=True, text=True).stdout

    def wait_for(self, needle: str, timeout: float = 120.0) -> str:
        """The screen once a line *starts* with ``needle`` (the typed command line holds it too)."""
        end = time.monotonic() + timeout
        while time.monotonic() < end:
            screen = self.text()
            if any(line.startswith(needle) for line in screen.splitlines()):
                return screen
            time.sleep(0.3)
        raise AssertionError(f"{needle!r} did not appear within {timeout} s:\n{self.text()}")

    def wait_mid_job(self, timeout: float = 120.0) -> str:
        """The screen once the progress bar shows some tasks done and fewer than three quarters.

        Acting on what the job reports, not after a fixed sleep: on a fast machine the whole job
        takes a few seconds, so a sleep could land after its end.
        """
        end = time.monotonic() + timeout
        while time.monotonic() < end:
            screen = self.text()
            bars = re.findall(r"\] (\d+)/(\d+) tasks", screen)
            if bars:
                done, total = map(int, bars[-1])
                assert done < total, f"the job ended before it could be interrupted:\n{screen}"
                if 0 < done < total * 3 // 4:
                    return screen
            time.sleep(0.1)
        raise AssertionError(f"the job showed no progress within {timeout} s:\n{self.text()}")

    def close(self) -> None:
        subprocess.run(["tmux", "kill-session", "-t", self.name], check=False)


@pytest.fixture
def pane(tmp_path: Path):  # type: ignore[no-untyped-def]
    p = Pane(tmp_path)
    yield p
    p.close()


def _job(tmp_path: Path) -> Path:
    store = tmp_path / "job.zarr"
    write_random_inputs(store, seq_len=16384, heads=2, head_dim=64, dtype="float32", seed=7)
    return store


def _cqsa(*args: str) -> str:
    return " ".join([*cqsa_command(), *args])


@pytest.mark.parametrize("workers", ["processes", "thread"])
def test_ctrl_c_then_resume(tmp_path: Path, pane: Pane, workers: str) -> None:
    """Worker processes (the CPU's default), or the worker a thread of the command's own process
    (the default on one GPU): one line, exit 130, and a resume that completes the job."""
    store = _job(tmp_path)
    env = "DASK_CQSA__LOCAL_CLUSTER__PROCESSES=false " if workers == "thread" else ""
    pane.type(f"{env}{_cqsa('run', str(store), '--budget', '6MB')}; echo EXIT=$?", "Enter")
    pane.wait_mid_job()
    pane.type("C-c")
    screen = pane.wait_for("EXIT=")
    assert "EXIT=130" in screen, screen
    assert "Traceback" not in screen and "KeyboardInterrupt" not in screen, screen
    line = [s for s in screen.splitlines() if s.startswith("cqsa: interrupted")]
    assert len(line) == 1 and f"resume with `cqsa resume {store}`" in line[0], screen
    pane.type("clear", "Enter")
    pane.type(f"{_cqsa('resume', str(store))}; echo RESUMED=$?", "Enter")
    screen = pane.wait_for("RESUMED=", timeout=300)
    assert "RESUMED=0" in screen and "(resumed)" in screen and "Traceback" not in screen, screen


def _running_in_background(tmp_path: Path, pane: Pane) -> Path:
    """A job started as the shell's job %1, some of its tasks done; its store."""
    store = _job(tmp_path)
    pane.type(f"{_cqsa('run', str(store), '--budget', '6MB')} & sleep 0.5; echo STARTED", "Enter")
    pane.wait_mid_job()
    return store


def test_kill_9_then_resume_at_once(tmp_path: Path, pane: Pane) -> None:
    store = _running_in_background(tmp_path, pane)
    # the command's process alone, as `kill -9 PID` does (`kill -9 %1` would kill its whole process
    # group: the local cluster's processes and its multiprocessing resource tracker too)
    pane.type("kill -9 $!; wait $!; echo KILLED=$?", "Enter")
    pane.wait_for("KILLED=137")
    pane.type(f"{_cqsa('status', str(store))}; echo STATUS=$?", "Enter")
    screen = pane.wait_for("STATUS=")
    assert "STATUS=0" in screen and "stopped (resume with `cqsa resume`)" in screen, screen  # not "running"
    pane.type(f"{_cqsa('resume', str(store))}; echo RESUMED=$?", "Enter")
    screen = pane.wait_for("RESUMED=", timeout=300)
    assert "RESUMED=0" in screen, screen
    assert "taking over the lease of" in screen and "no longer exists on this host" in screen, screen
    assert "another run holds this store" not in screen, screen
    # the killed run's multiprocessing resource tracker cleans up after it without a word
    assert "resource_tracker" not in screen and "leaked" not in screen, screen


def test_sigterm(tmp_path: Path, pane: Pane) -> None:
    store = _running_in_background(tmp_path, pane)
    assert (store / "_cqsa").is_dir(), "the job started"
    pane.type("kill -TERM %1; wait %1; echo TERM=$?", "Enter")
    screen = pane.wait_for("TERM=")
    assert "TERM=143" in screen and "cqsa: terminated" in screen and "resume with `cqsa resume" in screen, screen
    assert "Traceback" not in screen, screen
