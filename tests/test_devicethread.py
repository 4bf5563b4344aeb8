"""The per-device compute thread (``execution/devicethread.py``).

::

    on_device(cpu, fn)        fn runs on the calling thread; its exception reaches the caller
    on_device(cuda, fn)       from several task threads, each on its own stream: fn runs on one
                              thread per device, on the caller's stream, and its results are exact
                              against float64; its exception reaches the caller
    a job's tasks on CUDA     every kernel queued from that one thread (a job of several tasks in
                              flight, both turns: test_pieces.py and test_exactness.py check them
                              against float64)
"""

from __future__ import annotations

import threading
from concurrent.futures import ThreadPoolExecutor

import pytest
import torch

from cqsa_dask.core.errors import InvalidInputError
from cqsa_dask.execution.devicethread import on_device


def _fail() -> None:
    raise InvalidInputError("from fn")


def test_cpu_runs_on_the_calling_thread() -> None:
    here = threading.get_ident()
    assert on_device(torch.device("cpu"), threading.get_ident) == here
    with pytest.raises(InvalidInputError, match="from fn"):
        on_device(torch.device("cpu"), _fail)


@pytest.mark.gpu
def test_cuda_runs_on_one_thread_on_the_callers_stream() -> None:
    dev = torch.device("cuda", 0)
    gen = torch.Generator().manual_seed(int(torch.seed() % 2**31))
    a = torch.randn(8, 512, 512, generator=gen, dtype=torch.float64)
    b = torch.randn(8, 512, 512, generator=gen, dtype=torch.float64) * 30  # large entries

    def task(i: int) -> tuple[int, bool, torch.Tensor]:
        stream = torch.cuda.Stream(dev)
        with torch.cuda.stream(stream):
            x, y = a[i].to(dev, torch.float32), b[i].to(dev, torch.float32)

            def fn() -> tuple[int, bool, torch.Tensor]:
                return threading.get_ident(), torch.cuda.current_stream(dev) == stream, x @ y

            ident, same_stream, z = on_device(dev, fn)
            stream.synchronize()
            return ident, same_stream, z.double().cpu()

    with ThreadPoolExecutor(4) as pool:
        got = list(pool.map(task, range(8)))
    assert len({ident for ident, _, _ in got}) == 1
    assert got[0][0] != threading.get_ident()
    assert all(same for _, same, _ in got)
    for i, (_, _, z) in enumerate(got):
        ref = a[i].float().double() @ b[i].float().double()
        assert torch.allclose(z, ref, rtol=1e-4, atol=1e-3 * float(ref.abs().max())), i
    with pytest.raises(InvalidInputError, match="from fn"):
        on_device(dev, _fail)
