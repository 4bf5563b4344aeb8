"""The README's configuration table against cqsa.yaml: every key listed, with the default it has."""

from __future__ import annotations

import re
from pathlib import Path
from typing import Any

import yaml

ROOT = Path(__file__).resolve().parents[1]


def _flat(d: dict[str, Any], prefix: str = "") -> dict[str, Any]:
    out: dict[str, Any] = {}
    for k, v in d.items():
        out.update(_flat(v, f"{prefix}{k}.") if isinstance(v, dict) else {f"{prefix}{k}": v})
    return out


def test_every_config_key_is_in_the_readme_with_its_default() -> None:
    defaults = _flat(yaml.safe_load((ROOT / "cqsa_dask" / "cqsa.yaml").read_text())["cqsa"])
    readme = (ROOT / "README.md").read_text()
    rows = dict(re.findall(r"^\| `cqsa\.([a-z0-9.\-]+)` \| `([^`]*)` \|", readme, re.MULTILINE))
    assert sorted(set(defaults) - set(rows)) == [], "keys of cqsa.yaml missing from the README's table"
    assert sorted(set(rows) - set(defaults)) == [], "README rows naming no key of cqsa.yaml"
    wrong = {k: (rows[k], v) for k, v in defaults.items() if yaml.safe_load(rows[k]) != v}
    assert not wrong, f"README default != cqsa.yaml default: {wrong}"
