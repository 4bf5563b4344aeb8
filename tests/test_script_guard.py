"""A user's script that calls ``cqsa_dask.attention`` with no client (a local cluster of worker
processes, the CPU default): run as ``python script.py`` in a fresh interpreter.

Worker processes are spawned, and each imports the calling script again: without an
``if __name__ == "__main__":`` guard the script's top level (the call itself) runs in the
child before it has started, the worker never comes, and Dask says only "Nanny failed to
start".  The call then raises one SchedulerError naming the script and the guard; under the
guard the same call is exact."""

from __future__ import annotations

import os
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest
import torch
from reference import check_exact

BODY = """
import torch, cqsa_dask
torch.manual_seed({seed})
q = torch.randn(1, 4, 700, 32) * 3
k = torch.randn(1, 2, 700, 32) * 3
v = torch.randn(1, 2, 700, 32)
out, lse = cqsa_dask.attention(q, k, v, causal=True, memory_budget="3MB", groups=7, return_lse=True)
torch.save({{"q": q, "k": k, "v": v, "out": out, "lse": lse}}, "result.pt")
print("saved")
"""


def _script(tmp_path: Path, guarded: bool) -> subprocess.CompletedProcess[str]:
    seed = int.from_bytes(os.urandom(3), "little")
    body = BODY.format(seed=seed)
    if guarded:
        body = "def main():\n" + textwrap.indent(body, "    ") + '\n\nif __name__ == "__main__":\n    main()\n'
    path = tmp_path / ("guarded.py" if guarded else "unguarded.py")
    path.write_text(body)
    return subprocess.run([sys.executable, str(path)], check=False, cwd=tmp_path, capture_output=True, text=True,
                          timeout=240, env={**os.environ, "DASK_CQSA__LOCAL_CLUSTER__PROCESSES": "auto"})


@pytest.mark.integration
def test_an_unguarded_script_gets_one_error_naming_the_guard(tmp_path: Path) -> None:
    r = _script(tmp_path, guarded=False)
    last = r.stderr.strip().splitlines()[-1]
    assert r.returncode != 0, r.stdout
    assert last.startswith("cqsa_dask.core.errors.SchedulerError: the local cluster's worker processes did not start"), \
        r.stderr[-3000:]
    assert 'if __name__ == "__main__":' in last and str(tmp_path / "unguarded.py") in last, last
    assert "saved" not in r.stdout and not (tmp_path / "result.pt").exists()


@pytest.mark.integration
def test_the_same_script_under_the_guard_is_exact(tmp_path: Path) -> None:
    r = _script(tmp_path, guarded=True)
    assert r.returncode == 0, r.stderr[-3000:]
    got = torch.load(tmp_path / "result.pt")
    check_exact(got["q"], got["k"], got["v"], got["out"], got["lse"], causal=True, scale=None,
                context=f"a script's attention(), N = 700, GQA 4/2, causal: {r.stdout}")
