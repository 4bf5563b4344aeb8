"""HTTP routes the CQSA dashboard adds to the scheduler's web server.

``GET /cqsa/status.json``: the plugin's snapshot (jobs with counts, rates and
ETA; workers with memory and throughput), or ``{"enabled": false}`` when the
scheduler runs without the plugin.  Listed in
``distributed.scheduler.http.routes`` by ``cqsa_dask.dashboard``; the
scheduler passes itself as ``dask_server``.
"""

from __future__ import annotations

import json

from distributed.http.utils import RequestHandler

from .plugin import plugin_of

__all__ = ["StatusHandler", "routes"]


class StatusHandler(RequestHandler):
    """JSON state of the cqsa jobs on this scheduler."""

    def get(self) -> None:
        plugin = plugin_of(self.server)
        body = plugin.snapshot() if plugin is not None else {
            "enabled": False, "jobs": [], "workers": [],
            "hint": "start the scheduler with `--preload cqsa_dask.dashboard`",
        }
        self.set_header("Content-Type", "application/json")
        self.set_header("Cache-Control", "no-store")
        self.write(json.dumps(body))


routes: list[tuple[str, type, dict[str, object]]] = [(r"cqsa/status.json", StatusHandler, {})]
