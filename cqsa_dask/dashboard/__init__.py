"""Monitoring of cqsa jobs on the Dask scheduler: a /cqsa page, JSON and metrics.

Importing this module registers, once per process and before any scheduler
is built (Dask reads both tables when a Scheduler is constructed):

- the bokeh page ``/cqsa`` (``page.py``) in
  ``distributed.dashboard.scheduler.applications``, with a "Cqsa" link in the
  navigation bar of every dashboard page;
- ``/cqsa/status.json`` (``routes.py``) in ``distributed.scheduler.http.routes``;
- the ``cqsa_*`` collector (``metrics.py``) in prometheus_client's registry,
  which the scheduler's ``/metrics`` serves.

:func:`dask_setup` then adds the :class:`CQSAPlugin` (``plugin.py``) that
feeds all three from task transitions and the events of
``cqsa_dask.dashboard_events``.  Hence enabling it is one preload::

    dask scheduler --preload cqsa_dask.dashboard          # your own scheduler
    DASK_DISTRIBUTED__SCHEDULER__PRELOAD='["cqsa_dask.dashboard"]' dask scheduler
    LocalCluster(..., scheduler_kwargs={"preload": ["cqsa_dask.dashboard"]})

``cqsa run`` and ``cqsa_dask.run`` without a scheduler start their local
cluster that way (``cluster.connect``).  ``summary.py`` writes the static
report of a finished store (``cqsa dashboard STORE``).
"""

from __future__ import annotations

import logging
from typing import Any

import dask.config

from cqsa_dask.dashboard import metrics

from .plugin import CQSAPlugin, plugin_of

__all__ = ["CQSAPlugin", "dask_setup", "plugin_of", "register"]

log = logging.getLogger(__name__)

PAGE = "/cqsa"
_ROUTES_MODULE = "cqsa_dask.dashboard.routes"
_ROUTES_KEY = "distributed.scheduler.http.routes"


def _register_routes() -> None:
    mods = list(dask.config.get(_ROUTES_KEY, default=[]))
    if _ROUTES_MODULE not in mods:
        dask.config.set({_ROUTES_KEY: [*mods, _ROUTES_MODULE]})


def _register_page() -> bool:
    try:
        import distributed.dashboard.scheduler as dash
    except ImportError as e:  # no (compatible) bokeh: Dask serves no dashboard either
        log.info("no /cqsa page: %s", e)
        return False
    from .page import cqsa_doc

    dash.applications[PAGE] = cqsa_doc
    original = dash.template_variables
    if getattr(original, "_cqsa_nav", False):
        return True

    def template_variables(scheduler: Any) -> dict[str, Any]:
        tv = original(scheduler)  # memoized per scheduler by distributed
        if "cqsa" not in tv["pages"]:
            tv["pages"].append("cqsa")
        return tv

    template_variables._cqsa_nav = True  # type: ignore[attr-defined]
    dash.template_variables = template_variables
    return True


def register() -> None:
    """Register page, routes and metrics (idempotent; done on import)."""
    _register_routes()
    _register_page()
    metrics.register()


def dask_setup(scheduler: Any) -> None:
    """Preload hook (``dask scheduler --preload cqsa_dask.dashboard``): add the plugin."""
    from distributed import Scheduler

    if not isinstance(scheduler, Scheduler):
        raise TypeError(f"cqsa_dask.dashboard is a scheduler preload, not one for a {type(scheduler).__name__}")
    scheduler.add_plugin(CQSAPlugin(), idempotent=True)


register()
