"""Durable job state in the store: input fingerprint, lease, progress.

All of it lives in the attributes and marker arrays of ``STORE/_cqsa``.

- Fingerprint (version 2, ``"2:" + hex``): the SHA-256 of the shapes, dtypes
  and attributes of q, k, v and of the first ``_ROWS`` token rows (every
  head) of up to ``_SAMPLES`` of their chunks (first, last and evenly spaced
  ones), read straight from the chunk files where they are plain, so what a
  start reads does not grow with the chunks' length in tokens (3 x 8 x 256
  rows of the chunks' heads); for generated inputs, of
  the source's canonical JSON (it defines every value).  A resumed run
  refuses when it differs; a job started before version 2 stored the bare
  hex of whole sampled chunks and is checked with that (``same_inputs``).
  Limit: a change confined to rows that are not sampled goes unnoticed
  (hashing terabytes on every start is not an option).
- Lease: {"owner", "expires"} in the attributes, renewed by the running
  client every ``ttl / 3`` seconds, with the holder's host, pid and process
  start time.  Another run refuses while the lease is live; a lease whose
  expiry passed, or whose holder was a process of this host that no longer
  exists (a killed client), is taken over.  On a
  local directory store the check and the write happen under an OS lock
  (``flock``) on the ``_cqsa`` directory, so two runs starting at once on
  one machine cannot both win.  On S3 they are one compare-and-swap of
  ``_cqsa/zarr.json`` (a PUT with ``If-Match`` its ETag, ``conditional.py``):
  of two runs claiming at once, one write fails; renewals and the release
  are conditional too, so a run never overwrites a lease another run took.
  Elsewhere (other object stores, file systems that refuse the lock) Zarr
  attributes are last-writer-wins, so acquisition writes, waits
  ``Lease.SETTLE`` and re-reads: two clients starting within that window
  are the residual risk.
- Progress: ``status`` counts the task and merge markers (read in bulk, ``chunkio.read_markers``).
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import socket
import sys
import threading
import time
import uuid
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from typing import Any

import numpy as np
import psutil
import torch
import zarr
import zarr.storage

from cqsa_dask.core.errors import StoreError
from cqsa_dask.core.plan import Plan
from cqsa_dask.store.chunkio import read_markers, read_rows
from cqsa_dask.store.conditional import AttributeSwap, attribute_swap
from cqsa_dask.store.generated import source_of
from cqsa_dask.store.layout import array, engine, open_store

if sys.platform != "win32":
    import fcntl

log = logging.getLogger(__name__)

__all__ = ["Lease", "Status", "check_free", "fingerprint", "same_inputs", "status"]

_SAMPLES = 8
_ROWS = 256  # token rows hashed per sampled chunk (version 2)
_VERSION = "2:"
_INT_OF_SIZE = {1: torch.uint8, 2: torch.int16, 4: torch.int32, 8: torch.int64}


def _sample_chunks(arr: zarr.Array) -> list[tuple[int, ...]]:
    grid = [-(-s // c) for s, c in zip(arr.shape, arr.chunks)]
    total = int(np.prod(grid))
    picks = sorted({int(i) for i in np.linspace(0, total - 1, min(_SAMPLES, total))})
    return [tuple(int(x) for x in np.unravel_index(i, grid)) for i in picks]


def fingerprint(group: zarr.Group) -> str:
    """``"2:"`` + SHA-256 over the shapes, dtypes and attributes of q, k, v and the first
    ``_ROWS`` token rows of their sampled chunks (of the source's JSON, when generated)."""
    return _VERSION + _digest(group, _sample_rows)


def same_inputs(group: zarr.Group, stored: Any) -> bool:
    """True when ``stored``, the fingerprint a job recorded (either version), is that of
    ``group``'s inputs now."""
    if not isinstance(stored, str):
        return False
    if stored.startswith(_VERSION):
        return stored == fingerprint(group)
    return stored == _digest(group, _whole_chunk)  # a job started before version 2


def _digest(group: zarr.Group, sample: Callable[[zarr.Array, tuple[int, ...]], bytes]) -> str:
    source = source_of(group)
    if source is not None:
        canonical = json.dumps(source.to_attrs(), sort_keys=True, separators=(",", ":"))
        return hashlib.sha256(canonical.encode()).hexdigest()
    h = hashlib.sha256()
    for name in ("q", "k", "v"):
        arr = array(group, name)
        h.update(f"{name}{arr.shape}{arr.dtype}{dict(arr.attrs)}".encode())
        for idx in _sample_chunks(arr):
            h.update(sample(arr, idx))
    return h.hexdigest()


def _whole_chunk(arr: zarr.Array, idx: tuple[int, ...]) -> bytes:
    """Version 1: the sampled chunk's elements, C order."""
    sl = tuple(slice(i * c, (i + 1) * c) for i, c in zip(idx, arr.chunks))
    return np.ascontiguousarray(arr[sl]).tobytes()


def _sample_rows(arr: zarr.Array, idx: tuple[int, ...], direct: bool = True) -> bytes:
    """Version 2: of the sampled chunk ``idx`` of a (B, H, N, D) input, batch element
    ``idx[0] * cb`` and the chunk's heads, its first ``_ROWS`` tokens, (H', T', D) C order:
    from the chunk files when they are plain (``direct``), else through zarr; the same
    bytes either way (a test checks it)."""
    cb, ch, ct, cd = arr.chunks
    b, heads = idx[0] * cb, slice(idx[1] * ch, min(arr.shape[1], (idx[1] + 1) * ch))
    t0 = idx[2] * ct
    tokens = slice(t0, min(arr.shape[2], t0 + min(ct, _ROWS)))
    dims = slice(idx[3] * cd, min(arr.shape[3], (idx[3] + 1) * cd))
    size = np.dtype(arr.dtype).itemsize
    if direct and size in _INT_OF_SIZE:
        x = read_rows(arr, b, heads, tokens, _INT_OF_SIZE[size])
        if x is not None:
            return x.numpy().tobytes()
    return np.ascontiguousarray(arr[b, heads, tokens, dims]).tobytes()


def _num(v: Any, default: float = 0.0) -> float:
    """A number kept in the JSON attributes (``default`` when absent)."""
    return float(v) if isinstance(v, (int, float)) else default


def _lock_dir(eng: zarr.Group) -> int | None:
    """An open descriptor holding an exclusive ``flock`` on the directory of ``eng``
    (closing it releases the lock); None when the store is not a local directory
    or the file system refuses the lock (the lease then settles instead)."""
    if sys.platform == "win32" or not isinstance(eng.store, zarr.storage.LocalStore):
        return None
    try:
        fd = os.open(os.path.join(eng.store.root, eng.path), os.O_RDONLY)
    except OSError:
        return None
    try:
        fcntl.flock(fd, fcntl.LOCK_EX)  # held for milliseconds: the check and the write
    except OSError:  # e.g. NFS, which wants a writable descriptor for an exclusive lock
        os.close(fd)
        return None
    return fd


class Lease:
    """An expiring claim on a store, renewed in a background thread."""

    def __init__(self, group: zarr.Group, ttl: float = 60.0, force: bool = False):
        self.eng = engine(group)
        self.ttl = ttl
        self.force = force
        self.owner = f"{_HOST}:{os.getpid()}:{uuid.uuid4().hex[:8]}"
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None
        self._last = time.time()
        self._claimed = time.monotonic()
        self._atomic = False  # the claim was atomic (directory lock, compare-and-swap): nothing to settle
        self._swap = attribute_swap(self.eng)  # S3: conditional writes of the attributes

    def _fields(self, attrs: Mapping[str, Any], lease: bool = True) -> dict[str, Any]:
        """The attributes a write of the lease sets, given the stored ``attrs`` (``lease`` False: dropped)."""
        now = time.time()
        active = _num(attrs.get("active_s")) + (now - self._last)
        self._last = now
        return {
            "lease": {"owner": self.owner, "expires": now + self.ttl, "host": _HOST, "pid": os.getpid(),
                      "started": _STARTED, "start_ticks": _START_TICKS} if lease else None,
            "updated_at": now, "active_s": active,
        }

    def _write(self, lease: bool = True) -> None:
        """Renew (or drop) the lease; through the compare-and-swap where the store has one, and then
        only while the stored lease is still ours."""
        if self._swap is None:
            self.eng.update_attributes(self._fields(self.eng.attrs, lease))  # one write of zarr.json
            return
        version = self._swap.read()
        cur = version.attrs.get("lease")
        if not isinstance(cur, dict) or cur.get("owner") != self.owner:
            log.warning("the lease of %s is now %s: left alone", self.owner,
                        f"held by {cur.get('owner')}" if isinstance(cur, dict) else "released")
            return
        if not self._swap.write(version, {**version.attrs, **self._fields(version.attrs, lease)}):
            log.info("the lease of %s changed while it was renewed; trying again later", self.owner)

    SETTLE = 0.2  # seconds between writing the lease and checking it is still ours (no directory lock)

    def acquire(self) -> None:
        """Take the lease or raise :class:`StoreError` if another run holds it."""
        self.claim()
        self.confirm()

    def claim(self) -> None:
        """Write the lease (first half of :meth:`acquire`): other work may run before :meth:`confirm`."""
        if self._swap is not None:
            self._claim_swap(self._swap)
            return
        fd = _lock_dir(self.eng)
        try:  # the attributes as stored now, not as they were when the group was opened
            self.eng = zarr.open_group(self.eng.store, path=self.eng.path, mode="r+")
            check_free(self.eng, force=self.force)
            self._last = time.time()
            self._claimed = time.monotonic()
            self._write()
        finally:
            if fd is not None:
                os.close(fd)
        self._atomic = fd is not None

    def _claim_swap(self, swap: AttributeSwap) -> None:
        """Check and write the lease in one compare-and-swap of the attributes (S3)."""
        version = swap.read()
        _check_lease(version.attrs.get("lease"), self.force)
        self._last = time.time()
        self._claimed = time.monotonic()
        if not swap.write(version, {**version.attrs, **self._fields(version.attrs)}):
            raise StoreError("another run took this store's lease at the same moment; try again")
        self._atomic = True

    def confirm(self) -> None:
        """Without the directory lock, wait out the rest of ``SETTLE`` since the claim, then check
        that no run starting at the same moment overwrote it (raise :class:`StoreError` if one
        did); start renewing."""
        if not self._atomic:
            time.sleep(max(0.0, self.SETTLE - (time.monotonic() - self._claimed)))
            cur = zarr.open_group(self.eng.store, path=self.eng.path, mode="r").attrs.get("lease")
            if not isinstance(cur, dict) or cur.get("owner") != self.owner:
                raise StoreError("another run took this store's lease at the same moment; try again")
        self._thread = threading.Thread(target=self._renew, name="cqsa-lease", daemon=True)
        self._thread.start()

    def _renew(self) -> None:
        while not self._stop.wait(self.ttl / 3):
            try:
                self._write()
            except OSError as e:  # keep trying: a full disk may be freed while the job runs
                log.info("could not renew the lease of %s: %s", self.owner, e)

    def release(self) -> None:
        """Stop renewing and drop the lease (only if still ours)."""
        self._stop.set()
        if self._thread is not None:
            self._thread.join()
        try:
            cur = self.eng.attrs.get("lease")
            if self._swap is not None or (isinstance(cur, dict) and cur.get("owner") == self.owner):
                self._write(lease=False)  # with the swap, checked against the stored lease
        except OSError as e:  # e.g. a full disk: the lease then expires by itself
            log.info("could not release the lease of %s: %s", self.owner, e)


def _start_ticks(pid: int) -> int | None:
    """When process ``pid`` started, in clock ticks since boot (Linux's /proc/PID/stat field 22);
    None elsewhere or when it is gone.  Unlike ``create_time`` (boot time + ticks, the boot time
    derived from the wall clock) it does not move when the clock is stepped: seen in a VM, where a
    live process's create_time moved by more than a second and its own lease looked abandoned."""
    try:
        with open(f"/proc/{pid}/stat", "rb") as f:
            stat = f.read()
        return int(stat[stat.rindex(b")") + 2:].split()[19])
    except (OSError, ValueError, IndexError):
        return None


_HOST = socket.gethostname()
_STARTED = psutil.Process().create_time()  # with the pid, names this process even after pid reuse
_START_TICKS = _start_ticks(os.getpid())  # the same, immune to a stepped wall clock (Linux)
_TAKEN_OVER: set[str] = set()  # leases of dead holders already announced (one line each)


def _holder_is_gone(lease: dict[str, Any]) -> bool:
    """True when ``lease`` was taken by a process of this host that no longer runs (a killed run):
    its pid is free, or taken by a process started at another time."""
    if lease.get("host") != _HOST or not isinstance(lease.get("pid"), int):
        return False  # another host's, or a lease from before host/pid were recorded: wait for expiry
    if isinstance(lease.get("start_ticks"), int):
        return _start_ticks(lease["pid"]) != lease["start_ticks"]  # gone (None), or the pid reused
    try:
        return abs(psutil.Process(lease["pid"]).create_time() - float(lease.get("started", 0.0))) > 1.0
    except psutil.NoSuchProcess:
        return True
    except (psutil.AccessDenied, ValueError):
        return False


def check_free(eng: zarr.Group, force: bool = False) -> None:
    """Raise :class:`StoreError` when a live lease of another run is present.

    A lease whose holder was a process of this host that no longer exists is
    free at once (said in one warning): a run killed with ``kill -9`` can be
    resumed immediately, not only once its lease expires.  ``force`` frees one held on another
    host too (the user has made sure that run is gone); never one of a live process here."""
    _check_lease(eng.attrs.get("lease"), force)


def _check_lease(cur: Any, force: bool) -> None:
    """:func:`check_free` of the stored lease ``cur``."""
    if not isinstance(cur, dict) or float(cur["expires"]) <= time.time():
        return
    if _holder_is_gone(cur):  # type: ignore[arg-type]
        if cur["owner"] not in _TAKEN_OVER:
            _TAKEN_OVER.add(str(cur["owner"]))
            log.warning("taking over the lease of %s: that process no longer exists on this host", cur["owner"])
        return
    here = cur.get("host") == _HOST
    if force and not here:
        log.warning("taking over the lease of %s (--force: the run on host %s is gone)", cur["owner"], cur.get("host"))
        return
    hint = ("stop it first" if here else "if that run is gone (its host down or the run killed), resume with "
            "--force (force=True)")
    raise StoreError(
        f"another run holds this store (lease of {cur['owner']}, valid {float(cur['expires']) - time.time():.0f} s "
        f"more); wait for it to finish, or {hint}"
    )


@dataclass(frozen=True)
class Status:
    """Progress of the job in a store.  Times in seconds, sizes in bytes."""

    tasks_done: int
    tasks_total: int
    merges_done: int
    merges_total: int
    bytes_written: int
    elapsed_s: float
    running: bool
    tasks_per_s: float
    eta_s: float | None
    plan: dict[str, Any]

    @property
    def complete(self) -> bool:
        return self.tasks_done == self.tasks_total and self.merges_done == self.merges_total


def status(store: Any, storage_options: Mapping[str, Any] | None = None) -> Status:
    """Read the progress of the job stored in ``store`` (a path, URL, zarr Store or
    ``StoreLocation``; ``storage_options`` for a URL), running or not."""
    group = open_store(store, mode="r", storage_options=storage_options)
    eng = engine(group)
    plan = Plan.from_dict(dict(eng.attrs["plan"]))  # type: ignore[arg-type]
    tdone = int(read_markers(array(eng, "task_done")).sum())
    mdone = int(read_markers(array(eng, "merge_done")).sum())
    per_task = plan.bytes_written // max(1, plan.tasks + plan.merges)
    lease = eng.attrs.get("lease")
    # a live lease of a process of this host that no longer exists (a killed run) is no run
    running = isinstance(lease, dict) and float(lease["expires"]) > time.time() and not _holder_is_gone(lease)
    elapsed = _num(eng.attrs.get("active_s"))
    if running:
        elapsed += time.time() - _num(eng.attrs.get("updated_at"), time.time())
    done, total = tdone + mdone, plan.tasks + plan.merges
    rate = done / elapsed if elapsed >= 1.0 else 0.0  # active time is only known to a renewal period
    return Status(
        tasks_done=tdone, tasks_total=plan.tasks, merges_done=mdone, merges_total=plan.merges,
        bytes_written=per_task * done, elapsed_s=elapsed, running=running, tasks_per_s=rate,
        eta_s=(total - done) / rate if rate > 0 else None, plan=plan.to_dict(),
    )
