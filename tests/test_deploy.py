"""deploy/: what can be checked without SLURM, Kubernetes or Docker.

::

    deploy/slurm.py             -> SLURMCluster.job_script() rendered: #SBATCH lines, the worker
                                   command; bash -n; plain `dask worker` flags parsed by distributed's CLI
    deploy/k8s/daskcluster.yaml -> every field checked against the operator's CRD schema
                                   (deploy/k8s/daskcluster-crd.yaml, copied from dask-kubernetes)
    deploy/Dockerfile           -> its pip steps are the README's (torch pin first, then the project)
    deploy/README.md            -> every `dask scheduler` / `dask worker` command parses

Nothing here starts SLURM jobs, pods or images; docs/cluster.md says what was run for real.
"""

from __future__ import annotations

import importlib.util
import re
import shlex
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest
import yaml

ROOT = Path(__file__).resolve().parents[1]
DEPLOY = ROOT / "deploy"


def _load_slurm() -> Any:
    spec = importlib.util.spec_from_file_location("cqsa_deploy_slurm", DEPLOY / "slurm.py")
    assert spec and spec.loader
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def _parse_worker_args(args: list[str]) -> dict[str, Any]:
    """``dask worker`` options as distributed's own CLI parses them (nothing is started)."""
    from distributed.cli.dask_worker import main as dask_worker

    with dask_worker.make_context("dask worker", list(args)) as ctx:
        return dict(ctx.params)


def _parse_scheduler_args(args: list[str]) -> dict[str, Any]:
    from distributed.cli.dask_scheduler import main as dask_scheduler

    with dask_scheduler.make_context("dask scheduler", list(args)) as ctx:
        return dict(ctx.params)


# ── SLURM ────────────────────────────────────────────────────────────────────────────────────


def _worker_line(script: str) -> list[str]:
    lines = [s for s in script.splitlines() if " -m " in s]
    assert len(lines) == 1, script
    return shlex.split(lines[0])


@pytest.mark.parametrize("gpus", [8, 1])
def test_slurm_job_script(gpus: int, tmp_path: Path) -> None:
    slurm = _load_slurm()
    with slurm.gpu_cluster(gpus_per_job=gpus, device_mem=100e9, cores_per_gpu=6, memory_per_gpu="100GB",
                           queue="gpu", account="proj", walltime="02:00:00") as cluster:
        script = cluster.job_script()
        address = cluster.scheduler_address
    directives = [s.removeprefix("#SBATCH ").strip() for s in script.splitlines() if s.startswith("#SBATCH")]
    assert f"--gres=gpu:{gpus}" in directives, script
    assert f"--cpus-per-task={6 * gpus}" in directives and "-p gpu" in directives and "-A proj" in directives
    assert "-t 02:00:00" in directives
    argv = _worker_line(script)
    assert argv[0] == sys.executable and argv[3] == address
    module = argv[2]
    rest = argv[4:]
    assert rest[rest.index("--resources") + 1] == "device_mem=1e+11"
    assert rest[rest.index("--nthreads") + 1] == "3"
    (tmp_path / "job.sh").write_text(script)
    subprocess.run(["bash", "-n", str(tmp_path / "job.sh")], check=True)
    if gpus == 1:  # SLURM pins the one GPU; plain dask worker, one process
        assert module == "distributed.cli.dask_worker" and "--nworkers" not in rest
        params = _parse_worker_args([address, *rest])
        assert params["resources"] == "device_mem=1e+11" and params["nthreads"] == 3
    else:  # one process per GPU of the job, each pinned by dask-cuda
        assert module == "dask_cuda.cli" and "--nworkers" not in rest and "--nanny" not in rest


def test_slurm_rejects_no_gpu() -> None:
    with pytest.raises(ValueError, match="gpus_per_job"):
        _load_slurm().gpu_cluster(gpus_per_job=0)


# ── Kubernetes ───────────────────────────────────────────────────────────────────────────────


def schema_errors(value: Any, schema: dict[str, Any], path: str = "") -> list[str]:
    """Where ``value`` breaks a Kubernetes structural schema: types, required fields, and fields
    the schema does not have (which the API server would silently drop: a typo, not an error)."""
    if schema.get("x-kubernetes-int-or-string"):
        ok = isinstance(value, int | str) and not isinstance(value, bool)
        return [] if ok else [f"{path}: expected an integer or a string, got {value!r}"]
    kind = schema.get("type", "object" if "properties" in schema else None)
    simple = {"string": str, "integer": int, "boolean": bool, "number": int | float}
    if kind in simple:
        ok = isinstance(value, simple[kind]) and (kind == "boolean" or not isinstance(value, bool))
        return [] if ok else [f"{path}: expected {kind}, got {value!r}"]
    if kind == "array":
        if not isinstance(value, list):
            return [f"{path}: expected a list, got {value!r}"]
        return [e for i, v in enumerate(value) for e in schema_errors(v, schema.get("items", {}), f"{path}[{i}]")]
    if kind != "object":
        return []
    if not isinstance(value, dict):
        return [f"{path}: expected a mapping, got {value!r}"]
    errors = [f"{path}.{r}: required" for r in schema.get("required", []) if r not in value]
    props, extra = schema.get("properties"), schema.get("additionalProperties")
    for k, v in value.items():
        if props is not None and k in props:
            errors += schema_errors(v, props[k], f"{path}.{k}")
        elif isinstance(extra, dict):
            errors += schema_errors(v, extra, f"{path}.{k}")
        elif not schema.get("x-kubernetes-preserve-unknown-fields"):
            errors.append(f"{path}.{k}: no such field")
    return errors


def _crd() -> dict[str, Any]:
    return yaml.safe_load((DEPLOY / "k8s" / "daskcluster-crd.yaml").read_text())  # type: ignore[no-any-return]


def _manifest() -> dict[str, Any]:
    return yaml.safe_load((DEPLOY / "k8s" / "daskcluster.yaml").read_text())  # type: ignore[no-any-return]


def _crd_errors(manifest: dict[str, Any]) -> list[str]:
    crd = _crd()
    versions = {v["name"]: v for v in crd["spec"]["versions"] if v.get("served")}
    group, version = manifest["apiVersion"].split("/")
    assert group == crd["spec"]["group"] and version in versions, manifest["apiVersion"]
    assert manifest["kind"] == crd["spec"]["names"]["kind"]
    body = {k: v for k, v in manifest.items() if k not in ("apiVersion", "kind", "metadata")}
    return schema_errors(body, versions[version]["schema"]["openAPIV3Schema"])


def test_daskcluster_matches_the_operator_crd() -> None:
    assert _crd_errors(_manifest()) == []


@pytest.mark.parametrize("breakage", ["typo", "integer quantity", "missing containers"])
def test_crd_check_catches_mistakes(breakage: str) -> None:
    m = _manifest()
    worker = m["spec"]["worker"]
    if breakage == "typo":
        worker["replica"] = worker.pop("replicas")
    elif breakage == "integer quantity":  # the schema types quantities as strings: "1", not 1
        worker["spec"]["containers"][0]["resources"]["limits"]["nvidia.com/gpu"] = 1
    else:
        del worker["spec"]["containers"]
    assert _crd_errors(m), breakage


def test_daskcluster_workers_are_cqsa_gpu_workers() -> None:
    spec = _manifest()["spec"]
    (worker,) = spec["worker"]["spec"]["containers"]
    assert worker["resources"]["limits"]["nvidia.com/gpu"] == "1"
    assert worker["args"][:2] == ["dask", "worker"]
    params = _parse_worker_args(["tcp://scheduler:8786", *worker["args"][2:]])
    assert params["resources"] == "device_mem=120e9" and params["nthreads"] == 3
    (scheduler,) = spec["scheduler"]["spec"]["containers"]
    assert scheduler["args"][:2] == ["dask", "scheduler"]
    assert _parse_scheduler_args(scheduler["args"][2:])["preload"] == ("cqsa_dask.dashboard",)
    mounts = {c["name"]: c["volumeMounts"][0]["mountPath"] for c in (worker, scheduler)}
    assert set(mounts.values()) == {"/data"}


# ── Dockerfile ───────────────────────────────────────────────────────────────────────────────


def _run_steps(dockerfile: str) -> list[str]:
    text = re.sub(r"\\\n", " ", dockerfile)
    return [line.split(None, 1)[1] for line in text.splitlines() if line.startswith("RUN ")]


def test_dockerfile_installs_as_the_readme() -> None:
    docker = (DEPLOY / "Dockerfile").read_text()
    readme_pins = set(re.findall(r"pip install (torch==[\d.]+)", (ROOT / "README.md").read_text()))
    ci_pins = set(re.findall(r"pip install (torch==[\d.]+)", (ROOT / ".ci" / "run").read_text()))
    assert len(readme_pins) == 1 and readme_pins == ci_pins, (readme_pins, ci_pins)
    pips = [r for r in _run_steps(docker) if r.startswith("pip install")]
    assert pips == [f"pip install {readme_pins.pop()}", "pip install /opt/cqsa-dask"], pips
    # what it copies exists, and is what pip needs to build the project
    for src in re.findall(r"^COPY (.+) \S+$", docker, flags=re.MULTILINE):
        for name in src.split():
            assert (ROOT / name).exists(), name
    python = re.search(r"^FROM python:(\d+)\.(\d+)", docker, flags=re.MULTILINE)
    assert python, "FROM python:X.Y"
    required = re.search(r'requires-python = ">=(\d+)\.(\d+)"', (ROOT / "pyproject.toml").read_text())
    assert required and tuple(map(int, python.groups())) >= tuple(map(int, required.groups()))
    for module in re.findall(r"import ([\w.]+(?:, [\w.]+)*)", docker):
        for name in module.split(", "):
            assert importlib.util.find_spec(name), name
    cmd = re.search(r"^CMD (\[.*\])$", docker, flags=re.MULTILINE)
    assert cmd and yaml.safe_load(cmd.group(1))[:2] == ["dask", "scheduler"]


# ── README ───────────────────────────────────────────────────────────────────────────────────


def _commands(markdown: str) -> list[list[str]]:
    blocks = re.findall(r"```sh\n(.*?)```", markdown, flags=re.DOTALL)
    lines = re.sub(r"\\\n\s*", " ", "\n".join(blocks)).splitlines()
    return [shlex.split(line.split("#")[0]) for line in lines if line.split("#")[0].strip()]


def test_readme_commands_parse() -> None:
    commands = _commands((DEPLOY / "README.md").read_text())
    seen = set()
    for argv in commands:
        while argv and "=" in argv[0]:  # VAR=value prefixes
            argv = argv[1:]
        if argv[:2] == ["dask", "worker"]:
            _parse_worker_args(argv[2:])
        elif argv[:2] == ["dask", "scheduler"]:
            _parse_scheduler_args(argv[2:])
        else:
            continue
        seen.add(argv[1])
    assert seen == {"worker", "scheduler"}, commands


def test_no_reference_to_the_old_scripts() -> None:
    found = subprocess.run(["git", "grep", "-l", "-e", "start-worker.sh", "-e", "start-scheduler.sh", "--",
                            ".", ":!tests/test_deploy.py"],
                           cwd=ROOT, capture_output=True, text=True, check=False)
    assert found.stdout == "", found.stdout
