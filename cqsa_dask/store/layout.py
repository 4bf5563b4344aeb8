"""The job store: a Zarr v3 group holding inputs, outputs and engine state.

::

    STORE/                       (user's group; only q, k, v, or the attribute
                                  cqsa_source of generated inputs (synthetic.py), are read)
    ├── q    (B, Hq,  N, D)      input  float32 | float16 | bfloat16*
    ├── k    (B, Hkv, N, D)      input
    ├── v    (B, Hkv, N, D)      input
    ├── out  (B, Hq,  N, D)      written: q's dtype, chunks (1, hq_t, G, D)
    ├── lse  (B, Hq,  N)         written: float32,  chunks (1, hq_t, G)
    └── _cqsa/                   everything else the engine keeps
        ├── zarr.json            attrs: plan, job token, engine version
        ├── partial_out (|D|, B, Hq, N, D)  slot s of the producer task
        ├── partial_lse (|D|, B, Hq, N)     float32
        ├── task_done   (W, B, J) uint8     1 = quorum task's partials durable  (markers:
        ├── merge_done  (W, B, J) uint8     1 = out/lse of that group durable    a chunk iff 1)
        ├── task_stats  (W, B, J, F) float64  per-task figures (STAT_FIELDS), NaN = none
        └── merge_stats (W, B, J, F) float64  the same for merges (``cqsa dashboard``)

    * bfloat16 is stored as uint16 with attribute {"logical_dtype": "bfloat16"}
      (zarr 3.1 has no bfloat16 dtype); the bits are identical.

Invariants: chunks of out, lse and the partials align with token groups
(G tokens) and head blocks (hq_t query heads), so every chunk has exactly one
writer.  Float data does not compress, so every array is stored without a
compressor (docs/store-format.md).  A marker is written only after the data
it vouches for.  Nothing outside ``_cqsa``, ``out`` and ``lse`` is ever
written.
"""

from __future__ import annotations

import zlib
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from functools import lru_cache
from typing import Any

import numpy as np
import torch
import zarr
import zarr.errors

from cqsa_dask.core.dtypes import DTYPES, parse_dtype, torch_dtype
from cqsa_dask.core.errors import InvalidInputError, StoreError
from cqsa_dask.core.plan import Plan
from cqsa_dask.core.shapes import validate_shapes
from cqsa_dask.store.chunkio import MARKERS_ATTR, BlockStream, chunk_io
from cqsa_dask.store.generated import SyntheticSource, source_of
from cqsa_dask.store.location import OpenMode, StoreLike, StoreLocation, parse_store
from cqsa_dask.store.markers import Markers
from cqsa_dask.store.nodes import create_local_array, open_local_array, open_local_group

__all__ = [
    "ENGINE",
    "STAT_FIELDS",
    "TORCH_DTYPES",
    "InputInfo",
    "array",
    "chunk_exists",
    "create_array",
    "create_markers",
    "create_outputs",
    "delete_chunk",
    "delete_chunks",
    "engine",
    "input_info",
    "open_store",
    "read_block",
    "stored",
    "stream_block",
    "write_block",
    "write_raw",
    "write_stats",
    "write_tensor",
]

ENGINE = "_cqsa"
# Per-task figures kept in task_stats / merge_stats (last axis), written by the
# task just before its marker: start (Unix time, s), wall seconds, compute and
# I/O seconds, bytes read and written, device peak (bytes; NaN on CPU), worker
# (CRC-32 of the worker's address) and runs (how many times the task computed
# and wrote this record: the record before it plus one).  Stores of an engine
# before "runs" have the first 8 fields only.
STAT_FIELDS = ("start", "seconds", "compute_seconds", "io_seconds", "bytes_read", "bytes_written",
               "peak_device_bytes", "worker", "runs")
_LOGICAL = "logical_dtype"
#: torch dtype of each logical dtype name.
TORCH_DTYPES = {name: torch_dtype(name) for name in DTYPES}


def open_store(store: Any, mode: OpenMode = "r+", storage_options: Mapping[str, Any] | None = None) -> zarr.Group:
    """Open the existing Zarr v3 group of ``store`` (anything :func:`location.parse_store` takes)
    or raise :class:`StoreError`."""
    return parse_store(store, storage_options).open_group(mode)


# Arrays are opened with write_empty_chunks on: zarr's default (off) compares every chunk
# written with the fill value first (np.array_equal with equal_nan: slower than the
# write itself for a large chunk), and a
# chunk then exists exactly when it was written, which the markers and fold.py's
# journal rely on.  Set per array (not through zarr.config, which is process-wide).
# Marker arrays are the exception (chunkio.MARKERS_ATTR): writing 0 deletes the
# chunk, so that their chunks exist exactly where a marker is set.
_WRITE_EVERY_CHUNK: Any = {"write_empty_chunks": True}  # a zarr ArrayConfigParams
_MARKER_CHUNKS: Any = {"write_empty_chunks": False}


def array(group: zarr.Group, name: str, hint: str = "") -> zarr.Array:
    """The array ``name`` of ``group``; :class:`StoreError` if missing or a group.

    ``hint`` is appended to the message for a missing array.
    """
    local = open_local_array(group, name, _config)  # a local directory: read from its zarr.json
    if local is not None:
        return local
    try:
        node = group[name]
    except KeyError:
        raise StoreError(f"store has no array {name!r}{': ' + hint if hint else ''}") from None
    if not isinstance(node, zarr.Array):
        raise StoreError(f"{name!r} in the store is a group, not an array")
    return node.with_config(_config(node.attrs))


def _config(attrs: Mapping[str, Any]) -> Any:
    """The zarr ArrayConfigParams of an array with attributes ``attrs``: markers skip empty chunks."""
    return _MARKER_CHUNKS if attrs.get(MARKERS_ATTR) == "presence" else _WRITE_EVERY_CHUNK


def engine(group: zarr.Group) -> zarr.Group:
    """The engine subgroup ``_cqsa`` of ``group``; :class:`StoreError` if absent."""
    local = open_local_group(group, ENGINE)  # a local directory: read from its zarr.json
    node = local if local is not None else group.get(ENGINE)
    if not isinstance(node, zarr.Group):
        raise StoreError(f"the store holds no cqsa job (no {ENGINE} group): start one with `cqsa run`")
    return node


def logical_dtype(arr: zarr.Array) -> str:
    """The element type an array stands for: float32, float16 or bfloat16."""
    tag = arr.attrs.get(_LOGICAL)
    if tag is not None:
        return parse_dtype(str(tag))
    return parse_dtype(str(arr.dtype))


@dataclass(frozen=True)
class InputInfo:
    """Shapes and dtype of the q, k, v arrays of a store, validated."""

    batch: int
    heads_q: int
    heads_kv: int
    seq_len: int
    head_dim: int
    dtype: str


def input_info(group: zarr.Group) -> InputInfo:
    """Validate the q, k, v arrays (or the synthetic source) of ``group`` and describe them."""
    source = source_of(group)
    if source is not None:  # generated inputs (synthetic.py): the source was validated when parsed
        return InputInfo(source.batch, source.heads_q, source.heads_kv, source.seq_len, source.head_dim,
                         source.dtype)
    q, k, v = (array(group, n, hint="it needs q, k, v shaped (B, H, N, D)") for n in ("q", "k", "v"))
    validate_shapes(q.shape, k.shape, v.shape)
    dtypes = {logical_dtype(a) for a in (q, k, v)}
    if len(dtypes) != 1:
        raise InvalidInputError(f"q, k, v must share one dtype, got {sorted(dtypes)}")
    b, hq, n, d = q.shape
    return InputInfo(b, hq, k.shape[1], n, d, dtypes.pop())


def _zarr_dtype(dtype: str) -> str:
    return "uint16" if dtype == "bfloat16" else dtype


def _attrs(dtype: str) -> dict[str, Any]:
    return {_LOGICAL: dtype} if dtype == "bfloat16" else {}


_NAN_BITS = {"bfloat16": 0x7FC0}  # a NaN fill for bfloat16 stored as uint16


def create_array(group: zarr.Group, name: str, shape: tuple[int, ...], chunks: tuple[int, ...],
                 dtype: str, overwrite: bool = True, nan_fill: bool = False) -> zarr.Array:
    """An uncompressed array of logical ``dtype``; chunks clipped to the shape.

    ``nan_fill``: missing chunks read as NaN (so a lost chunk cannot pass
    for data); otherwise they read as 0.
    """
    chunks = tuple(max(1, min(c, s)) for c, s in zip(chunks, shape))
    fill: float = (_NAN_BITS.get(dtype, float("nan"))) if nan_fill else 0
    spec: dict[str, Any] = {"shape": shape, "chunks": chunks, "dtype": _zarr_dtype(dtype),
                            "fill_value": fill, "attributes": _attrs(dtype)}
    if overwrite and create_local_array(group, name, **spec):  # a local directory: no zarr round trips
        return array(group, name)
    return group.create_array(name, compressors=None, overwrite=overwrite, config=_WRITE_EVERY_CHUNK, **spec)


def create_markers(group: zarr.Group, name: str, shape: tuple[int, ...]) -> zarr.Array:
    """A uint8 marker array, one chunk per marker, whose chunks exist exactly where it holds 1
    (``chunkio.MARKERS_ATTR``: writing 0 deletes the chunk), so all of it is read with one listing."""
    spec: dict[str, Any] = {"shape": shape, "chunks": (1,) * len(shape), "dtype": "uint8", "fill_value": 0,
                            "attributes": {MARKERS_ATTR: "presence"}}
    if create_local_array(group, name, **spec):  # a local directory: no zarr round trips
        return array(group, name)
    return group.create_array(name, compressors=None, overwrite=True, config=_MARKER_CHUNKS, **spec)


def write_tensor(group: zarr.Group, name: str, t: torch.Tensor, chunks: tuple[int, ...]) -> None:
    """Store tensor ``t`` (any shape, float32/float16/bfloat16) as array ``name``."""
    dtype = parse_dtype(str(t.dtype))
    arr = create_array(group, name, tuple(t.shape), chunks, dtype)
    arr[...] = _to_numpy(t)


def _to_numpy(t: torch.Tensor) -> np.ndarray:
    t = t.detach().to("cpu").contiguous()
    if t.dtype == torch.bfloat16:
        return t.view(torch.uint16).numpy()
    return t.numpy()


def _to_torch(a: np.ndarray, dtype: str) -> torch.Tensor:
    t = torch.from_numpy(np.ascontiguousarray(a))
    return t.view(torch.bfloat16) if dtype == "bfloat16" else t


def read_block(arr: zarr.Array, index: tuple[Any, ...], dtype: str) -> torch.Tensor:
    """Read ``arr[index]`` as a CPU tensor of logical ``dtype``."""
    return _to_torch(np.asarray(arr[index]), dtype)


def write_block(arr: zarr.Array, index: tuple[Any, ...], t: torch.Tensor) -> None:
    """Write tensor ``t`` into ``arr[index]`` (bfloat16 as its uint16 bits): a block that is
    one whole chunk is replaced atomically (``chunkio``: straight into its file on a plain
    local store)."""
    write_raw(arr, index, _to_numpy(t))


def stream_block(arr: zarr.Array, index: tuple[Any, ...]) -> BlockStream | None:
    """A writer of block ``index`` = (b, heads, tokens) of a 4-D array in token runs, published
    whole at its commit (``chunkio.BlockStream``), when the block is one whole chunk of a plain local
    array; else None (write the block whole)."""
    return chunk_io(arr).stream(index)


def stored(t: torch.Tensor) -> np.ndarray:
    """``t`` as a host array of its stored dtype (bfloat16 as its uint16 bits)."""
    return _to_numpy(t)


def write_raw(arr: zarr.Array, index: tuple[Any, ...], data: np.ndarray) -> None:
    """Write ``data`` (``arr``'s stored dtype) into ``arr[index]`` (``chunkio``: one whole chunk
    is replaced atomically, straight into its file on a plain local store)."""
    chunk_io(arr).write(index, data)


def chunk_exists(arr: zarr.Array, coords: tuple[int, ...]) -> bool:
    """Whether the chunk at grid position ``coords`` of ``arr`` is stored."""
    return chunk_io(arr).exists(coords)


def delete_chunk(arr: zarr.Array, coords: tuple[int, ...]) -> None:
    """Delete the chunk at grid position ``coords`` (absent: nothing to do); it then reads as the fill value."""
    chunk_io(arr).delete(coords)


def delete_chunks(arr: zarr.Array, coords: Sequence[tuple[int, ...]]) -> None:
    """:func:`delete_chunk` of each of ``coords``, in as few store requests as the store allows."""
    chunk_io(arr).delete_many(coords)


def write_stats(arr: zarr.Array, index: tuple[int, int, int], stats: Mapping[str, Any]) -> None:
    """Write the ``STAT_FIELDS`` of one task into ``arr[index]`` (missing or None: NaN).

    ``stats["worker"]`` may be the worker's address; it is stored as its CRC-32.  ``runs`` is
    counted here: the runs of the record already there (none: 0) plus one.  An array of an
    older engine, with fewer fields, gets the fields it has.
    """
    worker = stats.get("worker")
    if isinstance(worker, str):
        stats = {**stats, "worker": zlib.crc32(worker.encode())}
    fields = STAT_FIELDS[:arr.shape[-1]]
    if "runs" in fields:
        own_chunk = tuple(arr.chunks[:3]) == (1, 1, 1) and arr.chunks[3] == arr.shape[3]
        before = float(np.asarray(arr[(*index, STAT_FIELDS.index("runs"))])) \
            if not own_chunk or chunk_exists(arr, (*index, 0)) else float("nan")  # no record: nothing to read
        stats = {**stats, "runs": (before if np.isfinite(before) else 0.0) + 1}
    row = [stats.get(f) for f in fields]
    write_raw(arr, index, np.array([np.nan if v is None else float(v) for v in row], dtype=np.float64))


def create_outputs(group: zarr.Group, plan: Plan, token: str,
                   attrs: Mapping[str, Any] | None = None) -> zarr.Group:
    """Create out, lse and the engine subgroup for ``plan``; return the subgroup.

    Overwrites earlier outputs and engine state (callers decide on resume).  The subgroup's
    attributes (the plan, ``token``, the engine version, and ``attrs``) are written last, once
    every array exists.
    """
    b, hq, n, d = plan.batch, plan.heads_q, plan.seq_len, plan.head_dim
    g, ht = plan.group_size, plan.q_heads_per_task
    grid = (plan.groups, b, plan.head_blocks)
    create_array(group, "out", (b, hq, n, d), (1, ht, g, d), plan.dtype)
    create_array(group, "lse", (b, hq, n), (1, ht, g), "float32")
    eng = group.create_group(ENGINE, overwrite=True)
    plan.policy.create_arrays(eng, plan)  # partial_out, partial_lse (and the fold arrays of bounded jobs)
    create_markers(eng, "task_done", grid)
    create_markers(eng, "merge_done", grid)
    nf = len(STAT_FIELDS)
    for name in ("task_stats", "merge_stats"):
        create_array(eng, name, (*grid, nf), (1, 1, 1, nf), "float64", nan_fill=True)
    eng.update_attributes({"plan": plan.to_dict(), "token": token, "engine_version": _version(), **(attrs or {})})
    return eng


def _version() -> str:
    from cqsa_dask import __version__

    return __version__


class Job:
    """Arrays of one job, opened once per worker process (see :func:`open_job`)."""

    def __init__(self, store: StoreLocation, token: str):
        group = store.open_group("r+")
        eng = engine(group)
        if eng.attrs.get("token") != token:
            raise StoreError(f"store {store.describe()} holds job {eng.attrs.get('token')!r}, not {token!r}")
        self.plan = Plan.from_dict(dict(eng.attrs["plan"]))  # type: ignore[arg-type]
        # A synthetic store generates its inputs (synthetic.py) and has no q, k, v arrays.
        self.source: SyntheticSource | None = source_of(group)
        self.q, self.k, self.v = (array(group, n) if self.source is None else None for n in ("q", "k", "v"))
        self.out, self.lse = array(group, "out"), array(group, "lse")
        # markers read one cell at a time by chunk presence (markers.py), written through zarr
        self.task_done, self.merge_done = Markers(array(eng, "task_done")), Markers(array(eng, "merge_done"))
        # Stores written by an engine without per-task records have neither.
        self.task_stats = array(eng, "task_stats") if "task_stats" in eng else None
        self.merge_stats = array(eng, "merge_stats") if "merge_stats" in eng else None
        # the partials policy's arrays by name (execution/partials: partial_out, partial_lse; fold_state, ...)
        self.partials: dict[str, zarr.Array] = self.plan.policy.open_arrays(eng)


def open_job(store: StoreLike, token: str) -> Job:
    """The :class:`Job` of ``store`` (a :class:`StoreLocation`, or anything ``parse_store`` takes),
    opened once per process and job token."""
    return _cached_job(parse_store(store), token)


@lru_cache(maxsize=16)
def _cached_job(store: StoreLocation, token: str) -> Job:
    return Job(store, token)
