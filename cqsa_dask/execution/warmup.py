"""The attention kernels' plans built before a job's first task, while its local cluster starts.

cuDNN builds an execution plan for each attention shape on the host thread that first
calls it, and keeps it for that thread; the first job in a process paid those set-ups
inside its tasks (docs/benchmarks.md: a 1M job's first tasks computed about 1 s longer
than a later job's).  When the tasks' kernels are queued from this process's compute
thread (a threaded local worker on one GPU: ``devicethread.py``), the plans can be built
there before the tasks need them::

    run()  plan ── warm_up(plan, device) ──> compute thread: select_kernel, then one attend()
           │                                 per shape the plan's W = 1 task calls (below)
           └─ start the local cluster (1.1-1.5 s) ... the tasks' kernels queue behind it

Only jobs of one token group in query pieces (W = 1): short jobs, where a second of
set-up shows; a larger job amortises it.  Shapes (query tokens T, key tokens S, masked),
of ``steps`` of the plan's first task: a piece against each key block, causal the
diagonal block under the mask, and non-causal, resident, a piece against all N keys.
The inputs are uninitialised tensors of the task's heads; what the calls return is
dropped, and the memory they took goes back to the device (``empty_cache``) before the
tasks start.  Shapes warmed once in a process are not warmed again.
"""

from __future__ import annotations

import logging
import threading
from concurrent.futures import Future

import torch

from cqsa_dask.core.plan import Plan
from cqsa_dask.execution.devicethread import submit_on_device
from cqsa_dask.execution.pieces import steps
from cqsa_dask.kernels.attention import attend, select_kernel
from cqsa_dask.store.layout import TORCH_DTYPES

__all__ = ["shapes", "warm_up"]

log = logging.getLogger(__name__)

Shape = tuple[int, int, bool]  # (query tokens, key tokens, masked)
_done: set[tuple[str, str, int, int, int, str, Shape]] = set()
_guard = threading.Lock()


def shapes(plan: Plan) -> list[Shape]:
    """The attention calls' shapes (T, S, masked) of ``plan``'s first quorum task when the job is one
    token group in query pieces (``tasks._QuorumRun._block_calls``); [] for any other job."""
    if plan.groups != 1 or plan.query_piece <= 0:
        return []
    run = steps(plan, plan.work(0), plan.query_piece)
    if not run or run[0].part is None:
        return []
    n = plan.seq_len
    blocks = sorted({min(n, k0 + run[0].size) - k0 for k0 in range(0, n, run[0].size)})
    out: set[Shape] = set()
    for step in run:
        assert step.part is not None
        t = step.part.stop - step.part.start
        if plan.causal:
            out.update((t, k1 - k0, masked) for k0, k1, masked in step.key_blocks())
        elif step.first or plan.stream_keys:
            out.update((t, s, False) for s in blocks)
        else:
            out.add((t, n, False))
    return sorted(out)


def warm_up(plan: Plan, dev: torch.device, kernel: str = "auto") -> Future[None] | None:
    """Queue, on ``dev``'s compute thread, one attention call per shape of ``plan`` not warmed in this
    process yet (module docstring); its future, or None when there is nothing to do (a CPU device, a
    job of several groups, shapes warmed already).  Never raises for the job: a failure is logged."""
    if dev.type != "cuda":
        return None
    todo = [s for s in shapes(plan) if _key(plan, dev, kernel, s) not in _done]
    if not todo:
        return None
    with _guard:
        _done.update(_key(plan, dev, kernel, s) for s in todo)
    return submit_on_device(dev, lambda: _run(plan, dev, kernel, todo))


def _key(plan: Plan, dev: torch.device, kernel: str, s: Shape) -> tuple[str, str, int, int, int, str, Shape]:
    return (str(dev), plan.dtype, plan.head_dim, plan.q_heads_per_task, plan.heads_per_task, kernel, s)


def _run(plan: Plan, dev: torch.device, kernel: str, todo: list[Shape]) -> None:
    """On the compute thread: the calls, on a stream of their own; then the memory back."""
    try:
        dtype = TORCH_DTYPES[plan.dtype]
        name = select_kernel(dev, dtype, plan.head_dim, kernel)
        hq, hk, d = plan.q_heads_per_task, plan.heads_per_task, plan.head_dim
        stream = torch.cuda.Stream(dev)
        with torch.cuda.stream(stream):
            n = max(s for _, s, _ in todo)  # resident keys: blocks are views of all N tokens
            k, v = (torch.empty(1, hk, n, d, dtype=dtype, device=dev) for _ in range(2))
            for t, s, masked in todo:
                q = torch.empty(1, hq, t, d, dtype=dtype, device=dev)
                ks, vs = (x[:, :, :s].contiguous() if plan.stream_keys else x[:, :, :s] for x in (k, v))
                attend(q, ks, vs, scale=plan.scale, diagonal_causal=masked, kernel=name)
            del q, k, v, ks, vs
        stream.synchronize()
        torch.cuda.empty_cache()
    except Exception as e:  # noqa: BLE001 - a warm-up that fails only leaves the set-up to the tasks
        log.info("warming up the attention kernels on %s failed: %s", dev, e)
