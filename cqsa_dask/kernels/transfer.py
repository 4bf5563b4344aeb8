"""Copies between host memory and a CUDA device, off the task's compute stream.

A quorum task's compute thread should only queue kernels, so that the GPU
always has work.  Two per-process side streams per device carry the copies:

* ``upload`` runs on an IO thread right after a block is read: it copies the
  block to the device on the upload stream and records an event; ``use``
  makes the compute stream wait for that event (on the GPU, not the host).
* ``download`` copies a slot's result back on the download stream once the
  kernels that made it are done (``done_event``), while the compute stream
  already runs the next slot's kernels.

On the CPU every function is the identity (``Staged.event`` is None).
"""

from __future__ import annotations

import threading
from dataclasses import dataclass

import torch

__all__ = ["Staged", "done_event", "download", "upload", "upload_buffer", "upload_into", "use"]

_STREAMS: dict[tuple[torch.device, str], torch.cuda.Stream] = {}
_LOCK = threading.Lock()


def _side_stream(dev: torch.device, role: str) -> torch.cuda.Stream:
    """The process's ``role`` ("up" or "down") stream on ``dev``, kept for its life: the
    caching allocator reuses a block only on the stream that allocated it, so a fixed
    stream keeps the uploaded blocks in one pool (see ``WorkerRuntime.task_stream``)."""
    with _LOCK:
        s = _STREAMS.get((dev, role))
        if s is None:
            s = _STREAMS[(dev, role)] = torch.cuda.Stream(dev)
        return s


@dataclass(frozen=True)
class Staged:
    """A tensor on the task's device, and the event after which it is valid (None: now)."""

    tensor: torch.Tensor
    event: torch.cuda.Event | None = None


def upload(x: torch.Tensor, dev: torch.device) -> Staged:
    """Copy host tensor ``x`` (any shape) to CUDA device ``dev`` on the upload stream.

    Blocks the calling (IO) thread only while the driver stages a pageable
    ``x``; the copy itself is ordered by the returned event.  A tensor already
    on ``dev`` (generated inputs) or a CPU ``dev`` comes back as is.
    """
    if dev.type != "cuda" or x.device.type == "cuda":
        return Staged(x)
    dev = _indexed(dev)
    s = _side_stream(dev, "up")
    with torch.cuda.stream(s):
        y = x.to(dev, non_blocking=True)
        ev = torch.cuda.Event()
        ev.record(s)
    return Staged(y, ev)


def upload_buffer(shape: tuple[int, ...], dtype: torch.dtype, dev: torch.device) -> torch.Tensor:
    """An uninitialised tensor on ``dev`` for ``upload_into`` to fill, allocated on the upload
    stream (CUDA; like ``upload``'s copies), so the copies into it need no other ordering."""
    if dev.type != "cuda":
        return torch.empty(shape, dtype=dtype)
    with torch.cuda.stream(_side_stream(_indexed(dev), "up")):
        return torch.empty(shape, dtype=dtype, device=dev)


def upload_into(dst: torch.Tensor, x: torch.Tensor) -> torch.cuda.Event | None:
    """Copy ``x`` (host, or a CUDA tensor of the calling thread's stream) into ``dst`` (a view of an
    ``upload_buffer``, same shape) on the upload stream; the event after which ``dst`` holds it
    (None on the CPU, where the copy is done on return)."""
    if not dst.is_cuda:
        dst.copy_(x)
        return None
    s = _side_stream(_indexed(dst.device), "up")
    if x.is_cuda:  # read on the upload stream: not to be reused before the copy ran
        s.wait_stream(torch.cuda.current_stream(x.device))
        x.record_stream(s)
    with torch.cuda.stream(s):
        dst.copy_(x, non_blocking=True)
        ev = torch.cuda.Event()
        ev.record(s)
    return ev


def _indexed(dev: torch.device) -> torch.device:
    """``dev`` with its index (the current device's when it has none)."""
    return dev if dev.index is not None else torch.device("cuda", torch.cuda.current_device())


def use(r: Staged) -> torch.Tensor:
    """``r``'s tensor, safe to read on the calling thread's current stream.

    The current stream waits for the upload, and a CUDA tensor is marked as used
    by it, so that its memory is not reused before the kernels reading it ran:
    an uploaded block was allocated on the upload stream, a generated one
    (synthetic inputs) on its IO thread's stream, and the task drops a slot's q
    as soon as its kernels are queued.
    """
    if r.tensor.is_cuda:
        cur = torch.cuda.current_stream(r.tensor.device)
        if r.event is not None:
            cur.wait_event(r.event)
        r.tensor.record_stream(cur)
    return r.tensor


def done_event(dev: torch.device) -> torch.cuda.Event | None:
    """An event recorded on the current stream of ``dev`` (None on the CPU): it fires
    when the kernels queued so far are done."""
    if dev.type != "cuda":
        return None
    ev = torch.cuda.Event()
    ev.record(torch.cuda.current_stream(dev))
    return ev


def download(x: torch.Tensor, after: torch.cuda.Event | None) -> torch.Tensor:
    """``x`` (any shape) in host memory, copied on the download stream once ``after``
    fired; blocks until the copy is done.  A CPU ``x`` comes back as is."""
    if not x.is_cuda:
        return x
    s = _side_stream(x.device, "down")
    with torch.cuda.stream(s):
        if after is not None:
            s.wait_event(after)
        return x.to("cpu")
