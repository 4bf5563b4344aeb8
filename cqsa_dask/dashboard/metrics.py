"""Prometheus metrics of cqsa jobs, served on the scheduler's ``/metrics``.

Dask's ``/metrics`` handler writes ``prometheus_client.REGISTRY``;
:func:`register` adds one collector there, once per process, that reads the
live CQSA plugins at scrape time (so nothing is stored twice)::

    cqsa_job_tasks{job,kind,state}                 gauge   waiting|running|done|failed
    cqsa_job_tasks_planned{job,kind}               gauge   quorum tasks / merges of the plan
    cqsa_job_tasks_completed_total{job,kind}       counter completions seen (re-runs count again)
    cqsa_job_bytes_read_total{job,worker}          counter bytes tasks read from the store
    cqsa_job_bytes_written_total{job,worker}       counter bytes tasks wrote
    cqsa_job_tflops{job}  cqsa_job_tokens_per_second{job}  cqsa_job_eta_seconds{job}
    cqsa_worker_device_memory_budget_bytes{worker}    the worker's resource (budget)
    cqsa_worker_device_memory_reserved_bytes{worker}  predicted bytes of its running tasks
    cqsa_worker_device_memory_used_bytes{worker}      measured (CUDA workers only)
    cqsa_worker_device_memory_peak_bytes{worker}      measured peak (CUDA workers only)
    cqsa_worker_bytes_read_total{worker}  cqsa_worker_bytes_written_total{worker}

``kind`` is quorum or merge, ``job`` the job token.  Without prometheus_client
nothing is registered (Dask then serves a placeholder on /metrics).
"""

from __future__ import annotations

from collections.abc import Iterator
from typing import Any

from .plugin import live_plugins

__all__ = ["CQSACollector", "register"]

_registered = False


class CQSACollector:
    """A prometheus_client custom collector over :func:`live_plugins`."""

    def collect(self) -> Iterator[Any]:
        from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily

        snaps = [p.snapshot() for p in live_plugins()]
        jobs = [j for s in snaps for j in s["jobs"]]
        workers = [w for s in snaps for w in s["workers"]]
        tasks = GaugeMetricFamily("cqsa_job_tasks", "cqsa tasks by state", labels=["job", "kind", "state"])
        planned = GaugeMetricFamily("cqsa_job_tasks_planned", "cqsa tasks in the job's plan", labels=["job", "kind"])
        completed = CounterMetricFamily("cqsa_job_tasks_completed", "cqsa task completions seen by the scheduler",
                                        labels=["job", "kind"])
        for j in jobs:
            for kind, c in (("quorum", j["tasks"]), ("merge", j["merges"])):
                for state in ("waiting", "running", "done", "failed"):
                    tasks.add_metric([j["token"], kind, state], c[state])
                planned.add_metric([j["token"], kind], c["total"])
                completed.add_metric([j["token"], kind], j["completed"][kind])
        yield from (tasks, planned, completed)
        yield from _job_io(jobs, CounterMetricFamily)
        for name, key, doc in (("tflops", "tflops", "achieved TFLOP/s"), ("tokens_per_second", "tokens_per_s",
                               "tokens per second"), ("eta_seconds", "eta_s", "estimated seconds left")):
            g = GaugeMetricFamily(f"cqsa_job_{name}", f"cqsa job {doc}", labels=["job"])
            for j in jobs:
                if j[key] is not None:
                    g.add_metric([j["token"]], j[key])
            yield g
        yield from _workers(workers, GaugeMetricFamily, CounterMetricFamily)


def _job_io(jobs: list[dict[str, Any]], counter: Any) -> Iterator[Any]:
    for what in ("read", "written"):
        c = counter(f"cqsa_job_bytes_{what}", f"bytes cqsa tasks {what}", labels=["job", "worker"])
        for j in jobs:
            for worker, n in j[f"bytes_{what}_by_worker"].items():
                c.add_metric([j["token"], worker], n)
        yield c


def _workers(workers: list[dict[str, Any]], gauge: Any, counter: Any) -> Iterator[Any]:
    for name, key, doc in (("budget", "budget", "device memory budget (the worker resource)"),
                           ("reserved", "reserved", "device memory reserved by running cqsa tasks"),
                           ("used", "device_in_use", "device memory in use (measured, CUDA)"),
                           ("peak", "device_peak", "peak device memory (measured, CUDA)")):
        g = gauge(f"cqsa_worker_device_memory_{name}_bytes", doc, labels=["worker"])
        for w in workers:
            if w[key] is not None:
                g.add_metric([w["address"]], w[key])
        yield g
    for what in ("read", "written"):
        c = counter(f"cqsa_worker_bytes_{what}", f"bytes cqsa tasks {what} on this worker", labels=["worker"])
        for w in workers:
            c.add_metric([w["address"]], w[f"bytes_{what}"])
        yield c


def register() -> bool:
    """Add the collector to prometheus_client's global registry (once); False without it."""
    global _registered
    if _registered:
        return True
    try:
        from prometheus_client import REGISTRY
    except ImportError:
        return False
    REGISTRY.register(CQSACollector())  # type: ignore[arg-type]
    _registered = True
    return True
