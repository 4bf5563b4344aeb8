"""The scheduler plugin that watches cqsa jobs and feeds the /cqsa page and metrics.

::

    Scheduler ──transition(key, start, finish)──> CQSAPlugin ──> Monitor (state.py)
      event log ──log_event("cqsa-job" | "cqsa-task", msg)──┘        │
      worker states (resources, used_resources, memory) ──snapshot()─┘

Every hook runs on the scheduler's event loop, as do the bokeh page and the
HTTP handlers that read it, so no locking is needed.  Transitions of other
keys cost one type check.  Live plugins are kept in a weak set for the
process-wide Prometheus collector (``metrics.py``).
"""

from __future__ import annotations

import weakref
from typing import Any

from distributed.diagnostics.plugin import SchedulerPlugin

from cqsa_dask.execution.telemetry import JOB_TOPIC, PLUGIN_NAME, TASK_TOPIC

from .state import Monitor, parse_key

__all__ = ["CQSAPlugin", "live_plugins", "plugin_of"]

_LIVE: weakref.WeakSet[CQSAPlugin] = weakref.WeakSet()


class CQSAPlugin(SchedulerPlugin):
    """Tracks cqsa jobs on one scheduler (add with ``scheduler.add_plugin``)."""

    name = PLUGIN_NAME

    def __init__(self, max_jobs: int = 8) -> None:
        self.monitor = Monitor(max_jobs=max_jobs)
        self.scheduler: Any = None

    async def start(self, scheduler: Any) -> None:
        self.scheduler = scheduler
        _LIVE.add(self)

    async def close(self) -> None:
        _LIVE.discard(self)

    def transition(self, key: Any, start: str, finish: str, *args: Any, **kwargs: Any) -> None:
        if parse_key(key) is None:
            return
        self.monitor.on_transition(key, finish)

    def log_event(self, topic: str, msg: Any) -> None:
        if not isinstance(msg, dict):
            return
        if topic == JOB_TOPIC:
            self.monitor.on_job_event(msg)
        elif topic == TASK_TOPIC:
            self.monitor.on_task_event(msg)

    def worker_figures(self) -> dict[str, dict[str, float]]:
        """{address: budget (bytes of the resource), rss (process bytes)}."""
        if self.scheduler is None:
            return {}
        res = self.monitor.resource
        return {ws.address: {"budget": float(ws.resources.get(res, 0.0)), "rss": float(ws.memory.process)}
                for ws in self.scheduler.workers.values()}

    def snapshot(self) -> dict[str, Any]:
        """What /cqsa/status.json returns (see ``Monitor.snapshot``)."""
        return self.monitor.snapshot(self.worker_figures())


def plugin_of(scheduler: Any) -> CQSAPlugin | None:
    """The CQSA plugin of ``scheduler``, or None when it was not preloaded."""
    plugin = getattr(scheduler, "plugins", {}).get(PLUGIN_NAME)
    return plugin if isinstance(plugin, CQSAPlugin) else None


def live_plugins() -> list[CQSAPlugin]:
    """Started plugins of this process (normally one: this process's scheduler)."""
    return list(_LIVE)
