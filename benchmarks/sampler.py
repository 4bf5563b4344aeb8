"""Where the threads of this process spend a call: a sampling profile (``CQSA_BENCH_SAMPLE=1``).

With the threaded worker (one GPU, ``cqsa.local-cluster.processes: auto``) the job's task,
IO and compute threads run in the benchmark's process, so sampling ``sys._current_frames()``
every few milliseconds shows what each waits on::

    with Sampler() as s:
        cqsa_dask.run(...)
    s.summary()  # {thread group: {"samples": n, "top": [[place, share], ...]}}

A thread's group is its name less trailing numbers (``cqsa-io_0`` -> ``cqsa-io``); its place in
a sample is the innermost frame of cqsa_dask (file:function:line) joined with the innermost
frame of all (what it runs or waits in).  Sampling takes the GIL every ``interval`` seconds:
a few per cent of one core at 5 ms.
"""

from __future__ import annotations

import collections
import re
import sys
import threading
import time
from types import FrameType, TracebackType
from typing import Any, Self

__all__ = ["Sampler"]


def _place(frame: FrameType | None) -> str:
    leaf = ours = None
    while frame is not None:
        code = frame.f_code
        where = f"{code.co_filename.rsplit('/', 1)[-1]}:{code.co_name}:{frame.f_lineno}"
        leaf = leaf or where
        if ours is None and "cqsa_dask" in code.co_filename:
            ours = where
        frame = frame.f_back
    return f"{ours or '-'} | {leaf or '-'}"


class Sampler:
    """Samples every thread of this process but its own while the ``with`` block runs."""

    def __init__(self, interval: float = 0.005):
        self.interval = interval
        self.counts: dict[str, collections.Counter[str]] = collections.defaultdict(collections.Counter)
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, name="bench-sampler", daemon=True)

    def __enter__(self) -> Self:
        self._thread.start()
        return self

    def __exit__(self, t: type[BaseException] | None, e: BaseException | None, tb: TracebackType | None) -> None:
        self._stop.set()
        self._thread.join()

    def _run(self) -> None:
        me = threading.get_ident()
        while not self._stop.is_set():
            names = {t.ident: t.name for t in threading.enumerate()}
            for ident, frame in sys._current_frames().items():
                if ident != me:
                    group = re.sub(r"[-_]?\d+$", "", names.get(ident, "?"))
                    self.counts[group][_place(frame)] += 1
            time.sleep(self.interval)

    def summary(self, top: int = 12) -> dict[str, Any]:
        """Per thread group: samples, and the ``top`` places with their share of them."""
        out = {}
        for group, c in sorted(self.counts.items(), key=lambda kv: -sum(kv[1].values())):
            n = sum(c.values())
            out[group] = {"samples": n, "top": [[p, round(k / n, 3)] for p, k in c.most_common(top)]}
        return out
