"""Exact attention analytics of a finished job: what each key receives, how spread each query is.

A second pass over the job's quorum tasks (every pair of groups once, under
the same budget), using the job's stored lse (docs/analysis.md)::

    spec.py     pure: resolution, column producers, the task memory model
    pairs.py    the math of one (query group, key group) pair (kernels)
    layout.py   the arrays under STORE/analysis
    tasks.py    what the workers run: analysis task, reductions
    graph.py    the Dask graph
    api.py      analyze()
    plot.py     key mass, entropy and the block map as a PNG (matplotlib)
"""
