"""The benchmark cases: what is measured, declared as data.

A case says the problem (N, Hq, Hkv, D, dtype, causal), the memory budget,
where it runs, how cqsa is called and what it is compared with.  The runner
(runner.py) turns a list of cases into one result file; nothing here imports
torch, dask or the engine.

How cqsa is called (``mode``)::

    warm       cqsa_dask.run(store, client=C): C is a LocalCluster started and
               warmed by the runner (CUDA context, kernel probe) with the sizes
               of ``cqsa.local-cluster`` and resources={resource: budget},
               so cluster start is not timed
    cold       cqsa_dask.run(store, memory_budget=B) with no client: the
               cluster run() starts and closes is part of the time
    attention  cqsa_dask.attention(q, k, v, client=C): tensors in host memory,
               C the user's in-process LocalCluster advertising the budget

Inputs (``inputs``): "stored" (seeded randn written by
``write_random_inputs`` before the timed call, timed apart) or "generated"
(docs/synthetic.md: the tasks generate q, k, v; nothing is stored, SDPA is
not run).  SDPA (``sdpa``) runs on the same inputs in the same process;
cases of one shape share one SDPA measurement within a run.

A case's ``name`` is its identity in the record: the report keeps the latest
result per name, so a name must keep meaning the same problem.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass, replace
from typing import Any, Literal

__all__ = ["SUITES", "Case", "select"]

GB = 10**9
M = 2**20

Mode = Literal["warm", "cold", "attention"]
Inputs = Literal["stored", "generated"]
Check = Literal["rows", "full"]


@dataclass(frozen=True)
class Case:
    """One measured configuration.

    Sizes in tokens (``n``) and bytes (``budget_bytes``, ``cap_bytes``).
    ``budget_bytes`` None: the largest budget for which the planner picks at
    least ``min_groups`` groups (the CPU cases' rule, so that W >= 7 there).
    ``cap_bytes``: cap this process's and the worker's device memory
    (``torch.cuda.set_per_process_memory_fraction``): the out-of-memory case.
    ``check``: "rows" compares 8 sampled rows with float64, "full" the whole
    output and lse with a dense float64 attention (small N only).
    ``time_box``: stop cqsa after that many seconds, keeping the finished
    tasks' figures.  ``workers``: worker processes sharing the device.
    """

    name: str
    n: int
    h: int = 4
    hkv: int = 4
    d: int = 128
    dtype: str = "bfloat16"
    causal: bool = False
    budget_bytes: int | None = 4 * GB
    device: Literal["cpu", "cuda"] = "cuda"
    mode: Mode = "warm"
    inputs: Inputs = "stored"
    sdpa: bool = True
    check: Check = "rows"
    groups: int | None = None
    min_groups: int = 7
    cap_bytes: int | None = None
    time_box: float | None = None
    workers: int = 1

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)

    def tiny(self) -> Case:
        """The same case at a size the CPU runs in seconds (the GPU code path, dry)."""
        n = max(1024, self.n // 1024) if self.check == "rows" else self.n // 10
        budget = None if self.budget_bytes is None else int(8.5e6 + self.budget_bytes / 512)
        cap = None if self.cap_bytes is None else int(8.5e6 + self.cap_bytes / 512)
        return replace(self, n=n, budget_bytes=budget, cap_bytes=cap, device="cpu", time_box=None)


def _gpu(name: str, n: int, budget_gb: float, **kw: Any) -> Case:
    return Case(name=name, n=n, budget_bytes=int(budget_gb * GB), **kw)


def _correctness() -> tuple[Case, ...]:
    """W in {7, 13} x dtype x causal; GQA and D alternate so each dtype sees both."""
    out, i = [], 0
    for dtype in ("bfloat16", "float16", "float32"):
        for causal in (False, True):
            for w in (7, 13):
                gqa, d = i % 2 == 0, 128 if (i // 2) % 2 == 0 else 64
                out.append(Case(name=f"c{i:02d}", n=3000 + i % 3, h=4, hkv=2 if gqa else 4, d=d, dtype=dtype,
                                causal=causal, budget_bytes=GB, groups=w, sdpa=False, check="full"))
                i += 1
    return tuple(out)


def _cpu(name: str, **kw: Any) -> Case:
    """N = 32,768, H = 2, D = 64, float32, the budget giving W >= 7: this project's 2-core machine."""
    return Case(name=name, n=32768, h=2, hkv=2, d=64, dtype="float32", budget_bytes=None, device="cpu", **kw)

SUITES: dict[str, tuple[Case, ...]] = {
    # this project's CPU machine: run() on a warm cluster, and attention() with the user's client
    "cpu": (
        _cpu("cpu"), _cpu("cpu-causal", causal=True), _cpu("cpu-attention", mode="attention"),
    ),
    # one H200, B = 1, H = 4, D = 128, bf16: the scaling, budget and memory figures
    "gpu": (
        _gpu("n262k-4GB", 2**18, 4), _gpu("n1M-4GB", M, 4), _gpu("n1M-4GB-causal", M, 4, causal=True),
        _gpu("n1M-1GB", M, 1), _gpu("n1M-2GB", M, 2), _gpu("n1M-8GB", M, 8),
        _gpu("n4M-4GB", 4 * M, 4), _gpu("n4M-4GB-causal", 4 * M, 4, causal=True),
        _gpu("n4M-16GB", 4 * M, 16, sdpa=False), _gpu("n4M-8GB", 4 * M, 8, sdpa=False),
        _gpu("n4M-2GB", 4 * M, 2, sdpa=False), _gpu("n4M-1GB", 4 * M, 1, sdpa=False, time_box=300),
        _gpu("n2M-4GB", 2 * M, 4, sdpa=False), _gpu("n8M-4GB", 8 * M, 4, sdpa=False),
        _gpu("n16M-4GB", 16 * M, 4, sdpa=False, inputs="generated"),
        # SDPA out of memory under a 4 GB cap, cqsa completes under the same cap
        _gpu("oom", M, 4, cap_bytes=4 * GB),
    ),
    # the cases of the performance issue: warm 1M at 12 GB, cold run(), two workers on one GPU
    "gpu-perf": (
        _gpu("n1M-12GB", M, 12), _gpu("n1M-12GB-causal", M, 12, causal=True),
        _gpu("n1M-H1-12GB", M, 12, h=1, hkv=1),
        _gpu("n1M-4GB-cold", M, 4, mode="cold"), _gpu("n4M-4GB-cold", 4 * M, 4, mode="cold"),
        _gpu("n4M-4GB", 4 * M, 4), _gpu("n4M-4GB-causal", 4 * M, 4, causal=True),
        _gpu("n4M-1GB", 4 * M, 1, sdpa=False, time_box=300), _gpu("n4M-16GB", 4 * M, 16, sdpa=False),
        _gpu("n4M-4GB-2workers", 4 * M, 4, sdpa=False, workers=2),
    ),
    # correctness on CUDA: the whole output against float64, N ~ 3000
    "gpu-correctness": _correctness(),
}


def select(suite: str, names: list[str] | None = None, *, tiny: bool = False) -> list[Case]:
    """The cases of ``suite`` (all, or ``names`` in the order given), scaled down when ``tiny``.

    Raises KeyError naming the unknown suite or cases.
    """
    if suite not in SUITES:
        raise KeyError(f"unknown suite {suite!r}: expected one of {', '.join(SUITES)}")
    by_name = {c.name: c for c in SUITES[suite]}
    if names:
        missing = [n for n in names if n not in by_name]
        if missing:
            raise KeyError(f"suite {suite!r} has no case {', '.join(missing)}: it has {', '.join(by_name)}")
        cases = [by_name[n] for n in names]
    else:
        cases = list(SUITES[suite])
    return [c.tiny() for c in cases] if tiny else cases
