"""transfer.py: uploads read by kernels on another stream, results copied back after their kernels.

On this CPU machine the CPU contract runs (no copies, no events); the CUDA
round trip runs wherever CUDA is, and on the GPU machine through
``python -c "import tests.test_transfer as t; t.check_round_trip('cuda')"``
(benchmarks/README.md: the first command of a GPU session).
"""

from __future__ import annotations

import contextlib

import torch

from cqsa_dask.kernels.transfer import done_event, download, upload, use


def check_round_trip(device: str) -> None:
    """Upload random blocks, compute on a stream of our own that waits only for the upload
    events, copy the results back after their kernels: every value arrives, in order."""
    dev = torch.device(device)
    g = torch.Generator().manual_seed(7)
    blocks = [torch.randn(3, 1000 + 17 * i, 64, generator=g) for i in range(4)]
    staged = [upload(b, dev) for b in blocks[:3]]
    on_dev = blocks[3].to(dev)  # a block made on the device already (synthetic inputs), on another stream
    if dev.type == "cuda":
        torch.cuda.current_stream(dev).synchronize()
    staged.append(upload(on_dev, dev))
    assert staged[-1].tensor is on_dev and staged[-1].event is None
    del on_dev  # the task drops its blocks while their kernels may still run: use() must protect them
    compute = torch.cuda.Stream(dev) if dev.type == "cuda" else None
    results = []
    with torch.cuda.stream(compute) if compute is not None else contextlib.nullcontext():
        for b, s in zip(blocks, staged, strict=True):
            x = use(s)
            assert x.device.type == dev.type and x.shape == b.shape
            y = (x * 2 + 1).sum(dim=-1)  # (3, L): queued after the upload, on our stream
            results.append((b, y, done_event(dev)))
        for b, y, ev in results:
            host = download(y, ev)
            assert host.device.type == "cpu"
            torch.testing.assert_close(host, (b * 2 + 1).sum(dim=-1), rtol=1e-5, atol=1e-4)


def test_round_trip_on_every_device_here() -> None:
    check_round_trip("cpu")
    if torch.cuda.is_available():
        check_round_trip("cuda")


def test_cpu_blocks_are_neither_copied_nor_evented() -> None:
    """On the CPU the task computes on the blocks read (no copy of hundreds of MB per group)."""
    x = torch.randn(2, 50, 8)
    s = upload(x, torch.device("cpu"))
    assert s.event is None and use(s) is x
    assert done_event(torch.device("cpu")) is None
    assert download(x, None) is x
