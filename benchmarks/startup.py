"""Where a cold worker's start-up goes, step by step, each in a fresh interpreter.

    python -m benchmarks.startup [--out FILE.json]

The cold `run()` (no client) pays, before its first task: the local cluster's start (a
nanny spawns a worker process that imports distributed), then in the worker the plugin's
set-up (importing torch and cqsa_dask, the CUDA context), then in the first task the first
cuDNN call and fresh pinned buffers.  This times each of those steps, in order, in one fresh
``python -c`` per step list (so an import measured is a cold import), and prints one JSON line.
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys

from benchmarks import environment

_STEPS = r"""
import json, time
t = time.perf_counter(); marks = {}
def mark(name):
    global t
    now = time.perf_counter(); marks[name] = round(now - t, 4); t = now
import distributed; mark("import distributed")
import torch; mark("import torch")
import cqsa_dask.execution.runtime, cqsa_dask.execution.tasks; mark("import cqsa_dask execution")
cuda = torch.cuda.is_available(); mark("cuda available")
if cuda:
    torch.cuda.init(); torch.empty(1, device="cuda"); torch.cuda.synchronize(); mark("CUDA context")
    torch.cuda.get_device_properties(0); mark("device properties")
    q = torch.randn(1, 1, 131072, 128, device="cuda", dtype=torch.bfloat16); torch.cuda.synchronize(); mark("first tensor")
    from torch.nn.attention import SDPBackend, sdpa_kernel
    with sdpa_kernel([SDPBackend.CUDNN_ATTENTION]):
        torch.nn.functional.scaled_dot_product_attention(q, q, q); torch.cuda.synchronize(); mark("first cuDNN SDPA, 128K")
        torch.nn.functional.scaled_dot_product_attention(q, q, q); torch.cuda.synchronize(); mark("second cuDNN SDPA, 128K")
    torch.empty(256 << 20, dtype=torch.uint8, pin_memory=True); mark("fresh pinned 256 MiB")
    torch.empty(256 << 20, dtype=torch.uint8, pin_memory=True); mark("pinned 256 MiB again (cached)")
print(json.dumps(marks))
"""


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--out", default=None)
    ap.add_argument("--repeat", type=int, default=2, help="fresh interpreters (the first also warms the disk cache)")
    a = ap.parse_args()
    runs = []
    for _ in range(a.repeat):
        done = subprocess.run([sys.executable, "-c", _STEPS], capture_output=True, text=True, check=True)
        runs.append(json.loads(done.stdout.strip().splitlines()[-1]))
    rec = {"date": environment.now_utc(), "hardware": environment.hardware(),
           "versions": environment.versions(), "runs": runs}
    print(json.dumps(rec), flush=True)
    if a.out:
        with open(a.out, "w") as f:
            json.dump(rec, f, indent=1)


if __name__ == "__main__":
    main()
