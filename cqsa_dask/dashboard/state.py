"""Bookkeeping of jobs and workers for the dashboard: pure Python and numpy.

The scheduler plugin feeds a :class:`Monitor` three kinds of input and reads
snapshots back; nothing here touches distributed or bokeh::

    transition(key, finish)  ──┐
    job event  (start / end)  ─┼─> Monitor ──> snapshot() -> JSON-able dict
    task event (bytes, memory) ┘      │
                                      └──> grid(token) -> (W, B*J) state arrays

Keys are ``("cqsa-quorum-<token>", i, b, j)`` and ``("cqsa-merge-<token>",
a, b, j)``.  States: memory -> done, erred -> failed; a task is running
from its own start event (the scheduler's "processing" also covers tasks a
worker holds back until its ``device_mem`` is free, so it counts as
waiting) until it finishes.  Once done or failed, a task keeps that state
when the client releases its result (released, forgotten); a running task
that is released goes back to waiting.  Tasks a resumed job skips are
marked done from the bitmaps the client announces.

Device memory "reserved" on a worker is the planned ``task_memory_bytes``
of the quorum tasks running there (what the budget is checked against);
"measured" comes from CUDA counters in task events.
"""

from __future__ import annotations

import time
from collections import deque
from dataclasses import dataclass, field
from typing import Any

import numpy as np

from cqsa_dask.core.plan import Plan

__all__ = ["DONE", "FAILED", "NONE", "RUNNING", "STATE_NAMES", "WAITING", "JobView", "Monitor", "WorkerView",
           "parse_key"]

WAITING, RUNNING, DONE, FAILED, NONE = 0, 1, 2, 3, 4
STATE_NAMES = ("waiting", "running", "done", "failed", "none")
_FINISH = {"memory": DONE, "erred": FAILED, "waiting": WAITING, "queued": WAITING, "no-worker": WAITING,
           "processing": WAITING}
_PREFIXES = (("cqsa-quorum-", "quorum"), ("cqsa-merge-", "merge"))
Index = tuple[int, int, int]


def parse_key(key: Any) -> tuple[str, str, Index] | None:
    """``(kind, token, (i, b, j))`` of a cqsa task key, else None (cheap for other keys)."""
    if type(key) is not tuple or len(key) != 4 or not isinstance(key[0], str) or not key[0].startswith("cqsa-"):
        return None
    for prefix, kind in _PREFIXES:
        if key[0].startswith(prefix):
            return kind, key[0][len(prefix):], (int(key[1]), int(key[2]), int(key[3]))
    return None


def _unbits(d: dict[str, Any] | None) -> np.ndarray | None:
    if not d:
        return None
    shape = tuple(int(s) for s in d["shape"])
    n = int(np.prod(shape))
    return np.unpackbits(np.frombuffer(bytes(d["bits"]), np.uint8), count=n).reshape(shape)


@dataclass
class JobView:
    """One job as the scheduler sees it.  Times: Unix seconds; sizes: bytes."""

    token: str
    started: float
    plan: dict[str, Any] | None = None
    store: str | None = None
    ended: float | None = None
    outcome: str | None = None
    quorum: dict[Index, int] = field(default_factory=dict)
    merge: dict[Index, int] = field(default_factory=dict)
    resumed_tasks: int = 0
    resumed_merges: int = 0
    bytes_read: dict[str, int] = field(default_factory=dict)  # worker -> bytes
    bytes_written: dict[str, int] = field(default_factory=dict)
    completed: dict[str, int] = field(default_factory=lambda: {"quorum": 0, "merge": 0})
    task_seconds: float = 0.0
    last_update: float = 0.0

    def states(self, kind: str) -> dict[Index, int]:
        return self.quorum if kind == "quorum" else self.merge

    def totals(self) -> tuple[int, int]:
        """(quorum tasks, merges) of the whole job (seen so far while the plan is unknown)."""
        if self.plan is None:
            return len(self.quorum), len(self.merge)
        return int(self.plan["tasks"]), int(self.plan["merges"])

    def counts(self, kind: str) -> dict[str, int]:
        states = list(self.states(kind).values())
        c = {name: states.count(s) for s, name in enumerate(STATE_NAMES[:4])}
        total = self.totals()[0 if kind == "quorum" else 1]
        c["waiting"] += max(0, total - len(states))  # not submitted yet (or never seen)
        c["total"] = total
        return c

    @property
    def status(self) -> str:
        """running, done, failed or cancelled."""
        if self.outcome is not None:
            return self.outcome
        q, m = self.counts("quorum"), self.counts("merge")
        if q["total"] and q["done"] == q["total"] and m["done"] == m["total"]:
            return "done"
        return "running"


@dataclass
class WorkerView:
    """Per-worker figures from task events.  Sizes in bytes, times in Unix seconds."""

    address: str
    bytes_read: int = 0
    bytes_written: int = 0
    device_in_use: int | None = None
    device_peak: int | None = None
    peak_reserved: int = 0
    recent: deque[tuple[float, int, int]] = field(default_factory=lambda: deque(maxlen=256))

    def rates(self, now: float, window: float) -> tuple[float, float]:
        """(read, write) bytes/s over the last ``window`` seconds of task ends."""
        r = sum(b for t, b, _ in self.recent if now - t <= window)
        w = sum(b for t, _, b in self.recent if now - t <= window)
        return r / window, w / window


def _shape(job: JobView) -> tuple[int, int, int]:
    """(W, B, J) of a job: from its plan, else from the keys seen so far."""
    if job.plan is not None:
        p = job.plan
        return int(p["groups"]), int(p["batch"]), int(p["heads_kv"]) // int(p["heads_per_task"])
    seen = [*job.quorum, *job.merge]
    w, b, j = (1 + max((x[d] for x in seen), default=0) for d in range(3))
    return w, b, j


class Monitor:
    """Jobs (most recent ``max_jobs``) and workers, updated from scheduler input."""

    def __init__(self, max_jobs: int = 8, rate_window: float = 10.0):
        self.jobs: dict[str, JobView] = {}
        self.workers: dict[str, WorkerView] = {}
        self.running: dict[tuple[str, str, Index], str] = {}  # (token, kind, index) -> worker
        self.max_jobs, self.rate_window = max_jobs, rate_window
        self.resource = "device_mem"

    def _job(self, token: str, now: float) -> JobView:
        job = self.jobs.get(token)
        if job is None:
            job = self.jobs[token] = JobView(token=token, started=now)
            self._trim()
        job.last_update = now
        return job

    def _trim(self) -> None:
        while len(self.jobs) > self.max_jobs:
            ended = [j for j in self.jobs.values() if j.status != "running"] or list(self.jobs.values())
            token = min(ended, key=lambda j: j.last_update).token
            del self.jobs[token]
            self.running = {k: w for k, w in self.running.items() if k[0] != token}

    # -- input ------------------------------------------------------------------
    def on_transition(self, key: Any, finish: str, now: float | None = None) -> None:
        parsed = parse_key(key)
        if parsed is None:
            return
        kind, token, idx = parsed
        job = self._job(token, time.time() if now is None else now)
        states = job.states(kind)
        new = _FINISH.get(finish)
        if finish != "processing":
            self.running.pop((token, kind, idx), None)
        if new is None:  # released / forgotten: keep outcomes, re-queue unfinished work
            if states.get(idx) == RUNNING:
                states[idx] = WAITING
            return
        if new == WAITING and states.get(idx) == RUNNING and finish == "processing":
            return  # the start event came first
        if new == DONE and states.get(idx) != DONE:
            job.completed[kind] += 1
        states[idx] = new

    def on_job_event(self, msg: dict[str, Any], now: float | None = None) -> None:
        now = time.time() if now is None else now
        token = str(msg.get("token"))
        if msg.get("action") == "start":
            job = self._job(token, now)
            job.started, job.ended, job.outcome = float(msg.get("time", now)), None, None
            job.plan, job.store = dict(msg.get("plan") or {}) or None, msg.get("store")
            self.resource = str(msg.get("resource", self.resource))
            job.resumed_tasks = self._mark_done(job.quorum, _unbits(msg.get("task_done")))
            job.resumed_merges = self._mark_done(job.merge, _unbits(msg.get("merge_done")))
        elif msg.get("action") == "end" and token in self.jobs:
            job = self._job(token, now)
            job.ended, job.outcome = float(msg.get("time", now)), str(msg.get("outcome", "done"))

    @staticmethod
    def _mark_done(states: dict[Index, int], done: np.ndarray | None) -> int:
        if done is None:
            return 0
        n = 0
        for i, b, j in zip(*np.nonzero(done)):
            states[(int(i), int(b), int(j))] = DONE
            n += 1
        return n

    def on_task_event(self, msg: dict[str, Any], now: float | None = None) -> None:
        now = time.time() if now is None else now
        addr = str(msg.get("worker", "?"))
        w = self.workers.setdefault(addr, WorkerView(addr))
        token, kind = str(msg.get("token")), str(msg.get("kind"))
        idx = tuple(int(x) for x in msg.get("index", ()))
        if msg.get("action") == "start":
            if kind in ("quorum", "merge") and len(idx) == 3:
                states = self._job(token, now).states(kind)
                if states.get(idx) not in (DONE, FAILED):  # type: ignore[arg-type]
                    states[idx] = RUNNING  # type: ignore[index]
                    self.running[(token, kind, idx)] = addr  # type: ignore[index]
                    w.peak_reserved = max(w.peak_reserved, self.reserved().get(addr, 0))
            return
        self.running.pop((token, kind, idx), None)  # type: ignore[arg-type]
        nr, nw = int(msg.get("bytes_read") or 0), int(msg.get("bytes_written") or 0)
        w.bytes_read += nr
        w.bytes_written += nw
        w.recent.append((float(msg.get("end", now)), nr, nw))
        if msg.get("device_in_use") is not None:
            w.device_in_use = int(msg["device_in_use"])
        if msg.get("peak_device_bytes") is not None:
            w.device_peak = max(w.device_peak or 0, int(msg["peak_device_bytes"]))
        job = self.jobs.get(str(msg.get("token")))
        if job is not None:
            job.bytes_read[addr] = job.bytes_read.get(addr, 0) + nr
            job.bytes_written[addr] = job.bytes_written.get(addr, 0) + nw
            job.task_seconds += float(msg.get("seconds") or 0.0)

    def reserved(self) -> dict[str, int]:
        """{worker: planned bytes of the quorum tasks running there}."""
        out: dict[str, int] = {}
        for (token, kind, _), worker in self.running.items():
            job = self.jobs.get(token)
            if kind == "quorum" and job is not None and job.plan is not None:
                out[worker] = out.get(worker, 0) + int(job.plan["task_memory_bytes"])
        return out

    # -- output -----------------------------------------------------------------
    def job_summary(self, job: JobView, now: float | None = None) -> dict[str, Any]:
        """Counts, rates and ETA of one job (rates count this run's work only)."""
        now = time.time() if now is None else now
        q, m = job.counts("quorum"), job.counts("merge")
        elapsed = max(1e-9, (job.ended or now) - job.started)
        ran_q = max(0, q["done"] - job.resumed_tasks)
        frac = ran_q / q["total"] if q["total"] else 0.0
        plan = job.plan or {}
        units_done = ran_q + max(0, m["done"] - job.resumed_merges)
        units_left = (q["total"] - q["done"]) + (m["total"] - m["done"])
        eta = 0.0 if units_left == 0 else (elapsed / units_done * units_left if units_done else None)
        return {
            "token": job.token, "store": job.store, "status": job.status, "started": job.started,
            "ended": job.ended, "elapsed_s": round(elapsed, 3), "tasks": q, "merges": m,
            "resumed_tasks": job.resumed_tasks, "resumed_merges": job.resumed_merges,
            "tokens_per_s": frac * int(plan.get("seq_len", 0)) * int(plan.get("batch", 1)) / elapsed,
            "tflops": frac * float(plan.get("flops", 0)) / elapsed / 1e12,
            "eta_s": None if eta is None else round(eta, 3),
            "bytes_read": sum(job.bytes_read.values()), "bytes_written": sum(job.bytes_written.values()),
            "bytes_read_by_worker": dict(job.bytes_read), "bytes_written_by_worker": dict(job.bytes_written),
            "completed": dict(job.completed),
            "plan": {k: plan[k] for k in ("seq_len", "batch", "heads_q", "heads_kv", "head_dim", "dtype", "causal",
                                          "groups", "quorum_size", "tasks", "merges", "flops", "budget_bytes",
                                          "task_memory_bytes") if k in plan},
        }

    def ordered_jobs(self) -> list[JobView]:
        """Running jobs first, then the most recently updated."""
        return sorted(self.jobs.values(), key=lambda j: (j.status != "running", -j.last_update))

    def grid(self, token: str, kind: str) -> np.ndarray:
        """States (W, B*J) of a job's quorum tasks or merges (NONE where none exists).

        Column ``b * J + j`` is batch element b, head block j.
        """
        job = self.jobs[token]
        w, nb, nj = _shape(job)
        out = np.full((w, nb * nj), WAITING if job.plan else NONE, np.uint8)
        if job.plan is not None and job.plan.get("query_groups"):  # only some rows: their producers, merges
            plan = Plan.from_dict(dict(job.plan))
            absent = np.ones(w, bool)
            absent[plan.task_ids if kind == "quorum" else list(plan.query_groups)] = False
            out[absent] = NONE
        elif kind == "merge" and job.plan is not None:
            out[int(job.plan["merges"]) // (nb * nj):] = NONE  # empty groups have no merge
        for (i, b, j), s in job.states(kind).items():
            if i < w and b < nb and j < nj:
                out[i, b * nj + j] = s
        return out

    def snapshot(self, workers: dict[str, dict[str, float]], now: float | None = None) -> dict[str, Any]:
        """Everything the page and /cqsa/status.json show.

        Args:
            workers: {address: {"budget": bytes, "rss": bytes}} from the
                scheduler's worker states (the workers shown).
        """
        now = time.time() if now is None else now
        reserved = self.reserved()
        rows = []
        for addr, figs in sorted(workers.items()):
            w = self.workers.setdefault(addr, WorkerView(addr))
            read_s, write_s = w.rates(now, self.rate_window)
            rows.append({
                "address": addr, "budget": figs.get("budget", 0.0), "reserved": reserved.get(addr, 0),
                "peak_reserved": w.peak_reserved, "rss": figs.get("rss"), "device_in_use": w.device_in_use,
                "device_peak": w.device_peak, "bytes_read": w.bytes_read, "bytes_written": w.bytes_written,
                "read_bytes_per_s": read_s, "write_bytes_per_s": write_s,
            })
        return {"enabled": True, "time": now, "resource": self.resource,
                "jobs": [self.job_summary(j, now) for j in self.ordered_jobs()], "workers": rows}
