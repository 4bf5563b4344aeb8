"""Public entry points: ``attention`` on tensors, ``run`` on a Zarr store.

Data flow of ``run``::

    open store ─> validate q,k,v ─> plan (budget) ─> create or resume _cqsa
         ─> connect (local cluster | scheduler) ─> check a worker fits a task
         ─> build graph (skip tasks marked done) ─> announce to the dashboard
         ─> submit in span "cqsa-<token>" ─> wait (progress) ─> JobResult

``attention`` writes the tensors into a fresh store (a temporary directory
unless ``workdir`` is given), calls ``run`` and reads ``out``/``lse`` back.
"""

from __future__ import annotations

import dataclasses
import functools
import os
import shutil
import tempfile
import time
import uuid
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import torch
from distributed import Client

from cqsa_dask import config
from cqsa_dask.client.cluster import check_capacity, connect, local_gpus, resolve_budget
from cqsa_dask.client.forward_only import forward_only
from cqsa_dask.client.local import worker_processes
from cqsa_dask.client.policy import DeviceKind, local_device_kind, plan_options, workers_device_kind
from cqsa_dask.client.session import session_defaults
from cqsa_dask.client.submit import Progress, observed
from cqsa_dask.core.dtypes import parse_dtype
from cqsa_dask.core.errors import BudgetError, InvalidInputError, StoreError
from cqsa_dask.core.plan import IDENTITY, Plan, make_plan
from cqsa_dask.core.units import parse_budget
from cqsa_dask.execution.graph import build_graph
from cqsa_dask.execution.options import RunOptions
from cqsa_dask.execution.runtime import ensure_runtime
from cqsa_dask.execution.telemetry import announce_job, page_link
from cqsa_dask.execution.warmup import warm_up
from cqsa_dask.kernels.attention import resolve_device
from cqsa_dask.store.chunkio import read_markers
from cqsa_dask.store.jobstate import Lease, check_free, fingerprint, same_inputs
from cqsa_dask.store.layout import (
    ENGINE,
    array,
    create_outputs,
    engine,
    input_info,
    read_block,
    validate_shapes,
    write_tensor,
)
from cqsa_dask.store.location import StoreLike, StoreLocation, parse_store

__all__ = ["JobResult", "attention", "run"]



@dataclass(frozen=True)
class JobResult:
    """What one ``run`` did.  Sizes in bytes, times in seconds."""

    plan: Plan
    seconds: float
    quorum_tasks_run: int
    merges_run: int
    resumed: bool
    dashboard_link: str | None
    bytes_read: int
    bytes_written: int
    peak_device_bytes: int | None
    kernels: tuple[str, ...] = field(default=())
    phases: dict[str, float] = field(default_factory=dict)
    """Seconds from the call to the end of each step before the tasks ran: "connected"
    (a cluster to run on), "planned" (sized for the workers), "claimed" (job state, lease),
    "runtime" (the workers' runtime set up), "prepared" (graph built), "submitted" (handed
    to the scheduler); "finished" (every task done)."""
    quorum_tasks_skipped: int = 0
    """Quorum tasks Dask ran again after their worker died whose marker was set already: they
    computed nothing (``tasks.quorum_task``) and are not in ``quorum_tasks_run``."""

    @property
    def tflops(self) -> float:
        """Achieved TFLOP/s of this run's tasks (causal counts half the FLOPs).

        A resumed run counts only the share of the plan's FLOPs its quorum
        tasks did (tasks carry equal work up to rounding); 0 when none ran.
        """
        if self.quorum_tasks_run == 0 or self.seconds <= 0:
            return 0.0
        done = self.plan.flops * self.quorum_tasks_run / self.plan.tasks
        return done / self.seconds / 1e12


def _budget(memory_budget: int | str | None, client: Client | None, resource: str) -> int:
    return resolve_budget(memory_budget, client, resource, config.get("memory-budget"))


def _markers(eng: Any, name: str) -> np.ndarray:
    """The (W, B, J) 0/1 marker array ``name`` of the engine group (read in bulk)."""
    return read_markers(array(eng, name))


def _done_so_far(eng: Any, plan: Plan, resumed: bool) -> tuple[np.ndarray, np.ndarray]:
    """The (W, B, J) task and merge markers of the job: read from the store when it is resumed; a
    job just started has none set."""
    if resumed:
        return _markers(eng, "task_done"), _markers(eng, "merge_done")
    grid = (plan.groups, plan.batch, plan.head_blocks)
    return np.zeros(grid, np.uint8), np.zeros(grid, np.uint8)


def _fit_disk(plan: Plan, store: StoreLocation) -> Plan:
    """"auto" partials that also fit the disk: bounded when "all" would not.

    "all" is chosen by the planner below ``cqsa.partials-limit``; on a local
    store it is kept only when everything the job writes (``bytes_written``)
    fits in ``cqsa.partials-disk-fraction`` of the disk's free space (plus
    what a job being replaced occupies).  (A stored job that is resumed keeps
    the policy it started with, whatever the disk holds now: ``run``'s plan_for.)
    """
    root, free = store.local_root, store.free_bytes()
    if plan.partials != "all" or root is None or free is None:
        return plan
    room = float(config.get("partials-disk-fraction"))
    if plan.bytes_written <= room * free:
        return plan
    # a job being replaced frees its files: count them only when they decide (a walk over every chunk)
    free += sum(_dir_bytes(os.path.join(root, n)) for n in (ENGINE, "out", "lse"))
    return dataclasses.replace(plan, partials="bounded") if plan.bytes_written > room * free else plan


def _dir_bytes(path: str) -> int:
    """Bytes of the files under ``path`` (0 when it does not exist)."""
    total = 0
    for root, _dirs, files in os.walk(path):
        for f in files:
            try:
                total += os.path.getsize(os.path.join(root, f))
            except OSError:  # removed meanwhile
                pass
    return total


def _store_op(op: Callable[[], object]) -> None:
    """Run ``op``; an OSError (read-only file system, full disk) becomes :class:`StoreError`."""
    try:
        op()
    except OSError as e:
        if isinstance(e, StoreError):
            raise
        raise StoreError(f"the store cannot be written: {e}") from None


def _identity(d: dict[str, Any]) -> dict[str, Any]:
    """The identity fields (``Plan.identity``) of a stored plan dict."""
    return {name: d.get(name) for name in IDENTITY} | {"query_groups": list(d.get("query_groups") or [])}


def _stored_plan(eng: Any, restart: bool) -> dict[str, Any] | None:
    """The plan dict of the job whose engine group is ``eng`` (None: no job, or it is to be replaced)."""
    if restart or eng is None:
        return None
    stored = eng.attrs.get("plan")
    return dict(stored) if isinstance(stored, dict) else None  # type: ignore[arg-type]


def _warm_local_kernels(plan: Plan, gpus: Sequence[str]) -> None:
    """A threaded local worker on one GPU queues its tasks' kernels from this process: build the
    kernels' plans for ``plan``'s shapes now, while the cluster starts (``execution/warmup.py``,
    ``cqsa.kernel-warmup``)."""
    if gpus and config.get("kernel-warmup") and not worker_processes(config.get("local-cluster.processes"), gpus):
        opts = RunOptions.from_config()
        warm_up(plan, resolve_device(opts.device), opts.kernel)


def _prepare(group: Any, plan: Plan, restart: bool, force: bool = False) -> tuple[str, bool]:
    """Resume the stored job when its plan and inputs match; else start a new one.

    ``run`` has refused a store held by another run before it connected; the lease is looked at
    again here (it may have been claimed since), after a changed job or changed inputs are
    refused as such (``force``: a lease of another host is taken over)."""
    if ENGINE in group:
        eng = engine(group)
        stored = dict(eng.attrs.get("plan") or {})  # type: ignore[arg-type]
        if not restart:
            if stored.get("version") != plan.version:
                raise InvalidInputError(
                    f"the store's job was planned by an incompatible engine (plan version "
                    f"{stored.get('version')}, engine {eng.attrs.get('engine_version')}; this is plan "
                    f"version {plan.version}); pass restart=True (CLI: --restart) to start over"
                )
            if _identity(stored) != plan.identity():  # the sizing of a run may differ, the job may not
                now = plan.identity()
                diff = [f"{k} {stored.get(k)!r} -> {v!r}" for k, v in now.items() if _identity(stored)[k] != v]
                raise InvalidInputError(
                    f"the store holds a job with a different plan ({'; '.join(diff)}); pass "
                    "restart=True (CLI: --restart) to discard it and start over"
                )
            if not same_inputs(group, eng.attrs.get("fingerprint")):
                raise InvalidInputError(
                    "the inputs q, k, v changed since the job started (fingerprint differs); pass "
                    "restart=True (CLI: --restart) to discard the partial results and start over"
                )
            check_free(eng, force=force)
            # this run's sizing (budget, tasks in flight, ...), which the workers read with the plan
            _store_op(lambda: eng.update_attributes({"plan": plan.to_dict()}))
            return str(eng.attrs["token"]), True
        check_free(eng, force=force)  # a restart replaces the job: not while another run holds it
    token = str(uuid.uuid4().int)[:12]

    def start() -> None:
        create_outputs(group, plan, token,
                       {"fingerprint": fingerprint(group), "started_at": time.time(), "active_s": 0.0})

    _store_op(start)  # read-only file system, permissions, full disk: StoreError
    return token, False


def _precheck(plan_for: Callable[[DeviceKind], Plan]) -> None:
    """Raise what planning for either device kind raises (a malformed budget, bad shapes), and a
    :class:`BudgetError` only when the budget fits no kind: the workers' kind is not known yet."""
    try:
        plan_for("cpu")
    except BudgetError:
        plan_for("cuda")


def run(
    store: StoreLike,
    *,
    storage_options: dict[str, Any] | None = None,
    causal: bool = False,
    scale: float | None = None,
    memory_budget: int | str | None = None,
    client: Client | None = None,
    scheduler: str | None = None,
    groups: int | None = None,
    restart: bool = False,
    progress: Progress | None = None,
    on_start: Callable[[Plan, str | None], None] | None = None,
    partials: str | None = None,
    query_groups: Sequence[int] | None = None,
    force: bool = False,
) -> JobResult:
    """Compute exact attention of the q, k, v arrays of a Zarr v3 group.

    Args:
        store: a group with q (B, Hq, N, D), k and v (B, Hkv, N, D);
            float32, float16, or bfloat16 stored as uint16 with attribute
            logical_dtype="bfloat16".  A path, a URL (``s3://bucket/job.zarr``),
            a zarr Store object or a ``StoreLocation`` (``store/location.py``).
        storage_options: fsspec options of a URL (e.g. ``{"endpoint_url": ...,
            "key": ..., "secret": ...}``); none: an s3:// URL uses the AWS_*
            environment variables.
        causal: lower-triangular (top-left aligned) mask.  scale: default 1/sqrt(D).
        memory_budget: bytes or "12GB" per worker; default: the smallest
            budget the scheduler's workers advertise, else ``cqsa.memory-budget``.
        client / scheduler: an existing Client, or a scheduler address;
            neither: a local cluster is started and closed.
        groups: force the number of token groups W (default: the planner's).
        restart: discard a stored job with a different plan.
        progress: called as progress(done, total) while tasks finish.
        on_start: called as on_start(plan, dashboard_link) before submitting.
        partials: "all" (|D| x the output on disk until merged, fastest),
            "bounded" (folded into each row on arrival: at most about half
            the output for half-precision jobs) or "auto" (default
            ``cqsa.partials``: bounded above ``cqsa.partials-limit``, or
            when "all" would not fit the store's disk).
        query_groups: compute only these query groups' rows (see
            ``Plan.group_bounds``); the others stay unwritten.
        force: take over the lease of a run on another host (after making
            sure that run is gone); a run of this host that no longer exists
            is taken over without it.

    Writes ``out`` (B, Hq, N, D, q's dtype) and ``lse`` (B, Hq, N, float32)
    into the group; engine state goes under ``_cqsa``.  A store holding the
    same plan resumes: tasks recorded as done are not recomputed.
    """
    t0 = time.perf_counter()
    phases: dict[str, float] = {}

    def mark(name: str) -> None:
        phases[name] = time.perf_counter() - t0

    location = parse_store(store, storage_options)
    group = location.open_group("r+")
    info = input_info(group)
    resource = str(config.get("resource"))

    eng = engine(group) if ENGINE in group else None
    if eng is not None:  # another run's live lease refuses this one now: before a cluster starts or workers are asked
        _store_op(functools.partial(check_free, eng, force=force))
    stored = _stored_plan(eng, restart)

    def plan_for(budget: int, kind: DeviceKind) -> Plan:
        """The plan for ``budget`` on workers of device ``kind``; a stored job keeps its decision
        (groups, heads per task, partials, query pieces) unless the call names other ones (then it
        is refused)."""
        keep = stored or {}
        opts = plan_options(kind)
        kept = keep.get("partials") if partials in (None, "auto") else None  # a resumed job keeps its policy
        opts["partials"] = kept or partials or opts["partials"]
        if stored:  # the pieces it was sized with (none before plans kept them)
            opts["query_piece"] = int(keep.get("query_piece", 0))
        w = groups if groups is not None else keep.get("groups")
        p = make_plan(
            seq_len=info.seq_len, heads=info.heads_q, kv_heads=info.heads_kv, head_dim=info.head_dim,
            batch=info.batch, dtype=info.dtype, causal=causal, scale=scale, budget=budget, groups=w,
            heads_per_task=keep.get("heads_per_task") if w == keep.get("groups") else None,
            query_groups=query_groups, **opts,
        )
        return _fit_disk(p, location) if opts["partials"] == "auto" else p

    local = client is None and scheduler is None
    # Plan before starting a local cluster (its workers are this machine's): bad input fails fast.
    kind = local_device_kind() if local else None
    plan = plan_for(_budget(memory_budget, None, resource), kind) if kind else None
    if plan is None and memory_budget is not None:  # bad input fails before a scheduler is asked
        _precheck(lambda k: plan_for(parse_budget(memory_budget), k))
    gpus = local_gpus() if local else []  # checked even for CPU tasks: a GPU named must exist
    gpus = gpus if kind == "cuda" else []  # one worker process per GPU
    if plan is not None:
        _warm_local_kernels(plan, gpus)  # while the local cluster starts
    # CUDA: a thread more than tasks in flight, for merges while the device computes; CPU: a task
    # already uses every core, and a second thread running torch at once oversubscribes them
    threads = (plan.tasks_in_flight + int(plan.host_staging)) if plan else 2
    with connect(client, scheduler, budget_bytes=plan.budget_bytes if plan else 0, resource=resource,
                 threads=threads, gpus=gpus) as c:
        mark("connected")
        if plan is None:  # sized for what the scheduler's workers are and advertise
            plan = plan_for(_budget(memory_budget, c, resource), workers_device_kind(c))
        check_capacity(c, resource, plan.resource_bytes)
        mark("planned")
        if location.process_local:  # an in-memory store: only workers in this process reach it
            location.check_processes(c.run(os.getpid).values())
        token, resumed = _prepare(group, plan, restart, force)
        lease = Lease(group, ttl=float(config.get("lease-seconds")), force=force)
        _store_op(lease.claim)
        mark("claimed")
        try:
            eng = engine(group)
            options = RunOptions.from_config(resource=resource, tasks_in_flight=plan.tasks_in_flight)
            ensure_runtime(c, options)  # every worker's runtime (caches, pools, locks), set up once
            mark("runtime")
            task_done, merge_done = _done_so_far(eng, plan, resumed)  # for the graph and the page
            jg = build_graph(
                location, token, plan, resource=resource, retries=0,  # tasks retry what is transient themselves
                task_done=task_done, merge_done=merge_done, options=options,
            )
            _store_op(lease.confirm)  # its settling wait overlaps building the graph; before any task
            mark("prepared")
            if on_start is not None:
                on_start(plan, page_link(c))
            announce_job(c, token, plan, store=location.describe(), resource=resource, task_done=task_done,
                         merge_done=merge_done)  # the /cqsa page's plugin learns of the job first
            results, seconds = observed(c, jg.graph, jg.keys, progress, token, submitted=lambda: mark("submitted"))
            mark("finished")
        finally:
            lease.release()
        link = c.dashboard_link
    quorum = [r for r in results if r["kind"] == "quorum" and not r.get("skipped")]
    peaks = [r["peak_device_bytes"] for r in quorum if r["peak_device_bytes"] is not None]
    return JobResult(
        plan=plan, seconds=seconds, quorum_tasks_run=len(quorum),
        quorum_tasks_skipped=sum(r["kind"] == "quorum" and bool(r.get("skipped")) for r in results),
        merges_run=sum(r["kind"] == "merge" for r in results), resumed=resumed, dashboard_link=link,
        bytes_read=sum(r["bytes_read"] for r in results),
        bytes_written=sum(r["bytes_written"] for r in results),
        peak_device_bytes=max(peaks) if peaks else None,
        kernels=tuple(sorted({r["kernel"] for r in quorum})),
        phases=phases,
    )


NO_BACKWARD = ("cqsa_dask.attention computes the forward pass only: it has no backward; train with "
               "torch.nn.functional.scaled_dot_product_attention, or call it under torch.no_grad()")


def _validate_tensors(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> None:
    for name, t in (("q", q), ("k", k), ("v", v)):
        if not isinstance(t, torch.Tensor):
            raise InvalidInputError(f"{name} must be a torch.Tensor, got {type(t).__name__}")
    if not (q.dtype == k.dtype == v.dtype):
        raise InvalidInputError(f"q, k, v must share one dtype, got {q.dtype}, {k.dtype}, {v.dtype}")
    parse_dtype(str(q.dtype))
    if not (q.device == k.device == v.device):
        raise InvalidInputError(f"q, k, v must be on one device, got {q.device}, {k.device}, {v.device}")
    validate_shapes(tuple(q.shape), tuple(k.shape), tuple(v.shape))


def attention(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    *,
    causal: bool = False,
    scale: float | None = None,
    memory_budget: int | str | None = None,
    return_lse: bool = False,
    client: Client | None = None,
    workdir: str | os.PathLike[str] | None = None,
    groups: int | None = None,
    store: StoreLike | None = None,
    storage_options: dict[str, Any] | None = None,
) -> torch.Tensor | tuple[torch.Tensor, torch.Tensor]:
    """Exact scaled-dot-product attention, streamed through Dask and Zarr.

    Args:
        q: (B, Hq, N, D); k, v: (B, Hkv, N, D) with Hq % Hkv == 0; float32,
            float16 or bfloat16; D <= 256.
        causal, scale: as ``torch.nn.functional.scaled_dot_product_attention``.
        memory_budget: per-worker device memory, bytes or "512MB"/"1.5GiB"
            (default: the current session's, else "1GB").
        return_lse: also return lse (B, Hq, N) float32, the natural-log
            softmax denominator of the scaled logits.
        client: an existing Client (default: the current session's, else a
            local cluster for this call).
        workdir: directory for the job store, which is kept (default: the
            current session's, else a temporary one; then it is removed).
        groups: force the number of token groups W.
        store, storage_options: where the job store is created instead (a
            new path or empty directory, a URL with its fsspec options, or a
            zarr Store, as ``run`` takes them); it is kept afterwards.

    Returns:
        out (B, Hq, N, D) in q's dtype on q's device, and lse when asked.
        There is no backward: with gradients enabled and inputs that require
        them, the outputs require them too, and a backward that reaches them
        raises NotImplementedError (gradients are never silently dropped).
    """
    _validate_tensors(q, k, v)
    if store is not None and workdir is not None:
        raise InvalidInputError("give workdir (a directory for a temporary store) or store (the store itself), "
                                "not both")
    client, workdir, memory_budget, keep = session_defaults(client, workdir, memory_budget)
    memory_budget = "1GB" if memory_budget is None else memory_budget
    location = parse_store(store, storage_options) if store is not None else None
    b, hq, n, d = q.shape
    kind = workers_device_kind(client) if client is not None else local_device_kind()
    plan = make_plan(seq_len=n, heads=hq, kv_heads=k.shape[1], head_dim=d, batch=b,
                     dtype=str(q.dtype), causal=causal, scale=scale, budget=memory_budget, groups=groups,
                     **plan_options(kind))

    def compute(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        tmp = tempfile.mkdtemp(prefix="cqsa-", dir=workdir) if location is None else None
        try:
            where = location if tmp is None else parse_store(os.path.join(tmp, "job.zarr"))
            assert where is not None
            group = where.create_group(overwrite=tmp is not None)
            g = plan.group_size
            write_tensor(group, "q", q, (1, plan.q_heads_per_task, g, d))
            write_tensor(group, "k", k, (1, plan.heads_per_task, g, d))
            write_tensor(group, "v", v, (1, plan.heads_per_task, g, d))
            run(where, causal=causal, scale=scale, memory_budget=memory_budget, client=client, groups=groups)
            out = read_block(array(group, "out"), (...,), plan.dtype).to(q.device)
            lse = read_block(array(group, "lse"), (...,), "float32").to(q.device)
        finally:
            if tmp is not None and not keep:
                shutil.rmtree(tmp, ignore_errors=True)
        return out, lse

    out, lse = forward_only(compute, NO_BACKWARD, q, k, v)
    return (out, lse) if return_lse else out
