"""The local cluster ``cqsa run`` starts: what it exposes to the network.

    connect() ──> LocalCluster: scheduler on 127.0.0.1, dashboard on 127.0.0.1 (cqsa.local-cluster.
                  dashboard-address) unless the user asks for every interface
"""

from __future__ import annotations

import os
from urllib.parse import urlparse

import psutil
import pytest
import zarr

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


def test_gpus_setting_on_a_machine_without_gpus() -> None:
    from cqsa_dask.client.cluster import local_gpus, visible_gpus
    from cqsa_dask.core.errors import InvalidInputError

    assert visible_gpus() == [] and local_gpus("all") == [] and local_gpus("none") == []
    with pytest.raises(InvalidInputError, match=r"no GPU 0, 3: this machine shows no GPU"):
        local_gpus("0,3")
    with pytest.raises(InvalidInputError, match="GPU numbers such as 0,1"):
        local_gpus("first")


@pytest.mark.integration
def test_one_pinned_worker_per_gpu_entry(tmp_path) -> None:  # type: ignore[no-untyped-def]
    """The per-GPU spec, for real: one worker process per entry, each seeing only its device
    (here "0" twice: two workers sharing one device, each advertising the whole budget; this
    machine has no GPU, so the job's tasks run on the CPU), and a job on them is exact."""
    import torch
    from distributed import Client
    from reference import check_exact

    import cqsa_dask
    from cqsa_dask.client.cluster import _GPUCluster
    from cqsa_dask.store.random_inputs import write_random_inputs

    with _GPUCluster(["0", "0"], threads_per_worker=1, processes=True, dashboard_address=None,
                     resources={"device_mem": 3e8}) as cluster, Client(cluster) as c:
        seen = c.run(lambda: os.environ.get("CUDA_VISIBLE_DEVICES"))
        assert sorted(seen.values()) == ["0", "0"], seen
        assert [w["resources"] for w in c.scheduler_info()["workers"].values()] == [{"device_mem": 3e8}] * 2
        store = tmp_path / "job.zarr"
        g = write_random_inputs(store, seq_len=1500, heads=2, kv_heads=1, head_dim=32, dtype="float32", seed=11)
        res = cqsa_dask.run(store, client=c, groups=7, causal=True)
        assert res.quorum_tasks_run == res.plan.tasks
        q, k, v = (torch.from_numpy(g[n][...]) for n in ("q", "k", "v"))
        check_exact(q, k, v, torch.from_numpy(g["out"][...]), torch.from_numpy(g["lse"][...]), causal=True,
                    scale=None, context="seed 11")


def test_cli_names_a_missing_gpu_in_one_line(tmp_path) -> None:  # type: ignore[no-untyped-def]
    from clitools import invoke

    from cqsa_dask.store.random_inputs import write_random_inputs

    store = tmp_path / "job.zarr"
    write_random_inputs(store, seq_len=256, heads=1, head_dim=16, dtype="float32", seed=3)
    r = invoke(["run", str(store), "--gpus", "2"], timeout=120)
    want = ("cqsa: error: no GPU 2: this machine shows no GPU; give --gpus numbers among them (see nvidia-smi), "
            "or --gpus none")
    assert r.returncode == 2 and r.stderr.strip().splitlines() == [want], str(r)
    assert "out" not in zarr.open_group(store, mode="r"), "nothing written"
