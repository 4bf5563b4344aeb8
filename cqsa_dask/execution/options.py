"""How workers run a job's tasks: :class:`RunOptions`, read once on the client.

dask.config set on the client does not reach running workers, so the client
reads the ``cqsa.*`` settings tasks need into one frozen, picklable value
that travels with every task (and with the worker plugin,
``runtime.CQSAWorkerPlugin``).  The YAML keys (``cqsa.yaml``) are the user's
contract and keep their names; the fields are their snake_case twins.

Two kinds of field, one value::

    per task      device, kernel, check_finite, pin_host_memory, cuda_turn, first_pieces
    per worker    host_cache, io_threads, io_order, torch_threads, zarr_concurrency,
                  resource, cap_device_memory, expandable_segments, tasks_in_flight
                  (the runtime is built from these once per worker process;
                   ``runtime_key`` tells two runtimes apart)

Pure: imports neither torch nor zarr (``tasks_in_flight = "auto"`` asks
torch whether CUDA is there only when ``device`` does not say).
"""

from __future__ import annotations

import dataclasses
import hashlib
from dataclasses import dataclass
from typing import Any, Literal

from cqsa_dask import config
from cqsa_dask.core.errors import InvalidInputError

__all__ = ["RunOptions"]

PinSetting = Literal["auto"] | bool

# field -> cqsa.yaml key (the user's contract)
_KEYS = {
    "device": "device", "kernel": "kernel", "check_finite": "check-finite", "torch_threads": "torch-threads",
    "zarr_concurrency": "zarr-concurrency", "host_cache": "host-cache", "io_threads": "io-threads",
    "pin_host_memory": "pin-host-memory", "resource": "resource", "cap_device_memory": "cap-device-memory",
    "expandable_segments": "expandable-segments", "tasks_in_flight": "tasks-in-flight", "retries": "retries",
    "cuda_turn": "cuda-turn", "io_order": "io-order", "first_pieces": "first-pieces",
}
# the fields the worker runtime is built from (the rest is read by each task)
_RUNTIME_FIELDS = ("host_cache", "io_threads", "io_order", "torch_threads", "zarr_concurrency", "resource",
                   "cap_device_memory", "expandable_segments", "device")


@dataclass(frozen=True)
class RunOptions:
    """The settings a worker needs to run tasks (``cqsa.*`` keys in brackets).

    device: where tasks compute, "auto" | "cpu" | "cuda" | "cuda:1" (``device``).
    kernel: attention kernel, "auto" or a name (``kernel``).
    check_finite: fail on NaN/Inf inputs (``check-finite``).
    torch_threads: intra-op threads of a worker process, None = all the cores it may run on (``torch-threads``).
    zarr_concurrency: zarr's async concurrency in a worker process (``zarr-concurrency``).
    host_cache: host cache bytes, "8GB", "auto" or 0 (``host-cache``).
    io_threads: store IO threads per worker (``io-threads``).
    io_order: "tasks" (the earliest task's IO first) or "fifo" (as queued) (``io-order``;
        ``iopool.py``).
    pin_host_memory: "auto" | True | False (``pin-host-memory``).
    resource: the worker resource carrying the budget (``resource``).
    cap_device_memory: cap torch's CUDA allocator at that resource (``cap-device-memory``).
    expandable_segments: let the CUDA allocator grow segments (``expandable-segments``).
    tasks_in_flight: quorum tasks a worker holds at once ("auto" resolved:
        2 on CUDA, 1 on the CPU) (``tasks-in-flight``).
    retries: attempts after the first when a task fails for a transient reason
        (``retries``); a deterministic failure stops the job at once (``tasks.py``).
    cuda_turn: how tasks in flight on one GPU share it (``cuda-turn``): "streams", the
        kernels of every task in flight at once on their own streams, or "kernels", one
        task's kernels at a time (the others read and write meanwhile); "auto" reads as "streams".
    first_pieces: 1, or 2: the first two query pieces of a non-causal W = 1 row with resident
        k and v attend the key blocks together as they land (``first-pieces``; ``tasks.py``).

    No defaults here: they live in ``cqsa.yaml``; build one with :meth:`from_config`.
    """

    device: str
    kernel: str
    check_finite: bool
    torch_threads: int | None
    zarr_concurrency: int
    host_cache: int | str
    io_threads: int
    pin_host_memory: PinSetting
    resource: str
    cap_device_memory: bool
    expandable_segments: bool
    tasks_in_flight: int
    retries: int
    cuda_turn: str
    io_order: str
    first_pieces: int

    @classmethod
    def from_config(cls, **overrides: Any) -> RunOptions:
        """The options of dask.config's ``cqsa.*`` settings, with ``overrides`` (field names) on top."""
        unknown = sorted(set(overrides) - set(_KEYS))
        if unknown:
            raise InvalidInputError(f"unknown run options {unknown}; known: {sorted(_KEYS)}")
        raw = {f: overrides[f] if f in overrides else config.get(k) for f, k in _KEYS.items()}
        return cls.parse(raw)

    @classmethod
    def parse(cls, raw: dict[str, Any]) -> RunOptions:
        """Validate and type the settings ``raw`` (field -> value as dask.config holds it)."""
        try:
            threads = raw["torch_threads"]
            pin = raw["pin_host_memory"]
            return cls(
                device=str(raw["device"]), kernel=str(raw["kernel"]), check_finite=bool(raw["check_finite"]),
                torch_threads=None if threads in (None, 0, "0") else int(threads),
                zarr_concurrency=int(raw["zarr_concurrency"]), host_cache=_cache_setting(raw["host_cache"]),
                io_threads=int(raw["io_threads"]), pin_host_memory="auto" if pin == "auto" else bool(pin),
                resource=str(raw["resource"]), cap_device_memory=bool(raw["cap_device_memory"]),
                expandable_segments=bool(raw["expandable_segments"]),
                tasks_in_flight=_in_flight(raw["tasks_in_flight"], str(raw["device"])),
                retries=max(0, int(raw["retries"])), cuda_turn=_cuda_turn(raw["cuda_turn"]),
                io_order=_choice("io-order", raw["io_order"], ("tasks", "fifo")),
                first_pieces=_first_pieces(raw["first_pieces"]),
            )
        except (TypeError, ValueError) as e:
            raise InvalidInputError(f"a cqsa run option is not understood ({e}); see cqsa.yaml") from None

    def replace(self, **changes: Any) -> RunOptions:
        """A copy with ``changes`` (field names)."""
        return dataclasses.replace(self, **changes)

    @property
    def runtime_key(self) -> str:
        """A short digest of the per-worker fields: workers keep one runtime per key."""
        text = repr(tuple(getattr(self, f) for f in _RUNTIME_FIELDS))
        return hashlib.sha1(text.encode()).hexdigest()[:12]


def _cache_setting(value: Any) -> int | str:
    if isinstance(value, str) and value != "auto" and value.strip().isdigit():
        return int(value)
    return value if isinstance(value, str) else int(value)


def _cuda_turn(value: Any) -> str:
    """``cqsa.cuda-turn``: "kernels" or "streams"; "auto" (the default until 2026-12-04, which took
    turns for jobs of one token group) is now "streams"."""
    turn = _choice("cuda-turn", value, ("streams", "kernels", "auto"))
    return "streams" if turn == "auto" else turn


def _first_pieces(value: Any) -> int:
    """``cqsa.first-pieces``: 1 or 2 (the memory model holds two pieces' queries and accumulators
    at once only in the terms a non-causal task leaves free: ``core/plan.py``)."""
    if isinstance(value, bool) or str(value).strip() not in ("1", "2"):
        raise ValueError(f"first-pieces must be 1 or 2, got {value!r}")
    return int(value)


def _choice(key: str, value: Any, allowed: tuple[str, ...]) -> str:
    """``value`` of setting ``key``, one of ``allowed``."""
    if value not in allowed:
        names = [repr(a) for a in allowed]
        raise ValueError(f"{key} must be {', '.join(names[:-1])} or {names[-1]}, got {value!r}")
    return str(value)


def _in_flight(value: Any, device: str) -> int:
    """``cqsa.tasks-in-flight``: an int, or "auto" = 2 on CUDA (one task loads while another
    computes), 1 on the CPU (one task already uses every core)."""
    if value != "auto":
        n = int(value)
        if n < 1:
            raise ValueError(f"tasks-in-flight must be at least 1, got {value!r}")
        return n
    if device.startswith("cuda"):
        return 2
    if device == "cpu":
        return 1
    import torch  # "auto" device: ask whether CUDA is there

    return 2 if torch.cuda.is_available() else 1
