"""Benchmarks of cqsa_dask: declared cases, a runner writing one result file per run, a report.

    cases.py        what is measured (suites of frozen Case records)
    runner.py       measures a list of cases into benchmarks/results/<suite>-<UTC time>.json
    calls.py        how cqsa is called and timed (warm run(), cold run(), attention())
    sdpa.py         the in-memory torch SDPA baseline on the same inputs
    checks.py       float64 checks of sampled rows or the whole output
    cluster.py      the LocalCluster shaped as run() starts it, task records, NVML peaks
    environment.py  hardware, versions, git of a run
    report.py       latest result per case -> the tables and plots of docs/benchmarks.md
    bench.py        the command: python -m benchmarks.bench --suite cpu|gpu|gpu-perf|gpu-correctness

billion.py, graph_scale.py and dashboard_replay.py are stand-alone measurements
with their own records (results/billion-*.json, results/graph-scale-*.json).
"""
