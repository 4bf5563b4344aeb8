"""parse_store: the one parser of store arguments, and the StoreLocation it returns.

::

    "job.zarr", Path, "file:///..", LocalStore  ->  local  (absolute path)
    "s3://b/job.zarr" + storage_options         ->  url
    MemoryStore, other zarr Stores              ->  object (must pickle; memory: this process only)
    bad arguments                               ->  InvalidInputError;  missing / not a group -> StoreError
"""

from __future__ import annotations

import gc
import os
import pickle
import re
import shlex
import subprocess
import sys
import threading
from pathlib import Path

import numpy as np
import pytest
import zarr
import zarr.storage
from hypothesis import given, settings
from hypothesis import strategies as st

from cqsa_dask.core.errors import InvalidInputError, StoreError
from cqsa_dask.core.plan import make_plan
from cqsa_dask.store.layout import create_array, create_outputs, open_job
from cqsa_dask.store.location import parse_store


def test_paths_are_local_and_absolute(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.chdir(tmp_path)
    for arg in ("job.zarr", Path("job.zarr"), f"file://{tmp_path}/job.zarr", str(tmp_path / "job.zarr"),
                zarr.storage.LocalStore(tmp_path / "job.zarr")):
        loc = parse_store(arg)
        assert loc.kind == "local" and loc.local_root == tmp_path / "job.zarr", arg
        assert loc == parse_store(str(tmp_path / "job.zarr")) and hash(loc) == hash(parse_store("job.zarr"))
        assert loc.describe() == str(tmp_path / "job.zarr") and not loc.process_local
    free = parse_store("missing/deeper.zarr").free_bytes()  # its nearest existing parent's file system
    assert isinstance(free, int) and free > 0
    home = parse_store("~/x.zarr").local_root
    assert home is not None and home == Path(os.path.expanduser("~/x.zarr"))


def test_urls_keep_their_storage_options_and_do_not_show_their_values() -> None:
    opts = {"endpoint_url": "http://127.0.0.1:9", "key": "AKIAEXAMPLE", "secret": "very-secret"}
    loc = parse_store("s3://bucket/job.zarr", opts)
    assert loc.kind == "url" and loc.target == "s3://bucket/job.zarr" and loc.storage_options == opts
    assert loc.local_root is None and loc.free_bytes() is None
    assert "very-secret" not in loc.describe() and "very-secret" not in repr(loc)
    assert "secret" in loc.describe()
    assert parse_store("s3://bucket/job.zarr", dict(opts)) == loc
    assert parse_store("s3://bucket/job.zarr", {**opts, "key": "other"}) != loc
    assert parse_store("s3://bucket/job.zarr") != loc
    assert parse_store("gs://b/p").kind == "url" and parse_store("memory://x/y.zarr").process_local
    opts["key"] = "changed afterwards"
    assert loc.storage_options["key"] == "AKIAEXAMPLE", "the location keeps its own copy"


def test_locations_pickle_hash_and_cannot_change(tmp_path: Path) -> None:
    for loc in (parse_store(tmp_path / "a.zarr"), parse_store("s3://b/job.zarr", {"anon": True, "client_kwargs": {}})):
        back = pickle.loads(pickle.dumps(loc))
        assert back == loc and hash(back) == hash(loc) and back.storage_options == loc.storage_options
        assert len({loc, back}) == 1
        with pytest.raises(AttributeError):
            loc.kind = "url"  # type: ignore[misc]  # frozen
    assert parse_store(parse_store("s3://b/p")) == parse_store("s3://b/p")


@pytest.mark.parametrize(("store", "options", "match"), [
    ("", None, "empty"),
    ("s3://", None, "names no bucket"),
    (123, None, "path, a URL or a zarr Store, got int"),
    (None, None, "got NoneType"),
    ("job.zarr", {"anon": True}, "apply to URLs"),
    ("s3://b/p", "anon=true", "must be a mapping"),
    ("s3://b/p", {1: 2}, "must be a mapping"),
    (parse_store("s3://b/p"), {"anon": True}, "not with a parsed StoreLocation"),
    (zarr.storage.MemoryStore(), {"anon": True}, "drop storage_options"),
])
def test_bad_arguments_are_invalid_input(store: object, options: object, match: str) -> None:
    with pytest.raises(InvalidInputError, match=match) as e:
        parse_store(store, options)  # type: ignore[arg-type]
    assert "\n" not in str(e.value)


def test_a_store_object_that_cannot_travel_is_refused(tmp_path: Path) -> None:
    zarr.open_group(tmp_path / "s.zarr", mode="w")
    store = zarr.storage.LocalStore(tmp_path / "s.zarr", read_only=True)
    assert parse_store(store).kind == "object"  # read-only: kept as given, so zarr refuses writes
    store._cqsa_lock = threading.Lock()  # type: ignore[attr-defined]
    with pytest.raises(InvalidInputError, match="cannot be pickled"):
        parse_store(store)


def test_opening_creates_nothing_and_says_what_is_wrong(tmp_path: Path) -> None:
    missing = parse_store(tmp_path / "missing.zarr")
    with pytest.raises(StoreError, match="does not exist"):
        missing.open_group("r+")
    assert not (tmp_path / "missing.zarr").exists() and not missing.has_group()
    (tmp_path / "plain").mkdir()
    with pytest.raises(StoreError, match="is not a Zarr v3 group .nothing found"):
        parse_store(tmp_path / "plain").open_group("r")
    assert list((tmp_path / "plain").iterdir()) == []
    zarr.open_group(tmp_path / "g.zarr", mode="w").create_array("a", shape=(2,), dtype="f4")
    with pytest.raises(StoreError, match="not a Zarr v3 group"):
        parse_store(tmp_path / "g.zarr" / "a").open_group("r")
    group = parse_store(tmp_path / "g.zarr").open_group("r")
    assert "a" in group and group.read_only
    with pytest.raises(StoreError, match="is not a Zarr v3 group .nothing found"):
        parse_store("memory://nothing/here.zarr").open_group("r")


def test_create_group_refuses_what_it_would_overwrite(tmp_path: Path) -> None:
    (tmp_path / "full").mkdir()
    (tmp_path / "full" / "notes.txt").write_text("keep me")
    with pytest.raises(StoreError, match="not empty"):
        parse_store(tmp_path / "full").create_group()
    assert (tmp_path / "full" / "notes.txt").read_text() == "keep me"
    loc = parse_store(tmp_path / "new.zarr")
    loc.create_group().attrs["x"] = 1
    assert loc.has_group() and loc.open_group("r").attrs["x"] == 1
    assert "x" not in loc.create_group(overwrite=True).attrs
    url = parse_store(f"memory://cqsa-test-{os.getpid()}/job.zarr")
    url.create_group()
    assert url.has_group()
    with pytest.raises(StoreError, match="already holds a Zarr node"):
        url.create_group()


def test_an_in_memory_store_stays_in_its_process(tmp_path: Path) -> None:
    """A pickled MemoryStore location opens the same store in this process (a threaded cluster)
    and fails with InvalidInputError in another process."""
    store = zarr.storage.MemoryStore()
    zarr.open_group(store, mode="w").attrs["here"] = True
    loc = parse_store(store)
    assert loc.kind == "object" and loc.process_local and loc.local_root is None
    blob = pickle.dumps(loc)
    back = pickle.loads(blob)
    assert back == loc and back.open_group("r").attrs["here"] is True
    back.open_group("r+").attrs["written"] = 1
    assert zarr.open_group(store, mode="r").attrs["written"] == 1, "the same store, not a copy"
    code = ("import pickle, sys\n"
            "from cqsa_dask.core.errors import InvalidInputError\n"
            "loc = pickle.loads(sys.stdin.buffer.read())\n"
            "try:\n    loc.open_group('r')\nexcept InvalidInputError as e:\n    print('refused:', e)\n")
    env = {**os.environ, "PYTHONPATH": str(Path(__file__).resolve().parents[1])}
    res = subprocess.run([sys.executable, "-c", code], check=False, input=blob, capture_output=True, env=env, timeout=120)
    assert res.returncode == 0, res.stderr.decode()
    assert "refused:" in res.stdout.decode() and "memory of another process" in res.stdout.decode()


def test_a_forgotten_in_memory_store_is_a_store_error() -> None:
    """The registry of in-memory stores does not keep them alive: a pickled location outliving its
    store says so."""
    blob = pickle.dumps(parse_store(zarr.storage.MemoryStore()))
    gc.collect()
    with pytest.raises(StoreError, match="no longer exists"):
        pickle.loads(blob).open_group("r")


def test_open_job_is_cached_per_location(tmp_path: Path) -> None:
    """Tasks get the StoreLocation (hashable): a process opens each job once, whatever form of the
    argument named it; a pickled location (as a task carries it) finds the same Job."""
    with pytest.raises(StoreError, match="does not exist"):
        open_job(tmp_path / "none.zarr", "tok")
    group = zarr.open_group(tmp_path / "j.zarr", mode="w")
    with pytest.raises(StoreError, match="no cqsa job"):
        open_job(str(tmp_path / "j.zarr"), "tok")
    plan = make_plan(seq_len=64, heads=2, head_dim=8, dtype="float32", budget="64MB", groups=4)
    for name in ("q", "k", "v"):
        create_array(group, name, (1, 2, 64, 8), (1, 2, 16, 8), "float32")
    create_outputs(group, plan, "tok-cache")
    loc = parse_store(tmp_path / "j.zarr")
    job = open_job(loc, "tok-cache")
    assert open_job(str(tmp_path / "j.zarr"), "tok-cache") is job
    assert open_job(pickle.loads(pickle.dumps(loc)), "tok-cache") is job
    with pytest.raises(StoreError, match="holds job 'tok-cache', not 'other'"):
        open_job(loc, "other")


_SEGMENT = st.text(alphabet="abcxyz019_-. ", min_size=1, max_size=8).filter(lambda t: t.strip(". ") != "")
_JSONABLE = st.recursive(st.none() | st.booleans() | st.integers() | st.text(max_size=5),
                         lambda inner: st.lists(inner, max_size=3) | st.dictionaries(st.text(max_size=5), inner,
                                                                                       max_size=3), max_leaves=6)


@settings(max_examples=60, deadline=None)
@given(parts=st.lists(_SEGMENT, min_size=1, max_size=4), absolute=st.booleans())
def test_any_path_is_one_absolute_local_location(parts: list[str], absolute: bool) -> None:
    text = os.path.join(*parts)
    text = os.sep + text if absolute else text
    loc = parse_store(text)
    assert loc.kind == "local" and loc.local_root == Path(os.path.abspath(text))
    assert loc == parse_store(Path(text)) == pickle.loads(pickle.dumps(loc))
    assert hash(loc) == hash(parse_store(os.path.abspath(text)))


@settings(max_examples=60, deadline=None)
@given(scheme=st.sampled_from(["s3", "gs", "az", "abfs", "http"]), path=st.lists(_SEGMENT, min_size=1, max_size=3),
       a=st.dictionaries(st.text(min_size=1, max_size=6), _JSONABLE, max_size=4),
       b=st.dictionaries(st.text(min_size=1, max_size=6), _JSONABLE, max_size=4))
def test_urls_are_equal_exactly_when_their_options_are(scheme: str, path: list[str], a: dict[str, object],
                                                       b: dict[str, object]) -> None:
    url = f"{scheme}://" + "/".join(p.strip() or "x" for p in path)
    la, lb = parse_store(url, a), parse_store(url, b)
    assert la.kind == "url" and la.target == url and la.local_root is None
    assert (la == lb) == (a == b)
    back = pickle.loads(pickle.dumps(la))
    assert back == la and hash(back) == hash(la) and back.storage_options == a


@pytest.mark.parametrize("how", ["path", "url"])
def test_a_zarr_v2_group_is_named_and_the_migration_it_names_works(tmp_path: Path, how: str) -> None:
    """A Zarr v2 group of q, k, v (written with plain zarr) is refused as such, naming zarr-python's
    migration; once it has run (`zarr migrate v3 STORE`, as the error says), the same store opens as
    a v3 group with the same values."""
    rng = np.random.default_rng()
    data = {n: rng.standard_normal((1, 2, 40, 8)).astype(np.float32) for n in "qkv"}
    path = tmp_path / "my v2.zarr"  # a space: the command in the error must still run as printed
    g2 = zarr.open_group(path, mode="w", zarr_format=2)
    for n, a in data.items():
        g2.create_array(n, data=a, chunks=(1, 2, 16, 8))
    target = str(path) if how == "path" else f"file://{path}"
    before = sorted(p.name for p in path.rglob("*"))
    with pytest.raises(StoreError, match=r"is a Zarr v2 group; .*`zarr migrate v3 ") as e:
        parse_store(target).open_group("r+")
    assert sorted(p.name for p in path.rglob("*")) == before  # nothing written
    command = re.search(r"`(zarr migrate v3 [^`]+)`", str(e.value))
    assert command is not None
    zarr_cli = Path(sys.executable).parent / "zarr"
    subprocess.run(f"{shlex.quote(str(zarr_cli))} {command.group(1).removeprefix('zarr ')}", shell=True, check=True,
                   capture_output=True)
    group = parse_store(target).open_group("r")
    for n, a in data.items():
        np.testing.assert_array_equal(np.asarray(group[n][...]), a)
