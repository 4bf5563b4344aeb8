"""The kernel warm-up (execution/warmup.py): the shapes it builds plans for are exactly the shapes a
one-group job's tasks call attention with; it does nothing where it cannot help; on CUDA it runs
before the tasks and the job stays exact."""

from __future__ import annotations

from collections.abc import Iterator
from typing import Any

import dask.config
import pytest
import torch
from conftest import draw_inputs
from distributed import Client, LocalCluster
from reference import check_exact
from test_keyblocks import _streaming_budget

import cqsa_dask
from cqsa_dask.core.plan import make_plan
from cqsa_dask.execution import tasks, warmup
from cqsa_dask.execution.warmup import shapes, warm_up


@pytest.fixture(scope="module")
def threaded() -> Iterator[Client]:
    with LocalCluster(n_workers=1, threads_per_worker=1, processes=False, resources={"device_mem": 4e9},
                      dashboard_address=None) as cluster, Client(cluster) as c:
        yield c


@pytest.mark.parametrize(("n", "hq", "hkv", "causal", "stream"), [
    (3001, 4, 2, False, False), (3001, 4, 2, True, False), (2800, 2, 2, False, True), (3001, 2, 1, True, True)],
    ids=["full-gqa", "causal-gqa", "full-streamed", "causal-streamed-uneven"])
def test_the_shapes_are_the_calls_a_task_makes(threaded: Client, monkeypatch: pytest.MonkeyPatch, n: int, hq: int,
                                              hkv: int, causal: bool, stream: bool) -> None:
    """Every (query tokens, key tokens, masked) the tasks of a real W = 1 job call attend with, and no
    other, in query pieces of 700 (3,001 tokens: pieces 601 x 4 and 597), k and v resident or streamed."""
    seen: set[tuple[int, int, bool]] = set()
    real = tasks.attend

    def spy(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, **kw: Any) -> Any:
        seen.add((q.shape[2], k.shape[2], bool(kw.get("diagonal_causal"))))
        return real(q, k, v, **kw)

    monkeypatch.setattr(tasks, "attend", spy)
    inp = draw_inputs(1, hq, hkv, n, 16, torch.float32)
    print(f"inputs: {inp.ctx}")
    with dask.config.set({"cqsa.query-piece": 700, "cqsa.stream-keys": "1GB" if stream else False}):
        budget = _streaming_budget(n, hq, hkv, 16, torch.float32, 700) if stream else None  # k, v not whole
        out, lse = cqsa_dask.attention(inp.q, inp.k, inp.v, causal=causal, return_lse=True, client=threaded,
                                       groups=1, memory_budget=budget)
        plan = make_plan(seq_len=n, heads=hq, kv_heads=hkv, head_dim=16, dtype="float32", causal=causal, groups=1,
                         budget=budget or 4e9, **_options())
    check_exact(inp.q, inp.k, inp.v, out, lse, causal=causal, scale=None, context=inp.ctx)
    assert plan.stream_keys == stream and plan.groups == 1
    assert set(shapes(plan)) == seen


def _options() -> dict[str, Any]:
    from cqsa_dask.client.policy import plan_options

    return plan_options("cpu")


def test_nothing_is_warmed_where_it_cannot_help() -> None:
    """A CPU device, a job of several token groups, whole rows (no pieces)."""
    one = make_plan(seq_len=4096, heads=2, head_dim=16, dtype="float32", budget="1GB", groups=1, query_piece=512)
    assert shapes(one) and warm_up(one, torch.device("cpu")) is None
    assert shapes(make_plan(seq_len=4096, heads=2, head_dim=16, dtype="float32", budget="1GB", groups=7,
                            query_piece=512)) == []
    assert shapes(make_plan(seq_len=4096, heads=2, head_dim=16, dtype="float32", budget="1GB", groups=1)) == []


@pytest.mark.gpu
def test_a_warmed_job_is_exact_and_shapes_are_warmed_once() -> None:
    """On CUDA: the warm-up runs on the compute thread before the job's tasks; the job is exact; the
    same shapes are not warmed again in this process."""
    inp = draw_inputs(1, 4, 2, 3001, 128, torch.bfloat16)
    print(f"inputs: {inp.ctx}")
    plan = make_plan(seq_len=3001, heads=4, kv_heads=2, head_dim=128, dtype="bfloat16", causal=True, groups=1,
                     budget="1GB", query_piece=700, tasks_in_flight=2)
    warmup._done.clear()
    job = warm_up(plan, torch.device("cuda"))
    assert job is not None
    job.result(60)
    assert warm_up(plan, torch.device("cuda")) is None
    with dask.config.set({"cqsa.query-piece": 700}):
        out, lse = cqsa_dask.attention(inp.q.cuda(), inp.k.cuda(), inp.v.cuda(), causal=True, return_lse=True,
                                       memory_budget="1GB", groups=1)
    check_exact(inp.q, inp.k, inp.v, out.cpu(), lse.cpu(), causal=True, scale=None, context=inp.ctx)
