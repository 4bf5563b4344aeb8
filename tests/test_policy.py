"""The run policy comes from the workers' device, not from the machine that submits.

    client (any machine) ──client.run──> workers: "which device do you compute on?"
                                          └─> plan_options(kind): tasks in flight, host staging
"""

from __future__ import annotations

import dask
import pytest
from distributed import Client, LocalCluster

from cqsa_dask.client.policy import _kind_of, local_device_kind, plan_options, workers_device_kind
from cqsa_dask.core.plan import make_plan


@pytest.fixture(scope="module")
def client():  # type: ignore[no-untyped-def]
    with LocalCluster(n_workers=2, threads_per_worker=1, processes=False, dashboard_address=None) as c, \
            Client(c) as cl:
        yield cl


def test_options_by_kind() -> None:
    cuda, cpu = plan_options("cuda"), plan_options("cpu")
    assert (cuda["tasks_in_flight"], cuda["host_staging"]) == (2, True)
    assert (cpu["tasks_in_flight"], cpu["host_staging"]) == (1, False)
    with dask.config.set({"cqsa.tasks-in-flight": 3, "cqsa.memory-margin": 1.5}):
        forced = plan_options("cuda")
    assert (forced["tasks_in_flight"], forced["margin"]) == (3, 1.5)


def test_the_workers_decide(client: Client) -> None:
    assert workers_device_kind(client) == "cpu"  # this machine has no GPU
    # the workers resolve the device setting the tasks will carry: a forced CUDA device makes
    # them CUDA workers, and the plan is the CUDA plan whatever this process has
    with dask.config.set({"cqsa.device": "cuda:0"}):
        kind = workers_device_kind(client)
        shape = {"seq_len": 2**20, "heads": 4, "head_dim": 128, "budget": "4GB"}
        plan = make_plan(**shape, **plan_options(kind))  # type: ignore[arg-type]
    assert kind == "cuda" and plan.tasks_in_flight == 2 and plan.host_staging
    assert plan != make_plan(**shape, **plan_options("cpu"))  # type: ignore[arg-type]


def test_local_kind_without_torch(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("CUDA_VISIBLE_DEVICES", "")
    assert _kind_of("auto") in ("cpu", "cuda")  # torch is loaded in this process: it answers
    assert _kind_of("cpu") == "cpu" and _kind_of("cuda:1") == "cuda"
    assert local_device_kind() == _kind_of("auto")
