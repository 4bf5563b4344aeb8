"""Exact attention for chosen rows of a generated sequence, verified against float64.

A generated (synthetic) store holds no q, k, v: tasks generate them from a
seed (docs/synthetic.md).  The job computes only the chosen query groups'
rows against every key, then ``cqsa_dask.verify`` recomputes sampled rows
in float64 over all keys.  The default size runs in well under a minute on
a laptop CPU; on a GPU, ``--seq-len 1073741824 --budget 12GB`` is the
billion-token run of docs/benchmarks.md (about 5 minutes on an H200).

    python workflows/generated_rows.py
    python workflows/generated_rows.py --seq-len 1073741824 --budget 12GB --groups 0,-1
"""

from __future__ import annotations

import argparse
import os
import sys
import tempfile

import cqsa_dask


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--seq-len", type=int, default=65536)
    ap.add_argument("--heads", type=int, default=1)
    ap.add_argument("--head-dim", type=int, default=64)
    ap.add_argument("--dtype", default="bfloat16")
    ap.add_argument("--budget", default="8MB", help="memory budget per worker (the default forces many groups)")
    ap.add_argument("--groups", default="0,-1", help="query groups to compute (negative: from the last)")
    ap.add_argument("--seed", type=int, default=7)
    ap.add_argument("--store", default=None, help="store path (default: a new temporary directory)")
    a = ap.parse_args()
    store = a.store or os.path.join(tempfile.mkdtemp(prefix="cqsa-rows-"), "job.zarr")
    source = cqsa_dask.SyntheticSource(seq_len=a.seq_len, heads_q=a.heads, heads_kv=a.heads, head_dim=a.head_dim,
                                       dtype=a.dtype, seed=a.seed)
    cqsa_dask.create_synthetic_store(store, source)
    groups = [int(g) for g in a.groups.split(",")]
    res = cqsa_dask.run(store, memory_budget=a.budget, query_groups=groups)
    p = res.plan
    rows = sum(e - s for s, e in map(p.group_bounds, p.query_groups))
    print(f"store {store}: N={p.seq_len:,}, W={p.groups} groups of {p.group_size:,} tokens; computed query groups "
          f"{list(p.query_groups)} ({rows:,} rows x {p.seq_len:,} keys) in {res.seconds:.1f} s with "
          f"{res.quorum_tasks_run} tasks, {res.tflops:.3g} TFLOP/s, partials {p.partials}")
    check = cqsa_dask.verify(store, rows=16)
    w = check.worst
    print(f"verify: {len(check.results)} rows against float64 over all keys ({check.method}, {check.seconds:.1f} s): "
          f"{'passed' if check.passed else 'FAILED'}; worst row {w.row}: |dout| {w.abs_out:.3g}, |dlse| {w.abs_lse:.3g}")
    return 0 if check.passed else 1


if __name__ == "__main__":
    sys.exit(main())
