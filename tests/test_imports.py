"""Light imports: ``import cqsa_dask`` and ``cqsa plan`` load neither torch nor distributed.

Each check runs in a fresh interpreter (this one has torch loaded already)
and reads ``sys.modules`` after the import or the command.
"""

from __future__ import annotations

import json
import subprocess
import sys

import pytest

HEAVY = ("torch", "distributed", "zarr")


def _loaded_after(code: str) -> dict[str, bool]:
    probe = f"{code}\nimport json, sys\nprint(json.dumps({{m: m in sys.modules for m in {HEAVY!r}}}))"
    r = subprocess.run([sys.executable, "-c", probe], capture_output=True, text=True, timeout=120, check=False)
    assert r.returncode == 0, r.stderr
    return json.loads(r.stdout.strip().splitlines()[-1])


def test_import_loads_no_engine() -> None:
    assert _loaded_after("import cqsa_dask; cqsa_dask.make_plan; cqsa_dask.CQSAError") == dict.fromkeys(HEAVY, False)


def test_plan_command_loads_no_engine() -> None:
    code = ("import contextlib, io\nfrom cqsa_dask.tools.cli import main\n"
            "with contextlib.redirect_stdout(io.StringIO()):\n"
            "    assert main(['plan', '--seq-len', '1048576', '--heads', '4', '--head-dim', '128']) == 0")
    assert _loaded_after(code) == dict.fromkeys(HEAVY, False)


@pytest.mark.parametrize("name", ["run", "attention", "verify", "SyntheticSource"])
def test_public_names_load_on_first_use(name: str) -> None:
    loaded = _loaded_after(f"import cqsa_dask\ncqsa_dask.{name}")
    assert loaded["torch"], f"cqsa_dask.{name} should have loaded the engine"


def test_unknown_attribute_is_an_attribute_error() -> None:
    import cqsa_dask

    with pytest.raises(AttributeError, match="no attribute 'nope'"):
        cqsa_dask.nope  # noqa: B018


def test_python_dash_m_runs_the_command() -> None:
    r = subprocess.run([sys.executable, "-m", "cqsa_dask", "plan", "--seq-len", "4096", "--heads", "2",
                        "--head-dim", "64", "--json"], capture_output=True, text=True, timeout=120, check=False)
    assert r.returncode == 0, r.stderr
    assert json.loads(r.stdout)["seq_len"] == 4096
    bad = subprocess.run([sys.executable, "-m", "cqsa_dask", "plan", "--seq-len", "0", "--heads", "2",
                          "--head-dim", "64"], capture_output=True, text=True, timeout=120, check=False)
    assert bad.returncode == 2 and bad.stderr.startswith("cqsa: error: ") and "Traceback" not in bad.stderr
