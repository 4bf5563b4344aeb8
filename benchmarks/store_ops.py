"""What a job's start costs in store operations, one by one, on this machine's disk.

    python -m benchmarks.store_ops [--dir /tmp/cqsa-store-ops] [--out FILE.json]

The warm 1M, H = 1 row spends about 0.05 s between planning and the lease on the GPU machine
(``JobResult.phases``: "planned" to "claimed"), twice what the same steps take on the 2-core
development machine.  This times each step of ``run()``'s start on a store shaped like that
row's (B = 1, H = 1, N = 2^20, D = 128, bf16, written with plain zarr), after the previous
job's outputs were removed as the benchmark removes them, ``--reps`` times, and the zarr and
file-system primitives under them (a local directory and zarr's MemoryStore), so that the
figures say whether the file system or the Python around it is slow.  Prints one JSON object.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import statistics
import time
from collections.abc import Callable
from typing import Any

from benchmarks import environment

N = 2**20


def _median_ms(fn: Callable[[], Any], reps: int, before: Callable[[], Any] | None = None) -> float:
    times = []
    for _ in range(reps):
        if before is not None:
            before()
        t = time.perf_counter()
        fn()
        times.append(time.perf_counter() - t)
    return round(statistics.median(times) * 1e3, 3)


def measure(root: str, reps: int) -> dict[str, Any]:
    import zarr
    import zarr.storage

    from cqsa_dask.client.policy import plan_options
    from cqsa_dask.core.plan import make_plan
    from cqsa_dask.store.chunkio import read_markers
    from cqsa_dask.store.jobstate import Lease, fingerprint
    from cqsa_dask.store.layout import array, create_array, create_outputs, engine, input_info, open_job
    from cqsa_dask.store.location import parse_store
    from cqsa_dask.store.random_inputs import write_random_inputs

    path = os.path.join(root, "job.zarr")
    write_random_inputs(path, seq_len=N, heads=1, head_dim=128, dtype="bfloat16")
    loc = parse_store(path)
    group = loc.open_group("r+")
    info = input_info(group)
    plan = make_plan(seq_len=info.seq_len, heads=1, kv_heads=1, head_dim=128, batch=1, dtype=info.dtype,
                     causal=False, scale=None, budget=12 * 10**9, **plan_options("cuda"))
    token = iter(range(10**6))

    def clear() -> None:
        for name in ("out", "lse", "_cqsa"):
            shutil.rmtree(os.path.join(path, name), ignore_errors=True)

    def fresh() -> None:
        clear()
        create_outputs(group, plan, "0")

    steps: dict[str, float] = {
        "open group": _median_ms(lambda: loc.open_group("r+"), reps),
        "input_info": _median_ms(lambda: input_info(loc.open_group("r+")), reps),
        "create_outputs (after the old job removed)": _median_ms(
            lambda: create_outputs(group, plan, "1"), reps, clear),
        "fingerprint": _median_ms(lambda: fingerprint(group), reps),
        "engine attributes update": _median_ms(
            lambda: engine(group).update_attributes({"started_at": time.time()}), reps, fresh),
    }

    def claim() -> None:
        lease = Lease(group, ttl=60.0)
        lease.claim()
        lease.confirm()
        lease.release()

    steps["lease claim, confirm, release"] = _median_ms(claim, reps, fresh)
    steps["markers read (task_done, merge_done)"] = _median_ms(
        lambda: [read_markers(array(engine(group), n)) for n in ("task_done", "merge_done")], reps, fresh)

    def open_fresh_job() -> None:
        t = str(next(token))
        engine(group).update_attributes({"token": t})
        open_job(loc, t)

    steps["open_job (a worker opens the job's arrays)"] = _median_ms(open_fresh_job, reps)

    prims: dict[str, float] = {}
    for kind in ("local", "memory"):
        store = zarr.storage.LocalStore(os.path.join(root, "prim.zarr")) if kind == "local" else \
            zarr.storage.MemoryStore()
        g = zarr.open_group(store, mode="w")
        names = iter(range(10**6))
        prims[f"{kind}: create_array"] = _median_ms(
            lambda g=g, names=names: create_array(g, f"a{next(names)}", (1, 1, N, 128), (1, 1, N, 128),
                                                  "bfloat16"), reps)
        prims[f"{kind}: open array"] = _median_ms(lambda g=g: g["a0"], reps)
        prims[f"{kind}: update_attributes"] = _median_ms(lambda g=g: g.update_attributes({"x": 1}), reps)
    d = os.path.join(root, "fs")
    os.makedirs(d, exist_ok=True)
    names = iter(range(10**6))

    def small_file() -> None:
        p = os.path.join(d, f"f{next(names)}")
        with open(p + ".tmp", "wb") as f:
            f.write(b"x" * 1024)
        os.replace(p + ".tmp", p)

    prims["fs: mkdir"] = _median_ms(lambda: os.mkdir(os.path.join(d, f"d{next(names)}")), reps)
    prims["fs: write 1 KB + rename"] = _median_ms(small_file, reps)
    prims["fs: stat"] = _median_ms(lambda: os.stat(path), reps)
    prims["fs: listdir"] = _median_ms(lambda: os.listdir(path), reps)
    big = os.path.join(d, "big")

    def write_big() -> None:
        with open(big, "wb") as f:
            f.write(os.urandom(256 << 20))

    prims["fs: unlink 256 MiB"] = _median_ms(lambda: os.unlink(big), 3, write_big)
    shutil.rmtree(root, ignore_errors=True)
    return {"steps_ms": steps, "primitives_ms": prims}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--dir", default="/tmp/cqsa-store-ops")
    ap.add_argument("--reps", type=int, default=9)
    ap.add_argument("--out")
    a = ap.parse_args()
    os.makedirs(a.dir, exist_ok=True)
    rec = {"date_utc": environment.now_utc(), "hardware": environment.hardware(),
           "versions": environment.versions(), "git": environment.git_info(),
           **measure(a.dir, a.reps)}
    text = json.dumps(rec, indent=1)
    print(text)
    if a.out:
        with open(a.out, "w") as f:
            f.write(text + "\n")


if __name__ == "__main__":
    main()
