"""Nodes of a local directory store, created and opened straight from their zarr.json.

zarr creates and opens a node through its event loop: on a ``LocalStore`` every
``create_array`` and every ``group[name]`` is several hops to zarr's IO thread
and back, most of it Python around the file operations, whose own cost is tens of
microseconds (``benchmarks/store_ops.py``).  A job's start creates about ten
arrays, and its first task opens a dozen more, which is a visible share of a
short job.  On a local directory store (``zarr.storage.LocalStore``, zarr v3) this
module does the same with the same metadata, without the hops::

    create  the node's zarr.json, made by zarr itself in a MemoryStore (cached per
            specification), replaces the node: its old directory removed (zarr's
            overwrite), the document written to a temporary name and renamed
    open    the node's zarr.json read and parsed into a ``zarr.Array`` over the
            group's own store (``AsyncArray`` from the document's metadata, as
            zarr's open builds it; the parsed metadata, immutable, is cached per
            document), with the config the caller picks from its attributes; a
            subgroup (the engine's ``_cqsa``) likewise, its attributes as stored now

Any other store (URLs, Store objects, another zarr format) is left to zarr: the
functions return False / None and the caller goes through zarr's API.  Both ways
give the same document byte for byte and the same array (tests/test_nodes.py).
"""

from __future__ import annotations

import json
import os
import shutil
import uuid
from collections.abc import Callable
from functools import lru_cache
from pathlib import Path
from typing import Any

import zarr
import zarr.storage
from zarr.core.array import AsyncArray, parse_array_metadata
from zarr.core.group import AsyncGroup, GroupMetadata
from zarr.core.metadata.v3 import ArrayV3Metadata

__all__ = ["create_local_array", "open_local_array", "open_local_group"]

_DOC = "zarr.json"


def _node_dir(group: zarr.Group, name: str) -> Path | None:
    """The directory of node ``name`` of ``group`` on a local zarr v3 store, else None."""
    store = group.store
    if not isinstance(store, zarr.storage.LocalStore) or group.metadata.zarr_format != 3 or "/" in name:
        return None
    return Path(store.root) / group.path / name if group.path else Path(store.root) / name


def _node_path(group: zarr.Group, name: str) -> str:
    return f"{group.path}/{name}" if group.path else name


@lru_cache(maxsize=256)
def _document(spec: str) -> bytes:
    """The zarr.json zarr writes for an array of ``spec`` (JSON: create_array's arguments)."""
    kwargs = json.loads(spec)
    docs: dict[str, Any] = {}
    zarr.create_array(zarr.storage.MemoryStore(docs), name="a", zarr_format=3, compressors=None, **kwargs)
    return bytes(docs[f"a/{_DOC}"].to_bytes())


def create_local_array(group: zarr.Group, name: str, *, shape: tuple[int, ...], chunks: tuple[int, ...],
                       dtype: str, fill_value: float, attributes: dict[str, Any]) -> bool:
    """Create (replacing what is there) the uncompressed array ``name`` of ``group`` when its store
    is a writable local directory; False (nothing done) otherwise."""
    where = _node_dir(group, name)
    if where is None or group.store.read_only:
        return False
    spec = json.dumps({"shape": list(shape), "chunks": list(chunks), "dtype": dtype, "fill_value": fill_value,
                       "attributes": attributes}, sort_keys=True)
    doc = _document(spec)
    if where.is_symlink() or where.is_file():
        where.unlink()
    elif where.exists():
        shutil.rmtree(where)
    where.mkdir(parents=True)
    tmp = where / f".{_DOC}.{uuid.uuid4().hex}.partial"
    with open(tmp, "wb") as f:
        f.write(doc)
    os.replace(tmp, where / _DOC)
    return True


def open_local_array(group: zarr.Group, name: str,
                     config: Callable[[dict[str, Any]], Any]) -> zarr.Array | None:
    """The array ``name`` of ``group`` read from its zarr.json, with ``config(attributes)`` as its
    zarr ArrayConfigParams; None when the store is not a local directory or ``name`` is not an
    array there (missing, a group: the caller asks zarr, which says which)."""
    where = _node_dir(group, name)
    if where is None:
        return None
    try:
        meta = _metadata((where / _DOC).read_bytes())
    except (OSError, ValueError, TypeError):  # missing, not JSON, not array metadata zarr accepts
        return None
    if meta is None:
        return None
    path = zarr.storage.StorePath(group.store, _node_path(group, name))
    return zarr.Array(AsyncArray(metadata=meta, store_path=path, config=config(dict(meta.attributes))))


def open_local_group(group: zarr.Group, name: str) -> zarr.Group | None:
    """The subgroup ``name`` of ``group`` read from its zarr.json; None when the store is not a
    local directory or ``name`` is not a plain zarr v3 group there (the caller asks zarr)."""
    where = _node_dir(group, name)
    if where is None:
        return None
    try:
        meta = json.loads((where / _DOC).read_bytes())
    except (OSError, ValueError):
        return None
    if (not isinstance(meta, dict) or meta.get("node_type") != "group" or meta.get("zarr_format") != 3
            or meta.get("consolidated_metadata")):
        return None
    path = zarr.storage.StorePath(group.store, _node_path(group, name))
    return zarr.Group(AsyncGroup(metadata=GroupMetadata.from_dict(meta), store_path=path))


@lru_cache(maxsize=512)
def _metadata(doc: bytes) -> ArrayV3Metadata | None:
    """The array metadata of the zarr.json ``doc`` (immutable, so shared by every array opened
    from the same document); None when it is not a zarr v3 array's."""
    meta = json.loads(doc)
    if not isinstance(meta, dict) or meta.get("node_type") != "array" or meta.get("zarr_format") != 3:
        return None
    parsed = parse_array_metadata(meta)  # as zarr's open parses it
    return parsed if isinstance(parsed, ArrayV3Metadata) else None
