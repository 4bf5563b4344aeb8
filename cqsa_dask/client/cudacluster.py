"""dask-cuda's LocalCUDACluster as the local cluster's "dask-cuda" backend (``client.local``).

Imported only when that backend is chosen: ``dask_cuda`` is an optional extra
(``pip install 'cqsa-dask[cuda]'``).  LocalCUDACluster gives each worker an
environment of ``CUDA_VISIBLE_DEVICES`` alone (its ``new_worker_spec``
replaces the ``env`` it was given), which would drop the environment cqsa
gives its workers (``execution.process.worker_env``: the CUDA allocator's
setting, which must hold before torch starts).  :class:`CUDACluster` puts it
back beside the device list; nothing else differs from LocalCUDACluster.
"""

from __future__ import annotations

from typing import Any

from dask_cuda import LocalCUDACluster

__all__ = ["CUDACluster"]


class CUDACluster(LocalCUDACluster):
    """LocalCUDACluster whose workers also get the ``env`` it was constructed with."""

    def new_worker_spec(self) -> dict[Any, Any]:
        (name, spec), = super().new_worker_spec().items()
        given = self.new_spec["options"].get("env") or {}
        options = {**spec["options"], "env": {**given, **spec["options"]["env"]}}  # the device list wins
        return {name: {**spec, "options": options}}
