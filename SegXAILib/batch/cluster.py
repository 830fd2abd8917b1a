"""Where a batch runs: a Dask cluster on this machine, an existing scheduler, or SLURM / PBS / SGE.

SegXAI runs on Dask (``dask.distributed``, ``dask-jobqueue``), never a scheduler of its own:

* ``local``: :class:`distributed.LocalCluster` bound to 127.0.0.1 (scheduler, workers and the
  dashboard), one process per worker, one Dask thread each (one case at a time: attribution
  methods hook the network, so two cases must never share a worker's model at once);
* ``gpus``: one worker process per visible GPU, each with its ``CUDA_VISIBLE_DEVICES``
  (a :class:`distributed.SpecCluster` of nannies, each with its own environment; what dask-cuda's
  ``LocalCUDACluster`` does, with distributed alone);
* an existing scheduler: ``tcp://host:8786``;
* ``slurm`` / ``pbs`` / ``sge``: dask-jobqueue, one batch job per worker, each job booking
  ``cores`` CPUs (the case's torch threads), ``memory``, ``walltime``, a ``queue`` / partition
  and, with ``gpus``, one GPU. :func:`job_script` shows the job script without starting anything.
"""

from __future__ import annotations

import logging
import os
from contextlib import contextmanager
from dataclasses import dataclass, field
from typing import Any, Iterator, Optional, Sequence

from ..image import SegXAIInputError

__all__ = ["JobOptions", "CLUSTER_KINDS", "visible_gpus", "local_cluster", "jobqueue_kwargs", "job_script",
           "start_cluster", "connect"]

CLUSTER_KINDS = ("local", "slurm", "pbs", "sge")
_JOBQUEUE = {"slurm": ("dask_jobqueue", "SLURMCluster", "dask_jobqueue.slurm", "SLURMJob"),
             "pbs": ("dask_jobqueue", "PBSCluster", "dask_jobqueue.pbs", "PBSJob"),
             "sge": ("dask_jobqueue", "SGECluster", "dask_jobqueue.sge", "SGEJob")}


@dataclass(frozen=True)
class JobOptions:
    """What each worker job of a SLURM / PBS / SGE cluster books.

    Attributes
    ----------
    cores : int
        CPUs per job: the torch threads of its one worker (which runs one case at a time).
    memory : str
        Memory per job (``"16GB"``), also the worker's memory limit.
    walltime : str or None
        ``HH:MM:SS``.
    queue : str or None
        The queue (PBS, SGE) or partition (SLURM).
    account : str or None
        The account / project charged (SLURM, PBS).
    gpus : bool
        One GPU per job (SLURM ``--gres=gpu:1``, PBS ``ngpus=1``, SGE ``-l gpu=1``).
    job_extra : tuple of str
        More directives, as the scheduler writes them (``--constraint=a100``, ``-pe smp 4``).
    interface : str or None
        The network interface the scheduler and workers talk on (``ib0``).
    """

    cores: int = 1
    memory: str = "8GB"
    walltime: Optional[str] = None
    queue: Optional[str] = None
    account: Optional[str] = None
    gpus: bool = False
    job_extra: tuple[str, ...] = field(default_factory=tuple)
    interface: Optional[str] = None

    def __post_init__(self) -> None:
        from dask.utils import parse_bytes

        if int(self.cores) < 1:
            raise SegXAIInputError(f"cores {self.cores}: must be >= 1")
        try:
            if parse_bytes(self.memory) <= 0:
                raise ValueError("not positive")
        except (ValueError, TypeError):
            raise SegXAIInputError(f"memory {self.memory!r}: expected a size such as 16GB") from None
        if self.walltime is not None and not all(part.isdigit() for part in self.walltime.split(":")):
            raise SegXAIInputError(f"walltime {self.walltime!r}: expected HH:MM:SS")


def visible_gpus() -> list[str]:
    """The GPUs this process may use: ``CUDA_VISIBLE_DEVICES``'s entries when set, else one per
    device torch counts (``"0"``, ``"1"``, ...)."""
    listed = os.environ.get("CUDA_VISIBLE_DEVICES")
    if listed is not None:
        return [entry.strip() for entry in listed.split(",") if entry.strip() and entry.strip() != "-1"]
    import torch

    return [str(index) for index in range(torch.cuda.device_count())]


def local_cluster(workers: int = 1, gpus: Optional[Sequence[str]] = None, quiet: bool = True):
    """A cluster on this machine bound to 127.0.0.1 (dashboard on a free port).

    Parameters
    ----------
    workers : int
        Worker processes (ignored with ``gpus``).
    gpus : sequence of str, optional
        One worker per entry, with ``CUDA_VISIBLE_DEVICES`` set to it (its only GPU is then
        ``cuda:0``).
    """
    from distributed import LocalCluster, Nanny, Scheduler, SpecCluster

    silence = logging.ERROR if quiet else logging.WARNING
    if not gpus:
        if int(workers) < 1:
            raise SegXAIInputError(f"workers {workers}: must be >= 1 for a cluster")
        return LocalCluster(n_workers=int(workers), threads_per_worker=1, processes=True, host="127.0.0.1",
                            dashboard_address="127.0.0.1:0", silence_logs=silence)
    scheduler = {"cls": Scheduler, "options": {"host": "127.0.0.1", "dashboard_address": "127.0.0.1:0"}}
    # a nanny's env reaches its worker process before torch starts: CUDA sees the one GPU
    specs = {f"gpu-{gpu}": {"cls": Nanny, "options": {"nthreads": 1, "host": "127.0.0.1", "silence_logs": silence,
                                                      "env": {"CUDA_VISIBLE_DEVICES": str(gpu)}}}
             for gpu in gpus}
    return SpecCluster(workers=specs, scheduler=scheduler, silence_logs=silence, name="segxai-gpus")


def jobqueue_kwargs(kind: str, options: JobOptions) -> dict[str, Any]:
    """The keyword arguments of dask-jobqueue's cluster (and job) class for ``kind``.

    Each job runs one worker with one Dask thread (``cores=1`` to dask-jobqueue) and books
    ``options.cores`` CPUs for its torch threads (``OMP_NUM_THREADS`` set in the job)."""
    from dask.utils import parse_bytes

    if kind not in _JOBQUEUE:
        raise SegXAIInputError(f"cluster {kind!r}: expected one of {list(_JOBQUEUE)}")
    extra = list(options.job_extra)
    kwargs: dict[str, Any] = {
        "cores": 1, "processes": 1, "memory": options.memory, "walltime": options.walltime, "queue": options.queue,
        "job_name": "segxai-worker", "interface": options.interface,
        "job_script_prologue": [f"export OMP_NUM_THREADS={int(options.cores)}",
                                f"export MKL_NUM_THREADS={int(options.cores)}"],
    }
    if kind == "slurm":
        kwargs.update(job_cpu=int(options.cores), account=options.account)
        if options.gpus:
            extra.append("--gres=gpu:1")
    elif kind == "pbs":
        from dask_jobqueue.pbs import pbs_format_bytes_ceil

        spec = f"select=1:ncpus={int(options.cores)}:mem={pbs_format_bytes_ceil(parse_bytes(options.memory))}"
        kwargs.update(resource_spec=spec + (":ngpus=1" if options.gpus else ""), account=options.account)
    else:  # sge: CPU booking is a site's parallel environment (-pe NAME N): give it in job_extra
        if options.account:
            kwargs["project"] = options.account
        if options.gpus:
            kwargs["resource_spec"] = "gpu=1"
    kwargs["job_extra_directives"] = extra
    return {k: v for k, v in kwargs.items() if v is not None}


def job_script(kind: str, options: JobOptions, scheduler: str = "tcp://scheduler:8786") -> str:
    """The job script one worker of a ``kind`` cluster would be submitted with (no scheduler is
    started: the job class is built with a given scheduler address)."""
    import importlib

    _, _, module, job_class = _JOBQUEUE.get(kind, ("", "", "", ""))
    if not module:
        raise SegXAIInputError(f"cluster {kind!r}: expected one of {list(_JOBQUEUE)}")
    job = getattr(importlib.import_module(module), job_class)
    return job(scheduler=scheduler, name="segxai-worker", **jobqueue_kwargs(kind, options)).job_script()


def start_cluster(kind: str, workers: int, options: JobOptions):
    """A dask-jobqueue cluster of ``kind`` asking for ``workers`` jobs (one worker each)."""
    import importlib

    module, cluster_class, _, _ = _JOBQUEUE[kind]
    cluster = getattr(importlib.import_module(module), cluster_class)(**jobqueue_kwargs(kind, options))
    cluster.scale(jobs=int(workers))
    return cluster


@contextmanager
def connect(scheduler: Optional[str] = None, cluster: str = "local", workers: int = 1, gpus: bool = False,
            options: Optional[JobOptions] = None, quiet: bool = True) -> Iterator[tuple[Any, dict[str, Any]]]:
    """A :class:`distributed.Client` (and a description for ``batch.json``) for the duration of
    the block; the cluster it started is closed at the end, its processes with it.

    Parameters
    ----------
    scheduler : str, optional
        An existing scheduler's address; nothing is started.
    cluster : str
        ``local``, ``slurm``, ``pbs`` or ``sge`` (without ``scheduler``).
    workers : int
        Worker processes (local) or jobs (slurm / pbs / sge).
    gpus : bool
        Local: one worker per visible GPU (at most ``workers`` when given > 0); job queues: a
        GPU per job.
    options : JobOptions, optional
        The job queues' booking (and ``cores``: each worker's torch threads).
    """
    from distributed import Client

    options = options or JobOptions(gpus=gpus)
    made = None
    info: dict[str, Any]
    if scheduler:
        info = {"kind": "scheduler", "address": scheduler}
        try:
            client = Client(scheduler, timeout="20s")
        except (OSError, TimeoutError) as error:
            raise SegXAIInputError(f"scheduler {scheduler}: cannot connect ({error})") from None
    elif cluster == "local":
        chosen = None
        if gpus:
            chosen = visible_gpus()
            if not chosen:
                raise SegXAIInputError("gpus: no GPU is visible here (CUDA_VISIBLE_DEVICES, torch.cuda)")
            chosen = chosen[:workers] if workers and workers > 0 else chosen
        made = local_cluster(workers, chosen, quiet)
        info = {"kind": "local", "workers": len(chosen) if chosen else int(workers), "gpus": chosen or []}
        client = Client(made)
    elif cluster in _JOBQUEUE:
        made = start_cluster(cluster, workers, options)
        info = {"kind": cluster, "jobs": int(workers), "job_script": made.job_script()}
        client = Client(made)
    else:
        raise SegXAIInputError(f"cluster {cluster!r}: expected one of {list(CLUSTER_KINDS)}")
    try:
        yield client, info
    finally:
        client.close()
        if made is not None:
            made.close()
