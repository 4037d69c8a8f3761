"""Where the nodes run: Prefect's thread pool (this machine, one workspace), or a Dask or Ray cluster (workers with
their own workspaces), and how a node claims GPUs there.

    engine="local"                    threads here; every node runs in the project directory
    engine="dask", address=None       a temporary local Dask cluster of `workers` processes (one GPU each if gpus>0)
    engine="dask", address="tcp://h:8786"    an existing Dask cluster (start GPU workers with --resources GPU=1)
    engine="ray",  address=None|"auto"|"ray://h:10001"    a temporary local Ray, or an existing cluster
"""
from __future__ import annotations

import os
from contextlib import contextmanager
from typing import Iterator, Literal

from prefect.task_runners import TaskRunner, ThreadPoolTaskRunner

Engine = Literal["local", "dask", "ray"]
GPU = "GPU"  # the Dask worker resource a GPU node claims


def local_dask_cluster(workers: int = 2, gpus: int = 0, threads: int | None = None):
    """A Dask cluster on this host: `workers` worker processes, one task at a time each, whose stage subprocesses
    share the cores (Dask's default would give each one thread). With gpus > 0, worker i sees only its own GPUs
    (CUDA_VISIBLE_DEVICES) and offers them as the resource GPU, as dask-cuda's LocalCUDACluster does."""
    from distributed import LocalCluster, Nanny, Scheduler, SpecCluster

    env = {"OMP_NUM_THREADS": str(threads or _share(workers))}
    if not gpus:
        return LocalCluster(n_workers=workers, threads_per_worker=1, processes=True, dashboard_address=None, env=env)
    per = max(1, gpus // workers)
    spec = {i: {"cls": Nanny, "options": {"nthreads": 1, "resources": {GPU: per}, "env": {
        **env, "CUDA_VISIBLE_DEVICES": ",".join(str(i * per + j) for j in range(per))}}} for i in range(workers)}
    return SpecCluster(workers=spec, scheduler={"cls": Scheduler, "options": {"dashboard_address": None}})


def _share(workers: int) -> int:
    return max(1, (os.cpu_count() or 1) // workers)


def task_runner(engine: Engine, address: str | None = None, workers: int = 2, gpus: int = 0,
                threads: int | None = None) -> TaskRunner:
    if engine == "local":
        return ThreadPoolTaskRunner(max_workers=workers)
    if engine == "dask":
        from prefect_dask import DaskTaskRunner

        if address:
            return DaskTaskRunner(address=address)
        return DaskTaskRunner(cluster_class=local_dask_cluster,
                              cluster_kwargs={"workers": workers, "gpus": gpus, "threads": threads})
    if engine == "ray":
        from prefect_ray import RayTaskRunner

        if address:
            return RayTaskRunner(address=address)
        # a task reserves one CPU (Ray's default), so `workers` nodes run at once, sharing the cores
        return RayTaskRunner(init_kwargs={"num_cpus": workers, "num_gpus": gpus, "include_dashboard": False,
                                          "runtime_env": {"env_vars": {"OMP_NUM_THREADS": str(threads or _share(workers))}}})
    raise ValueError(f"engine: {engine!r}; one of local, dask, ray")


@contextmanager
def claim(engine: Engine, gpus: float) -> Iterator[None]:
    """Tasks submitted inside this block each claim `gpus` GPUs from the cluster's scheduler."""
    if not gpus or engine == "local":
        yield
    elif engine == "dask":
        import dask

        with dask.annotate(resources={GPU: gpus}):
            yield
    else:
        from prefect_ray.context import remote_options

        with remote_options(num_gpus=gpus):
            yield
