"""A dask-jobqueue ``SLURMCluster`` of GPU workers for cqsa jobs.

Each SLURM job is one node's worth of GPUs (``--gres=gpu:G`` through
``job_extra_directives``) and starts one Dask worker process per GPU, each
advertising the cqsa budget as the resource ``device_mem`` (through
``worker_extra_args``)::

    this process: SLURMCluster (scheduler, --preload cqsa_dask.dashboard)
        │   cluster.scale(jobs=J)  ->  sbatch J job scripts
        ▼
    job 1 (--gres=gpu:8):  python -m dask_cuda.cli ADDR --resources device_mem=... --nthreads 3
                             └─ 8 worker processes, worker i sees only GPU i
    job 2 ...
    gpus_per_job=1:        python -m distributed.cli.dask_worker ADDR --resources device_mem=...
                             └─ 1 worker process; SLURM's CUDA_VISIBLE_DEVICES pins it

With several GPUs per job the worker command is dask-cuda's (``pip install
dask-cuda`` on the nodes): a plain ``dask worker --nworkers G`` would start G
processes that all see every GPU of the job.  With one GPU per job plain
``dask worker`` is enough.  Either way each process has ``tasks in flight + 1``
threads (3 on CUDA: two quorum tasks share the GPU, the third thread runs
merges) and a ``G``-th of the job's memory.

Usage on a login node (the client must reach the workers, and every worker
the job store)::

    python deploy/slurm.py --gpus-per-job 8 --jobs 4 --queue gpu --account ABC --print   # the job script
    python deploy/slurm.py --gpus-per-job 8 --jobs 4 --queue gpu --account ABC \\
        --store /shared/job.zarr                                                     # run a job on it
"""

from __future__ import annotations

import argparse
import sys
from typing import Any

__all__ = ["gpu_cluster", "main"]

RESOURCE = "device_mem"
DASHBOARD_PRELOAD = "cqsa_dask.dashboard"


def gpu_cluster(*, gpus_per_job: int = 8, device_mem: float = 120e9, cores_per_gpu: int = 8,
                memory_per_gpu: str = "120GB", threads_per_gpu: int = 3, walltime: str = "24:00:00",
                queue: str | None = None, account: str | None = None, python: str | None = None,
                **options: Any) -> Any:
    """A ``dask_jobqueue.SLURMCluster`` whose jobs each hold ``gpus_per_job`` GPUs.

    device_mem: bytes each worker (one GPU) advertises as the cqsa budget; leave room below
        the GPU's memory for the CUDA context and the allocator (about 120e9 on a 141 GB H200).
    cores_per_gpu / memory_per_gpu: what the job asks for per GPU (``--cpus-per-task``,
        ``--mem``); each worker's ``--memory-limit`` is its share of the job's memory.
    options: passed on to ``SLURMCluster`` (``job_script_prologue``, ``local_directory``,
        ``interface``, ``security``, ...).
    """
    from dask_jobqueue import SLURMCluster

    if gpus_per_job < 1:
        raise ValueError(f"gpus_per_job must be at least 1, got {gpus_per_job}")
    memory_gb = _gigabytes(memory_per_gpu) * gpus_per_job
    # dask-jobqueue gives each worker cores / processes threads: a cqsa GPU worker wants
    # threads_per_gpu of them (torch uses the other cores inside a task), so Dask is told the
    # threads (cores) and SLURM the CPUs (job_cpu)
    return SLURMCluster(
        cores=threads_per_gpu * gpus_per_job,
        processes=gpus_per_job,  # worker processes per job
        job_cpu=cores_per_gpu * gpus_per_job,
        memory=f"{memory_gb:g}GB",
        walltime=walltime, queue=queue, account=account,
        python=python or sys.executable,
        job_extra_directives=[f"--gres=gpu:{gpus_per_job}", *options.pop("job_extra_directives", [])],
        worker_command="distributed.cli.dask_worker" if gpus_per_job == 1 else "dask_cuda.cli",
        worker_extra_args=["--resources", f"{RESOURCE}={device_mem:g}", *options.pop("worker_extra_args", [])],
        scheduler_options={"preload": [DASHBOARD_PRELOAD], **options.pop("scheduler_options", {})},
        **options,
    )


def _gigabytes(size: str) -> float:
    from dask.utils import parse_bytes

    return parse_bytes(size) / 1e9


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description="cqsa on SLURM through dask-jobqueue")
    p.add_argument("--gpus-per-job", type=int, default=8)
    p.add_argument("--jobs", type=int, default=1, help="SLURM jobs (nodes) to start")
    p.add_argument("--device-mem", type=float, default=120e9, help="bytes each GPU worker advertises")
    p.add_argument("--cores-per-gpu", type=int, default=8)
    p.add_argument("--memory-per-gpu", default="120GB")
    p.add_argument("--walltime", default="24:00:00")
    p.add_argument("--queue")
    p.add_argument("--account")
    p.add_argument("--print", action="store_true", help="print the job script and exit")
    p.add_argument("--store", help="a job store to run on the cluster (cqsa_dask.run)")
    a = p.parse_args(argv)
    with gpu_cluster(gpus_per_job=a.gpus_per_job, device_mem=a.device_mem, cores_per_gpu=a.cores_per_gpu,
                     memory_per_gpu=a.memory_per_gpu, walltime=a.walltime, queue=a.queue,
                     account=a.account) as cluster:
        if a.print or not a.store:
            print(cluster.job_script())
            return 0
        from distributed import Client

        import cqsa_dask

        cluster.scale(jobs=a.jobs)
        with Client(cluster) as client:
            client.wait_for_workers(a.gpus_per_job)
            result = cqsa_dask.run(a.store, client=client)
        print(f"{result.quorum_tasks_run} tasks in {result.seconds:.0f} s")
    return 0


if __name__ == "__main__":
    sys.exit(main())
