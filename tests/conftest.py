"""Shared fixtures: one Dask cluster per session, fresh random inputs per test.

``client``: a ``LocalCluster`` of one worker process (two threads) that
advertises 4 GB of the engine's resource, so exactness tests don't each start
a cluster.  ``make_inputs``: a factory for random q, k, v whose seed comes
from ``os.urandom`` (or ``CQSA_TEST_SEED`` to replay one) and is printed in
the test's output and in every assertion message built from ``Inputs.ctx``.
``pieces_together``: the pieces of each step computed together (``cqsa.first-pieces``)
by tasks of an in-process worker.
"""

from __future__ import annotations

import importlib.util
import math
import os
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path

import pytest
import torch
import zarr
from distributed import Client, LocalCluster

from cqsa_dask.store.layout import write_tensor

# Without a GPU, Triton kernels (the fused analysis kernel) run under Triton's interpreter;
# it must be chosen before triton is first imported.  The engine itself never picks the
# fused kernel on the CPU unless asked (cqsa.analysis-kernel: fused).
if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")

RESOURCE = "device_mem"
CLIENT_DEVICE_MEM = 4e9


@pytest.fixture(scope="session")
def client() -> Iterator[Client]:
    with LocalCluster(n_workers=1, threads_per_worker=2, processes=True, resources={RESOURCE: CLIENT_DEVICE_MEM},
                      dashboard_address=":0") as cluster, Client(cluster) as c:
        yield c


@dataclass(frozen=True)
class Inputs:
    """q (B, Hq, N, D), k and v (B, Hkv, N, D) and how they were drawn."""

    q: torch.Tensor
    k: torch.Tensor
    v: torch.Tensor
    seed: int
    magnitude: float

    @property
    def ctx(self) -> str:
        """Replay hint for assertion messages."""
        return f"seed {self.seed} (replay: CQSA_TEST_SEED={self.seed}), magnitude {self.magnitude:g}"

    def store(self, path: Path, chunk_tokens: int) -> zarr.Group:
        """A new Zarr v3 group at ``path`` holding q, k, v in chunks of every head and ``chunk_tokens`` tokens."""
        g = zarr.open_group(str(path), mode="w", zarr_format=3)
        for name, t in (("q", self.q), ("k", self.k), ("v", self.v)):
            write_tensor(g, name, t, (1, t.shape[1], chunk_tokens, t.shape[3]))
        return g


def draw_inputs(batch: int, heads_q: int, heads_kv: int, seq_len: int, head_dim: int,
                dtype: torch.dtype = torch.float32, *, magnitude: float = 1.0, scale: float | None = None,
                seed: int | None = None) -> Inputs:
    """Random inputs whose scaled logits have standard deviation ~``magnitude``.

    q and k are N(0, 1) draws times sqrt(magnitude / scale / sqrt(D)), so
    scale * q.k ~ N(0, magnitude^2); v is N(0, 1).  Never zeros.
    """
    if seed is None:
        env = os.environ.get("CQSA_TEST_SEED")
        seed = int(env) if env else int.from_bytes(os.urandom(4), "little")
    g = torch.Generator().manual_seed(seed)
    s = 1.0 / math.sqrt(head_dim) if scale is None else scale
    amp = math.sqrt(magnitude / (s * math.sqrt(head_dim)))
    q = torch.randn(batch, heads_q, seq_len, head_dim, generator=g, dtype=torch.float64) * amp
    k = torch.randn(batch, heads_kv, seq_len, head_dim, generator=g, dtype=torch.float64) * amp
    v = torch.randn(batch, heads_kv, seq_len, head_dim, generator=g, dtype=torch.float64)
    return Inputs(q.to(dtype), k.to(dtype), v.to(dtype), seed, magnitude)


@pytest.fixture
def make_inputs(request: pytest.FixtureRequest) -> Callable[..., Inputs]:
    """``make_inputs(B, Hq, Hkv, N, D, dtype, magnitude=, scale=)``; prints the seed."""

    def make(*args: object, **kw: object) -> Inputs:
        inp = draw_inputs(*args, **kw)  # type: ignore[arg-type]
        print(f"{request.node.nodeid}: {inp.ctx}")
        return inp

    return make


def partial_files(store: Path) -> list[Path]:
    """The chunk files of ``store``'s partial_out and partial_lse (a finished job has none)."""
    return [p for n in ("partial_out", "partial_lse") for p in (store / "_cqsa" / n).rglob("*")
            if p.is_file() and p.name != "zarr.json"]


def pytest_collection_modifyitems(config: pytest.Config, items: list[pytest.Item]) -> None:
    """Tests marked ``gpu`` need a CUDA device, tests marked ``dask_cuda`` the optional dask-cuda
    (``cqsa-dask[cuda]``, whose pins on dask keep it out of the test environment): deselected
    (and counted as such) where they cannot run, as the GPU machine's ``python -m pytest -m gpu``
    runs the former; the CPU suite has no skips for them."""
    needs = {"gpu": torch.cuda.is_available(),
             "dask_cuda": importlib.util.find_spec("dask_cuda") is not None}
    out = [it for it in items if any(it.get_closest_marker(m) and not ok for m, ok in needs.items())]
    if out:
        config.hook.pytest_deselected(items=out)
        items[:] = [it for it in items if it not in out]


@pytest.fixture
def pieces_together(monkeypatch: pytest.MonkeyPatch) -> list[int]:
    """The number of pieces of every step that an in-process worker's task computed together
    (more than one: ``cqsa.first-pieces`` 2), appended as the tasks run."""
    from cqsa_dask.execution import tasks

    seen: list[int] = []
    real = tasks._QuorumRun.compute_together

    def counted(self: tasks._QuorumRun, steps: list, qs: list, blocks: object) -> list:
        if len(steps) > 1:
            seen.append(len(steps))
        return real(self, steps, qs, blocks)  # type: ignore[arg-type]

    monkeypatch.setattr(tasks._QuorumRun, "compute_together", counted)
    return seen
