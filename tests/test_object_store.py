"""Jobs on stores that are not local directories: S3 (a real local server) and zarr Store objects.

::

    moto_server 127.0.0.1:PORT  ── bucket "cqsa"
        s3://cqsa/<job>.zarr   q, k, v written with plain zarr (zstd-compressed chunks)
        `cqsa run URL` (a subprocess) with AWS_ENDPOINT_URL, AWS_ACCESS_KEY_ID, ...  (partials all)
        `cqsa run URL --storage-options '{endpoint_url, key, secret}'`              (bounded, causal)
          kill -9 mid-job -> `cqsa resume` at once: the lease taken over, no marked task rerun
          -> verify passes, status complete, no partial left, out, lse == float64 reference
        run(url, storage_options=...) on worker processes; `cqsa run/resume/dashboard` in process
    the lease: a compare-and-swap (If-Match); markers: one GET each, one LIST in all (a counting
        server, benchmarks/s3server.py)
    s3://missing-bucket/..., a closed port, refused credentials -> StoreError / exit 2, nothing written
    zarr MemoryStore: runs on a threaded cluster (run, attention); refused before anything is
        written when the workers are other processes

Every store operation of these jobs goes through the zarr implementation of
the chunk IO (``zarrio.py``): nothing here is a local file.
"""

from __future__ import annotations

import contextlib
import json
import os
import signal
import socket
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import dask.config
import numpy as np
import pytest
import torch
import zarr
import zarr.storage
from conftest import RESOURCE, draw_inputs
from distributed import Client, LocalCluster
from reference import check_exact

import cqsa_dask
from cqsa_dask.core.errors import InvalidInputError, StoreError
from cqsa_dask.store.location import parse_store
from cqsa_dask.tools.cli import main

BUCKET = "cqsa"
KEY, SECRET = "test-key", "test-secret"
AWS_VARS = ("AWS_ENDPOINT_URL", "AWS_ACCESS_KEY_ID", "AWS_SECRET_ACCESS_KEY", "AWS_REGION", "AWS_DEFAULT_REGION",
            "AWS_PROFILE", "AWS_SESSION_TOKEN")
# fail fast where nothing answers (botocore and s3fs retry connection errors by default)
FAST = {"config_kwargs": {"retries": {"max_attempts": 1}, "connect_timeout": 2}}


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


@contextlib.contextmanager
def _moto(env: dict[str, str] | None = None) -> Iterator[str]:
    """A moto S3 server process on a free local port; yields its endpoint URL."""
    port = _free_port()
    exe = Path(sys.executable).with_name("moto_server")
    proc = subprocess.Popen([str(exe), "-H", "127.0.0.1", "-p", str(port)], stdout=subprocess.DEVNULL,
                            stderr=subprocess.DEVNULL, env={**os.environ, **(env or {})})
    try:
        deadline = time.monotonic() + 60
        while True:
            with contextlib.suppress(OSError), socket.create_connection(("127.0.0.1", port), timeout=1):
                break
            if proc.poll() is not None or time.monotonic() > deadline:
                raise RuntimeError(f"moto_server did not start (exit status {proc.poll()})")
            time.sleep(0.1)
        yield f"http://127.0.0.1:{port}"
    finally:
        proc.terminate()
        proc.wait(timeout=30)


@pytest.fixture(scope="module")
def endpoint() -> Iterator[str]:
    with _moto() as url:
        import boto3

        boto3.client("s3", endpoint_url=url, aws_access_key_id=KEY, aws_secret_access_key=SECRET,
                     region_name="us-east-1").create_bucket(Bucket=BUCKET)
        yield url


@pytest.fixture(autouse=True)
def _clean_aws_environment(monkeypatch: pytest.MonkeyPatch) -> Iterator[None]:
    """No AWS_* variable of the machine leaks in; s3fs forgets file systems made with another environment."""
    import s3fs

    for var in AWS_VARS:
        monkeypatch.delenv(var, raising=False)
    s3fs.S3FileSystem.clear_instance_cache()
    yield
    s3fs.S3FileSystem.clear_instance_cache()


@pytest.fixture(scope="module")
def threaded_client() -> Iterator[Client]:
    with LocalCluster(n_workers=1, threads_per_worker=2, processes=False, resources={RESOURCE: 4e9},
                      dashboard_address=":0") as cluster, Client(cluster) as c:
        yield c


def _options(endpoint: str) -> dict[str, Any]:
    return {"endpoint_url": endpoint, "key": KEY, "secret": SECRET}


def _write_inputs(url: str, options: dict[str, Any] | None, q: torch.Tensor, k: torch.Tensor,
                  v: torch.Tensor) -> None:
    """q, k, v into a new group at ``url`` with plain zarr (default codecs: zstd-compressed chunks)."""
    _write_inputs_to(zarr.open_group(url, mode="w", storage_options=options, zarr_format=3), q, k, v)


def _write_inputs_to(g: zarr.Group, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> None:
    for name, t in (("q", q), ("k", k), ("v", v)):
        bf16 = t.dtype == torch.bfloat16
        data = t.view(torch.uint16).numpy() if bf16 else t.numpy()
        arr = g.create_array(name, shape=data.shape, chunks=(1, t.shape[1], 64, t.shape[3]), dtype=data.dtype,
                             attributes={"logical_dtype": "bfloat16"} if bf16 else {})
        arr[...] = data


def _read(url: str, options: dict[str, Any] | None, name: str) -> torch.Tensor:
    arr = zarr.open_group(url, mode="r", storage_options=options, zarr_format=3)[name]
    assert isinstance(arr, zarr.Array)
    t = torch.from_numpy(np.ascontiguousarray(arr[...]))
    return t.view(torch.bfloat16) if arr.attrs.get("logical_dtype") == "bfloat16" else t


def _keys(endpoint: str, prefix: str) -> list[str]:
    import s3fs

    fs = s3fs.S3FileSystem(**_options(endpoint), skip_instance_cache=True)
    return [p for p in fs.find(f"{BUCKET}/{prefix}") if not p.endswith("zarr.json")]


def test_resume_and_the_report_of_a_job_on_s3_take_storage_options(endpoint: str, tmp_path: Path,
                                                                    capsys: pytest.CaptureFixture[str]) -> None:
    """`cqsa run`, `cqsa resume` and `cqsa dashboard` with --storage-options (a threaded local cluster)."""
    inp = draw_inputs(1, 2, 2, 80, 8)
    print(f"inputs: {inp.ctx}")
    url, options = f"s3://{BUCKET}/cli-{inp.seed}.zarr", _options(endpoint)
    _write_inputs(url, options, inp.q, inp.k, inp.v)
    cli = ["--storage-options", json.dumps(options)]
    with dask.config.set({"cqsa.local-cluster.processes": False, "cqsa.local-cluster.dashboard-address": ":0"}):
        assert main(["run", url, "--json", "--groups", "3", "--budget", "1GB", *cli]) == 0
        capsys.readouterr()
        assert main(["resume", url, "--json", *cli]) == 0
    done = json.loads(capsys.readouterr().out.splitlines()[-1])
    assert done["resumed"] and done["quorum_tasks_run"] == 0 and done["merges_run"] == 0
    check_exact(inp.q, inp.k, inp.v, _read(url, options, "out"), _read(url, options, "lse"), causal=False,
                scale=None, context=inp.ctx)
    report = tmp_path / "report.html"
    assert main(["dashboard", url, "--out", str(report), *cli]) == 0
    assert report.stat().st_size > 10_000 and url in report.read_text()


def test_an_in_memory_store_runs_on_a_threaded_cluster_only(threaded_client: Client, client: Client) -> None:
    inp = draw_inputs(1, 2, 1, 70, 8)
    print(f"inputs: {inp.ctx}")
    store = zarr.storage.MemoryStore()
    out, lse = cqsa_dask.attention(inp.q, inp.k, inp.v, return_lse=True, client=threaded_client, groups=3,
                                   store=store)
    check_exact(inp.q, inp.k, inp.v, out, lse, causal=False, scale=None, context=inp.ctx)
    assert "_cqsa" in zarr.open_group(store, mode="r"), "the given store is kept"
    other = zarr.storage.MemoryStore()
    _write_inputs_to(zarr.open_group(other, mode="w"), inp.q, inp.k, inp.v)
    with pytest.raises(InvalidInputError, match="memory of another process"):
        cqsa_dask.run(other, client=client, memory_budget="1GB")  # the session cluster: worker processes
    assert sorted(zarr.open_group(other, mode="r").keys()) == ["k", "q", "v"], "nothing was written"


def test_a_worker_process_opens_the_store_from_the_location_it_receives(endpoint: str, client: Client) -> None:
    """The tasks' StoreLocation (URL and storage_options) is pickled to a worker process (the
    session cluster's), which has no AWS_* variables: the job runs there on the options alone."""
    inp = draw_inputs(1, 2, 1, 96, 8)
    print(f"inputs: {inp.ctx}")
    url, options = f"s3://{BUCKET}/process-{inp.seed}.zarr", _options(endpoint)
    _write_inputs(url, options, inp.q, inp.k, inp.v)
    pid = os.getpid()
    assert all(p != pid for p in client.run(os.getpid).values()), "the session cluster's workers are processes"
    res = cqsa_dask.run(url, storage_options=options, client=client, groups=3, memory_budget="1GB")
    assert res.quorum_tasks_run == res.plan.tasks
    check_exact(inp.q, inp.k, inp.v, _read(url, options, "out"), _read(url, options, "lse"), causal=False,
                scale=None, context=inp.ctx)


def test_a_missing_bucket_is_a_store_error_and_nothing_is_written(
        endpoint: str, capsys: pytest.CaptureFixture[str]) -> None:
    import boto3

    s3 = boto3.client("s3", endpoint_url=endpoint, aws_access_key_id=KEY, aws_secret_access_key=SECRET,
                      region_name="us-east-1")
    before = {b["Name"] for b in s3.list_buckets()["Buckets"]}
    with pytest.raises(StoreError, match="is not a Zarr v3 group .nothing found there: check the bucket") as e:
        cqsa_dask.run("s3://missing-bucket/job.zarr", storage_options=_options(endpoint), memory_budget="1GB")
    assert "\n" not in str(e.value) and SECRET not in str(e.value)
    assert main(["run", "s3://missing-bucket/job.zarr", "--storage-options", json.dumps(_options(endpoint))]) == 2
    err = capsys.readouterr().err
    assert err.startswith("cqsa: error: store s3://missing-bucket/job.zarr") and err.count("\n") == 1, err
    assert {b["Name"] for b in s3.list_buckets()["Buckets"]} == before, "a bucket was created"


def test_an_unreachable_endpoint_is_one_line_and_exit_2(capsys: pytest.CaptureFixture[str]) -> None:
    options = {**_options(f"http://127.0.0.1:{_free_port()}"), **FAST}
    t0 = time.monotonic()
    with pytest.raises(StoreError, match="cannot be opened .EndpointConnectionError"):
        parse_store("s3://cqsa/job.zarr", options).open_group("r+")
    assert main(["verify", "s3://cqsa/job.zarr", "--storage-options", json.dumps(options)]) == 2
    err = capsys.readouterr().err
    assert err.startswith("cqsa: error: store s3://cqsa/job.zarr") and err.count("\n") == 1, err
    assert time.monotonic() - t0 < 60


def test_refused_credentials_are_a_store_error() -> None:
    """A server that checks credentials (moto with authentication on) refuses unknown keys."""
    with _moto({"INITIAL_NO_AUTH_ACTION_COUNT": "0"}) as url:
        with pytest.raises(StoreError, match="cannot be written: permission denied") as e:
            parse_store(f"s3://{BUCKET}/job.zarr", {**_options(url), **FAST}).open_group("r+")
        assert SECRET not in str(e.value) and "\n" not in str(e.value)


def test_bad_storage_options_on_the_cli_are_one_line(capsys: pytest.CaptureFixture[str], tmp_path: Path) -> None:
    for bad in ("{not json", "[1, 2]"):
        assert main(["status", "s3://cqsa/job.zarr", "--storage-options", bad]) == 2
        err = capsys.readouterr().err
        assert err.startswith("cqsa: error: argument --storage-options: expected a JSON object") and \
            err.count("\n") == 1, err
    assert main(["status", str(tmp_path / "job.zarr"), "--storage-options", '{"anon": true}']) == 2
    assert "apply to URLs" in capsys.readouterr().err
    assert not (tmp_path / "job.zarr").exists()


def test_generated_inputs_on_s3_through_the_cli(endpoint: str, capsys: pytest.CaptureFixture[str]) -> None:
    """`cqsa run --synthetic N URL` creates the synthetic store on S3, runs it, and the same command
    again finds that store (same source) and resumes; `cqsa verify` checks it there."""
    url = f"s3://{BUCKET}/synthetic-{os.getpid()}-{time.monotonic_ns()}.zarr"
    cli = ["--storage-options", json.dumps(_options(endpoint))]
    command = ["run", url, "--synthetic", "96", "--heads", "2", "--head-dim", "8", "--dtype", "float32",
               "--seed", "7", "--groups", "3", "--budget", "1GB", "--json", *cli]
    with dask.config.set({"cqsa.local-cluster.processes": False, "cqsa.local-cluster.dashboard-address": ":0"}):
        assert main(command) == 0
        first = json.loads(capsys.readouterr().out.splitlines()[-1])
        assert main(command) == 0
        second = json.loads(capsys.readouterr().out.splitlines()[-1])
    assert first["quorum_tasks_run"] > 0 and not first["resumed"]
    assert second["resumed"] and second["quorum_tasks_run"] == 0
    assert parse_store(url, _options(endpoint)).has_group()
    assert _keys(endpoint, url.split("/", 3)[3] + "/q") == [], "generated inputs are not stored"
    assert main(["verify", url, "--json", *cli]) == 0
    assert json.loads(capsys.readouterr().out)["passed"]
    other = [*command[:4], "--heads", "4", *command[6:]]  # another source at the same URL
    assert main(other) == 2
    assert "holds another synthetic source" in capsys.readouterr().err


# -- kill -9 of `cqsa run` on S3, then `cqsa resume` ----------------------------------------------


def _engine_array(url: str, options: dict[str, Any], name: str) -> np.ndarray:
    arr = zarr.open_group(url, mode="r", storage_options=options, zarr_format=3)["_cqsa"][name]
    assert isinstance(arr, zarr.Array)
    return np.asarray(arr[...])


def _cqsa_env(endpoint: str, credentials: str) -> tuple[dict[str, str], list[str]]:
    """The environment and CLI options of a `cqsa` subprocess reaching the server one way or the other."""
    env = {**os.environ, "PYTHONPATH": str(Path(__file__).resolve().parents[1]), "DASK_CQSA__TORCH_THREADS": "1",
           "DASK_CQSA__LOCAL_CLUSTER__DASHBOARD_ADDRESS": ":0", "DASK_CQSA__LOCAL_CLUSTER__PROCESSES": "false"}
    if credentials == "environment":
        env.update(AWS_ENDPOINT_URL=endpoint, AWS_ACCESS_KEY_ID=KEY, AWS_SECRET_ACCESS_KEY=SECRET,
                   AWS_REGION="us-east-1")
        return env, []
    return env, ["--storage-options", json.dumps(_options(endpoint))]


def _kill_when(proc: subprocess.Popen[bytes], ready: Any, log: Path, timeout: float = 120) -> None:
    """SIGKILL the session ``proc`` leads (the CLI and its local workers) once ``ready()`` holds."""
    deadline = time.monotonic() + timeout
    try:
        while not ready():
            assert proc.poll() is None, f"`cqsa run` ended before it was killed:\n{log.read_text()[-3000:]}"
            assert time.monotonic() < deadline, f"no task marker after {timeout}s:\n{log.read_text()[-3000:]}"
            time.sleep(0.1)
    finally:
        with contextlib.suppress(ProcessLookupError):
            os.killpg(proc.pid, signal.SIGKILL)
        proc.wait(timeout=30)


@pytest.mark.parametrize(("credentials", "dtype", "partials", "causal"), [
    ("environment", torch.bfloat16, "all", False),
    ("storage_options", torch.float32, "bounded", True),
], ids=["env-bf16-all", "options-fp32-bounded-causal"])
def test_a_killed_run_on_s3_resumes_at_once_without_recomputing_marked_tasks(
        endpoint: str, tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str],
        credentials: str, dtype: torch.dtype, partials: str, causal: bool) -> None:
    """kill -9 of `cqsa run s3://...` (a subprocess with a threaded local cluster) once two task
    markers exist, then at once `cqsa resume` (a subprocess too): the dead holder's lease is taken
    over, every task marked before is kept (its record untouched), exactly the others run, `cqsa
    verify` passes, `cqsa status` says complete, no partial is left, and out, lse match float64."""
    inp = draw_inputs(1, 2, 1, 26 * 7 - 5, 16, dtype)  # GQA; W = 7 groups of 26 tokens, the last 21; |D| = 3
    print(f"inputs: {inp.ctx}")
    options = _options(endpoint)
    env, cli = _cqsa_env(endpoint, credentials)
    log = tmp_path / "run.log"
    # The kill must land mid-job, which a quiet machine can outrun (the seven tasks finish within a
    # listing's time of the second marker): a job finished before the kill proves nothing, so it is
    # started again on a fresh store, up to three times.
    for attempt in range(3):
        url = f"s3://{BUCKET}/killed-{partials}-{inp.seed}-{attempt}.zarr"
        _write_inputs(url, options, inp.q, inp.k, inp.v)
        prefix = url.split("/", 3)[3] + "/_cqsa/task_done"
        with open(log, "wb") as f:
            first = subprocess.Popen(
                [sys.executable, "-m", "cqsa_dask", "run", url, "--groups", "7", "--budget", "1GB", "--partials",
                 partials, "--json", *(["--causal"] if causal else []), *cli],
                stdout=f, stderr=subprocess.STDOUT, env=env, start_new_session=True)
        t0 = time.monotonic()
        _kill_when(first, lambda: len(_keys(endpoint, prefix)) >= 2, log)  # noqa: B023  (called at once)
        print(f"attempt {attempt}: killed after {time.monotonic() - t0:.1f}s")
        time.sleep(0.5)  # a request already sent when the processes died is answered
        marked = _engine_array(url, options, "task_done")[:, 0, 0] == 1
        records = _engine_array(url, options, "task_stats")[:, 0, 0]
        merged = int(_engine_array(url, options, "merge_done").sum())
        print(f"killed with {int(marked.sum())}/7 tasks and {merged}/7 merges marked")
        if marked.sum() < 7:
            break
    assert 2 <= marked.sum() < 7, "not killed mid-job"
    lease = zarr.open_group(url, mode="r", storage_options=options)["_cqsa"].attrs["lease"]
    assert isinstance(lease, dict) and lease["pid"] == first.pid, "a killed run cannot release its lease"

    t0 = time.monotonic()
    resume = subprocess.run([sys.executable, "-m", "cqsa_dask", "resume", url, "--json", *cli], env=env, check=False,
                            capture_output=True, text=True, timeout=240)
    assert resume.returncode == 0 and "Traceback" not in resume.stderr, resume.stderr[-3000:]
    print(f"resume: {time.monotonic() - t0:.1f}s")
    done = json.loads(resume.stdout.splitlines()[-1])
    assert done["event"] == "done" and done["resumed"]
    assert done["quorum_tasks_run"] == 7 - int(marked.sum()), "a task with a marker was run again"
    assert done["merges_run"] == 7 - merged
    after = _engine_array(url, options, "task_stats")[:, 0, 0]
    np.testing.assert_array_equal(after[marked], records[marked], err_msg="a marked task's record was rewritten")
    assert not np.isnan(after[:, 0]).any(), "every task has its record (start time)"
    assert _engine_array(url, options, "task_done").all() and _engine_array(url, options, "merge_done").all()
    with monkeypatch.context() as m:  # `cqsa verify`, in this process, reaching the store the same way
        for var in ("AWS_ENDPOINT_URL", "AWS_ACCESS_KEY_ID", "AWS_SECRET_ACCESS_KEY", "AWS_REGION"):
            if var in env:
                m.setenv(var, env[var])
        capsys.readouterr()
        assert main(["verify", url, "--json", *cli]) == 0
        assert json.loads(capsys.readouterr().out)["passed"]
        assert main(["status", url, "--json", *cli]) == 0
        st = json.loads(capsys.readouterr().out)
    assert st["complete"] and not st["running"] and st["tasks_done"] == st["merges_done"] == 7
    assert _keys(endpoint, url.split("/", 3)[3] + "/_cqsa/partial_out") == [], "a finished job keeps no partials"
    check_exact(inp.q, inp.k, inp.v, _read(url, options, "out"), _read(url, options, "lse"), causal=causal,
                scale=None, context=inp.ctx)


# -- the lease and the markers on S3: conditional writes, requests in bulk ------------------------


def test_the_lease_on_s3_is_a_compare_and_swap(endpoint: str) -> None:
    """Two runs read the lease at the same moment: the second write fails (If-Match), the store keeps
    the first run's lease, and a renewal never overwrites a lease another run took."""
    from cqsa_dask.store.conditional import attribute_swap
    from cqsa_dask.store.jobstate import Lease

    url = f"s3://{BUCKET}/lease-{os.getpid()}-{time.monotonic_ns()}.zarr"
    group = zarr.open_group(url, mode="w", storage_options=_options(endpoint), zarr_format=3)
    group.create_group("_cqsa").attrs.update({"plan": {"groups": 7}})
    swap = attribute_swap(zarr.open_group(url, mode="r+", storage_options=_options(endpoint))["_cqsa"])
    assert swap is not None, "an s3:// store has conditional writes"
    seen = swap.read()  # the second run reads the attributes...
    first = Lease(group, ttl=60)
    first.acquire()  # ...the first claims meanwhile, without a settling wait
    assert first._atomic
    assert not swap.write(seen, {**seen.attrs, "lease": {"owner": "second"}}), "a stale write went through"
    stored = swap.read().attrs
    assert stored["lease"]["owner"] == first.owner and stored["plan"] == {"groups": 7}
    with pytest.raises(StoreError, match="another run holds this store"):
        Lease(group, ttl=60).acquire()
    now = swap.read()  # a third run takes the lease over (as after the first's expiry)...
    assert swap.write(now, {**now.attrs, "lease": {"owner": "third", "expires": time.time() + 60}})
    first._write()  # ...and the first run's next renewal leaves it alone
    first.release()
    assert swap.read().attrs["lease"]["owner"] == "third"


def test_markers_on_s3_cost_one_request_each_and_one_listing_in_all() -> None:
    """Counted at the server: a marker cell read is one GET, set or not; all markers of an array are
    one LIST whatever their number (W = 7 and W = 600); a merge's partials go in one delete."""
    from benchmarks.s3server import counting_s3
    from cqsa_dask.store.layout import array, create_markers, delete_chunks
    from cqsa_dask.store.markers import Markers

    with counting_s3((BUCKET,), KEY, SECRET) as server:
        options = _options(server.endpoint)
        group = zarr.open_group(f"s3://{BUCKET}/markers.zarr", mode="w", storage_options=options, zarr_format=3)
        lists = []
        for w in (7, 600):
            create_markers(group, f"done{w}", (w, 1, 1))
            marks = Markers(array(zarr.open_group(f"s3://{BUCKET}/markers.zarr", mode="r+",
                                                  storage_options=options), f"done{w}"))
            set_cells = sorted({0, 3, w - 1})
            for a in set_cells:
                marks[a, 0, 0] = 1
            server.reset()
            assert [int(marks[a, 0, 0]) for a in range(7)] == [int(a in set_cells) for a in range(7)]
            cells = server.counts(reset=True)
            assert cells.by_type() == {"GET": 7, "PUT": 0, "HEAD": 0, "LIST": 0, "DELETE": 0}, cells.rows
            got = marks.read_all()
            lists.append(server.counts(reset=True).by_type())
            assert sorted(np.flatnonzero(got[:, 0, 0])) == set_cells
        assert lists[0] == lists[1] == {"GET": 0, "PUT": 0, "HEAD": 0, "LIST": 1, "DELETE": 0}, lists
        parts = group.create_array("parts", shape=(8, 4), chunks=(1, 4), dtype="float32", compressors=None)
        parts[...] = np.ones((8, 4), np.float32)
        server.reset()
        delete_chunks(parts, [(i, 0) for i in range(8)])
        assert server.counts().by_type()["DELETE"] == 1
        assert not _keys(server.endpoint, "markers.zarr/parts/c")
