"""The local cluster ``cqsa run`` starts: what it exposes to the network.

    connect() ──> LocalCluster: scheduler on 127.0.0.1, dashboard on 127.0.0.1 (cqsa.local-cluster.
                  dashboard-address) unless the user asks for every interface
"""

from __future__ import annotations

import os
from urllib.parse import urlparse

import psutil
import pytest

from cqsa_dask import config
from cqsa_dask.client.cluster import connect


def _listening(port: int) -> set[str]:
    """The local addresses this process listens on at ``port``."""
    return {c.laddr.ip for c in psutil.Process(os.getpid()).net_connections(kind="tcp")
            if c.status == psutil.CONN_LISTEN and c.laddr.port == port}


@pytest.mark.integration
def test_dashboard_listens_on_localhost_by_default() -> None:
    assert str(config.get("local-cluster.dashboard-address")).startswith("127.0.0.1:")
    with connect(budget_bytes=10**9, resource="device_mem") as c:
        port = urlparse(c.dashboard_link).port
        assert port is not None
        addresses = _listening(port)
        scheduler = urlparse(c.scheduler.address).hostname
    assert addresses and addresses <= {"127.0.0.1"}, addresses
    assert scheduler == "127.0.0.1"
