"""``analyze``: exact attention analytics of a finished job (key mass, entropy, block map).

::

    open store ─> the job is complete? (else refuse) ─> its plan, token, lse
        ─> resolution ─> task memory (``analysis_memory``) under the budget
        ─> lease ─> create or resume analysis/ ─> connect ─> capacity check
        ─> graph (skip marked tasks) ─> announce on /cqsa ─> run in span ─> AnalysisResult

The job's own causal flag, scale, groups and heads per task are used, so the
analysis visits the job's quorum tasks again: every pair of groups once.
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from typing import Any

import numpy as np
from distributed import Client

from cqsa_dask import config
from cqsa_dask.analysis.graph import build_analysis_graph
from cqsa_dask.analysis.layout import create_analysis, stored_analysis
from cqsa_dask.analysis.spec import analysis_memory, check_analysis_kernel, parse_resolution
from cqsa_dask.analysis.tasks import analysis_options
from cqsa_dask.client.cluster import check_capacity, connect, resolve_budget
from cqsa_dask.client.submit import Progress, observed
from cqsa_dask.core.errors import BudgetError, InvalidInputError
from cqsa_dask.core.plan import Plan, resource_bytes, usable_bytes
from cqsa_dask.execution.telemetry import announce_job, page_link
from cqsa_dask.store.jobstate import Lease, status
from cqsa_dask.store.layout import array, engine, open_store

__all__ = ["AnalysisResult", "analyze"]



@dataclass(frozen=True)
class AnalysisResult:
    """What one ``analyze`` did.  Times in seconds, sizes in bytes."""

    plan: Plan
    resolution: int | None
    seconds: float
    tasks_run: int
    reductions_run: int
    resumed: bool
    task_memory_bytes: int
    dashboard_link: str | None
    #: the kernels the quorum tasks ran ("fused", or the mass pass's attention kernel), sorted
    kernels: tuple[str, ...] = ()


def _complete_plan(store: str, group: Any) -> tuple[Plan, str]:
    """The plan and token of the store's job; InvalidInputError unless it is complete and covers every row."""
    st = status(store)
    eng = engine(group)
    plan = Plan.from_dict(dict(eng.attrs["plan"]))  # type: ignore[arg-type]
    if not st.complete:
        raise InvalidInputError(
            f"the job in {store!r} is not complete ({st.tasks_done:,} / {st.tasks_total:,} quorum tasks, "
            f"{st.merges_done:,} / {st.merges_total:,} merges): finish it with `cqsa resume {store}` first")
    if plan.query_groups:
        raise InvalidInputError(f"the job in {store!r} computed only query groups {list(plan.query_groups)}; "
                                "the analysis needs every row's lse: run the whole job")
    return plan, str(eng.attrs["token"])


def _budget(memory_budget: int | str | None, client: Client | None, resource: str, plan: Plan) -> int:
    return resolve_budget(memory_budget, client, resource, plan.budget_bytes)


def analyze(store: str | os.PathLike[str], *, resolution: int | None = None, client: Client | None = None,
            scheduler: str | None = None, memory_budget: int | str | None = None,
            progress: Progress | None = None) -> AnalysisResult:
    """Write ``analysis/key_mass``, ``analysis/entropy`` (B, Hq, N) float32 and, with ``resolution``
    R, ``analysis/block_mass`` (B, Hq, R, R) float32 into the store of a finished job.

    Args:
        store: path or URL of a store whose job is complete (``cqsa status``).
        resolution: R in 1..N: the block map of R blocks of ceil(N / R) tokens.
        client / scheduler: an existing Client or a scheduler address; neither: a local cluster.
        memory_budget: bytes or "4GB" per worker; default: the workers' advertised
            budget, else the job's.
        progress: called as progress(done, total) while tasks finish.

    A stopped analysis at the same resolution resumes: tasks marked done are
    not recomputed.  Raises InvalidInputError (job incomplete, bad R),
    StoreError (not a job store), BudgetError (a task does not fit).
    """
    store_s = os.fspath(store)
    check_analysis_kernel(config.get("analysis-kernel"))  # before any work (the tasks check it again)
    group = open_store(store_s, mode="r+")
    plan, job_token = _complete_plan(store_s, group)
    res = parse_resolution(resolution, plan.seq_len)
    resource = str(config.get("resource"))
    need = analysis_memory(plan, res, margin=float(config.get("memory-margin")))
    local = client is None and scheduler is None
    budget = _budget(memory_budget, client, resource, plan)
    ask = resource_bytes(need, budget, plan.host_staging)  # what a task asks of the resource (under the cap)
    if local and (ask > budget or need > usable_bytes(budget, plan.host_staging)):
        raise BudgetError(f"an analysis task needs {need:,} bytes, more than the budget of {budget:,} bytes; "
                          "raise the budget (or lower the resolution)")
    lease = Lease(group, ttl=float(config.get("lease-seconds")))
    active = engine(group).attrs.get("active_s")  # the lease's renewals count time: the job's, kept as it was
    lease.acquire()
    try:
        ana = stored_analysis(group, job_token, res)
        resumed = ana is not None
        if ana is None:
            ana = create_analysis(group, plan, job_token, res)
        token = str(ana.attrs["token"])
        with connect(client, scheduler, budget_bytes=budget, resource=resource,
                     threads=plan.tasks_in_flight + int(plan.host_staging)) as c:
            check_capacity(c, resource, ask)
            markers = {n: np.asarray(array(ana, n)[...]) for n in ("task_done", "reduce_done", "block_done")}
            ag = build_analysis_graph(
                store_s, job_token, token, plan, resolution=res.blocks if res else None, resource=resource,
                task_bytes=ask, retries=int(config.get("retries")), task_done=markers["task_done"],
                reduce_done=markers["reduce_done"], block_done=markers["block_done"], options=analysis_options())
            announce_job(c, token, plan, store=store_s, resource=resource, task_done=markers["task_done"],
                         merge_done=markers["reduce_done"])
            results, seconds = observed(c, ag.graph, ag.keys, progress, token, what="analysis task")
            link = page_link(c)
    finally:
        lease.release()
        engine(group).update_attributes({"active_s": active})
    return AnalysisResult(
        plan=plan, resolution=res.blocks if res else None, seconds=seconds,
        tasks_run=sum(r["kind"] == "quorum" for r in results),
        reductions_run=sum(r["kind"] == "merge" for r in results), resumed=resumed,
        task_memory_bytes=need, dashboard_link=link,
        kernels=tuple(sorted({str(r["kernel"]) for r in results if r["kind"] == "quorum"})),
    )


