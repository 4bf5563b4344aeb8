"""The pure core: quorums, the planner, errors, dtypes and units.

Imports neither torch, dask, distributed nor zarr: planning a job is
arithmetic, and ``cqsa plan`` answers without loading the engine.
"""
