"""store/nodes.py: arrays created and opened from their zarr.json are zarr's own.

Every check compares with zarr doing the same thing through its API on another directory:
the documents byte for byte, the opened arrays' metadata and config, and the data written
through one and read through the other.
"""

from __future__ import annotations

import math
from pathlib import Path

import numpy as np
import pytest
import zarr
import zarr.storage
from hypothesis import given, settings
from hypothesis import strategies as st

from cqsa_dask.core.errors import StoreError
from cqsa_dask.store.chunkio import MARKERS_ATTR
from cqsa_dask.store.layout import array, create_array, create_markers
from cqsa_dask.store.nodes import create_local_array, open_local_array, open_local_group

EVERY = {"write_empty_chunks": True}


def _config(attrs: dict) -> dict:
    return {"write_empty_chunks": attrs.get(MARKERS_ATTR) != "presence"}


def _specs() -> st.SearchStrategy[dict]:
    @st.composite
    def spec(draw: st.DrawFn) -> dict:
        ndim = draw(st.integers(1, 5))
        shape = tuple(draw(st.lists(st.integers(1, 300), min_size=ndim, max_size=ndim)))
        chunks = tuple(draw(st.integers(1, s)) for s in shape)
        dtype = draw(st.sampled_from(["float32", "float64", "float16", "uint16", "uint8", "int64"]))
        floating = dtype.startswith("float")
        fill = draw(st.sampled_from([0, math.nan] if floating else [0, 7]))
        attrs = draw(st.sampled_from([{}, {"logical_dtype": "bfloat16"}, {MARKERS_ATTR: "presence"},
                                      {"nested": {"a": [1, 2.5, "x"]}}]))
        return {"shape": shape, "chunks": chunks, "dtype": dtype, "fill_value": fill, "attributes": attrs}

    return spec()


def _zarr_doc(root: Path, spec: dict) -> bytes:
    g = zarr.open_group(zarr.storage.LocalStore(root), mode="w")
    g.create_array("a", compressors=None, **spec)
    return (root / "a" / "zarr.json").read_bytes()


@settings(max_examples=60, deadline=None)
@given(spec=_specs())
def test_a_created_array_is_the_document_zarr_writes(tmp_path_factory: pytest.TempPathFactory, spec: dict) -> None:
    ours, theirs = tmp_path_factory.mktemp("ours"), tmp_path_factory.mktemp("zarr")
    g = zarr.open_group(zarr.storage.LocalStore(ours), mode="w")
    assert create_local_array(g, "a", **spec)
    assert (ours / "a" / "zarr.json").read_bytes() == _zarr_doc(theirs, spec)
    assert sorted(p.name for p in (ours / "a").iterdir()) == ["zarr.json"]  # no temporary left
    opened = open_local_array(g, "a", _config)
    assert opened is not None
    by_zarr = zarr.open_group(zarr.storage.LocalStore(theirs), mode="r+")["a"]
    assert repr(opened.metadata) == repr(by_zarr.metadata)  # (a NaN fill is unequal to itself)
    assert opened.store_path.path == "a"
    assert opened.config.write_empty_chunks == _config(spec["attributes"])["write_empty_chunks"]


def test_data_written_through_one_is_read_through_the_other(tmp_path: Path) -> None:
    g = zarr.open_group(zarr.storage.LocalStore(tmp_path), mode="w")
    eng = g.create_group("_cqsa")
    rng = np.random.default_rng()
    for name, fill in (("x", math.nan), ("y", 0)):
        assert create_local_array(eng, name, shape=(5, 37, 3), chunks=(2, 10, 3), dtype="float32",
                                  fill_value=fill, attributes={})
    ours = open_local_array(eng, "x", _config)
    assert ours is not None and ours.store_path.path == "_cqsa/x"
    data = rng.standard_normal((5, 37, 3)).astype(np.float32)
    ours[1:4, 3:30] = data[1:4, 3:30]
    theirs = zarr.open_group(zarr.storage.LocalStore(tmp_path), mode="r")["_cqsa/x"]
    got = np.asarray(theirs[...])
    np.testing.assert_array_equal(got[1:4, 3:30], data[1:4, 3:30])
    assert np.isnan(got[0]).all()  # unwritten chunks read as the fill value
    theirs_w = zarr.open_group(zarr.storage.LocalStore(tmp_path), mode="r+")["_cqsa/y"]
    theirs_w[...] = data
    again = open_local_array(eng, "y", _config)
    assert again is not None
    np.testing.assert_array_equal(np.asarray(again[...]), data)


def test_creating_replaces_the_node_and_its_chunks(tmp_path: Path) -> None:
    g = zarr.open_group(zarr.storage.LocalStore(tmp_path), mode="w")
    old = g.create_array("out", shape=(8,), chunks=(2,), dtype="float32", compressors=None, fill_value=0)
    old[...] = np.arange(1, 9, dtype=np.float32)
    g.create_group("grp").create_array("inner", shape=(2,), dtype="uint8")
    for name in ("out", "grp"):
        assert create_local_array(g, name, shape=(8,), chunks=(4,), dtype="float32", fill_value=0, attributes={})
        assert sorted(p.name for p in (tmp_path / name).iterdir()) == ["zarr.json"]
    fresh = zarr.open_group(zarr.storage.LocalStore(tmp_path), mode="r")
    assert isinstance(fresh["grp"], zarr.Array)
    np.testing.assert_array_equal(np.asarray(fresh["out"][...]), np.zeros(8, np.float32))
    assert fresh["out"].chunks == (4,)


def test_other_stores_and_other_nodes_are_left_to_zarr(tmp_path: Path) -> None:
    mem = zarr.open_group(zarr.storage.MemoryStore(), mode="w")
    spec = {"shape": (4,), "chunks": (2,), "dtype": "uint8", "fill_value": 0, "attributes": {}}
    assert not create_local_array(mem, "a", **spec)
    assert "a" not in mem
    mem.create_array("a", **spec)
    assert open_local_array(mem, "a", _config) is None
    g = zarr.open_group(zarr.storage.LocalStore(tmp_path), mode="w")
    g.create_group("sub")
    (tmp_path / "broken").mkdir()
    (tmp_path / "broken" / "zarr.json").write_text("{not json")
    for name in ("missing", "sub", "broken"):
        assert open_local_array(g, name, _config) is None
    ro = zarr.open_group(zarr.storage.LocalStore(tmp_path, read_only=True), mode="r")
    assert not create_local_array(ro, "a", **spec)
    assert not (tmp_path / "a").exists()


def test_layout_goes_through_it_and_keeps_its_errors(tmp_path: Path) -> None:
    g = zarr.open_group(zarr.storage.LocalStore(tmp_path), mode="w")
    arr = create_array(g, "out", (1, 2, 100, 8), (1, 2, 64, 8), "bfloat16", nan_fill=True)
    marks = create_markers(g, "task_done", (3, 1, 2))
    assert arr.attrs["logical_dtype"] == "bfloat16" and arr.config.write_empty_chunks
    assert marks.attrs[MARKERS_ATTR] == "presence" and not marks.config.write_empty_chunks
    assert array(g, "out").metadata == zarr.open_group(str(tmp_path), mode="r")["out"].metadata
    g.create_group("sub")
    with pytest.raises(StoreError, match="group, not an array"):
        array(g, "sub")
    with pytest.raises(StoreError, match="no array 'gone'"):
        array(g, "gone")


def test_a_subgroup_opened_from_its_document_is_zarrs(tmp_path: Path) -> None:
    g = zarr.open_group(zarr.storage.LocalStore(tmp_path), mode="w")
    attrs = {"plan": {"groups": 7, "scale": 0.125}, "token": "123", "lease": None}
    g.create_group("_cqsa", attributes=attrs).create_array("task_done", shape=(3,), dtype="uint8")
    ours = open_local_group(g, "_cqsa")
    theirs = zarr.open_group(str(tmp_path), mode="r+")["_cqsa"]
    assert ours is not None and ours.path == "_cqsa" and dict(ours.attrs) == dict(theirs.attrs) == attrs
    ours.update_attributes({"token": "456"})  # written through it, seen by zarr
    assert zarr.open_group(str(tmp_path), mode="r")["_cqsa"].attrs["token"] == "456"
    assert isinstance(ours["task_done"], zarr.Array)
    for name in ("missing", "_cqsa/task_done"):
        assert open_local_group(g, name) is None
    assert open_local_group(ours, "task_done") is None  # an array
    assert open_local_group(zarr.open_group(zarr.storage.MemoryStore(), mode="w"), "_cqsa") is None
