"""Slurm and PBS clusters through dask-jobqueue, described by a :class:`JobSpec`.

Each batch job starts ``processes`` Dask worker processes (one per GPU when GPUs are requested, else one),
each running one task at a time (``--nthreads 1``) with ``cores // processes`` torch/OpenMP threads.
"""

from __future__ import annotations

import json
import re
from dataclasses import asdict, dataclass, field, fields
from typing import Any

from ..errors import ConfigError
from .env import THREAD_VARS

KINDS = ("slurm", "pbs")
_WALLTIME = re.compile(r"^(\d+-)?\d{1,3}(:\d{2}){0,2}$")


@dataclass
class JobSpec:
    """What each batch job asks the scheduler for, and how many jobs to run."""

    kind: str = "slurm"
    jobs: int = 1
    cores: int = 1
    memory: str = "4GB"
    walltime: str = "01:00:00"
    gpus: int = 0
    processes: int | None = None
    queue: str | None = None
    account: str | None = None
    python: str | None = None
    interface: str | None = None
    local_directory: str | None = None
    log_directory: str | None = None
    job_name: str = "cai-worker"
    job_extra: list[str] = field(default_factory=list)
    prologue: list[str] = field(default_factory=list)
    dashboard_address: str = ":8787"

    def __post_init__(self) -> None:
        self.validate()

    def validate(self) -> "JobSpec":
        """Check every field; raise ConfigError naming the field and the reason."""
        if self.kind not in KINDS:
            raise ConfigError(f"cluster: kind must be one of {', '.join(KINDS)}, got {self.kind!r}")
        for name in ("jobs", "cores"):
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, int) or value < 1:
                raise ConfigError(f"cluster: {name} must be a positive integer, got {value!r}")
        if isinstance(self.gpus, bool) or not isinstance(self.gpus, int) or self.gpus < 0:
            raise ConfigError(f"cluster: gpus must be a non-negative integer, got {self.gpus!r}")
        procs = self.worker_processes
        if isinstance(procs, bool) or not isinstance(procs, int) or procs < 1:
            raise ConfigError(f"cluster: processes must be a positive integer, got {self.processes!r}")
        if procs > self.cores:
            raise ConfigError(f"cluster: processes ({procs}) cannot exceed cores ({self.cores}); "
                              "each worker process needs at least one core")
        try:
            from dask.utils import parse_bytes

            if parse_bytes(str(self.memory)) <= 0:
                raise ValueError("not positive")
        except (ValueError, TypeError) as exc:
            raise ConfigError(f"cluster: memory must be a size such as '16GB', got {self.memory!r} ({exc})") from None
        if not _WALLTIME.match(str(self.walltime)):
            raise ConfigError(f"cluster: walltime must look like HH:MM:SS or D-HH:MM:SS, got {self.walltime!r}")
        for name in ("job_extra", "prologue"):
            value = getattr(self, name)
            if not isinstance(value, list) or not all(isinstance(v, str) for v in value):
                raise ConfigError(f"cluster: {name} must be a list of strings, got {value!r}")
        return self

    @property
    def worker_processes(self) -> int:
        """Worker processes per job: the given number, else one per GPU, else one."""
        if self.processes is not None:
            return self.processes
        return self.gpus if self.gpus > 0 else 1

    @property
    def threads_per_process(self) -> int:
        """Torch/OpenMP threads for each worker process."""
        return max(1, self.cores // self.worker_processes)

    def cluster_kwargs(self) -> dict[str, Any]:
        """Keyword arguments for ``SLURMCluster`` / ``PBSCluster``."""
        threads = self.threads_per_process
        extra_args = ["--resources", "GPU=1"] if self.gpus else []
        prologue = [f"export {var}={threads}" for var in THREAD_VARS]
        # dask-jobqueue gives each worker process cores/processes task slots; we want one task per process
        # (each task uses `threads` cores), so it sees `processes` cores and the job asks for `cores`.
        kwargs: dict[str, Any] = dict(
            cores=self.worker_processes, processes=self.worker_processes, memory=str(self.memory),
            walltime=str(self.walltime), queue=self.queue, account=self.account, job_name=self.job_name,
            worker_extra_args=extra_args, job_script_prologue=prologue + list(self.prologue),
            job_extra_directives=list(self.job_extra),
            scheduler_options={"dashboard_address": self.dashboard_address},
        )
        if self.kind == "slurm":
            kwargs["job_cpu"] = self.cores
            if self.gpus:
                kwargs["job_extra_directives"] = [f"--gres=gpu:{self.gpus}"] + kwargs["job_extra_directives"]
        if self.kind == "pbs":
            from dask.utils import parse_bytes
            from dask_jobqueue.pbs import pbs_format_bytes_ceil

            spec = f"select=1:ncpus={self.cores}:mem={pbs_format_bytes_ceil(parse_bytes(str(self.memory)))}"
            kwargs["resource_spec"] = spec + (f":ngpus={self.gpus}" if self.gpus else "")
        for name in ("python", "interface", "local_directory", "log_directory"):
            if getattr(self, name):
                kwargs[name] = getattr(self, name)
        return kwargs

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


def spec_from_mapping(data: dict[str, Any], source: str = "cluster config") -> JobSpec:
    """A JobSpec from a mapping (a parsed YAML/JSON file); unknown keys are refused by name."""
    if not isinstance(data, dict):
        raise ConfigError(f"{source}: expected a mapping of cluster options, got {type(data).__name__}")
    known = {f.name for f in fields(JobSpec)}
    data = {k.replace("-", "_"): v for k, v in data.items()}
    if "cluster" in data and "kind" not in data:
        data["kind"] = data.pop("cluster")
    if "gpus_per_job" in data:  # the long name of `gpus`, as on the command line (--gpus-per-job)
        per_job = data.pop("gpus_per_job")
        if "gpus" in data and data["gpus"] != per_job:
            raise ConfigError(f"{source}: gpus ({data['gpus']!r}) and gpus_per_job ({per_job!r}) disagree; "
                              "give one of them")
        data["gpus"] = per_job
    unknown = sorted(set(data) - known - {"run"})
    if unknown:
        raise ConfigError(f"{source}: unknown cluster option(s) {', '.join(unknown)}; "
                          f"known: {', '.join(sorted(known | {'run'}))}")
    return JobSpec(**{k: v for k, v in data.items() if k != "run"})


def load_cluster_file(path: str) -> dict[str, Any]:
    """Parse a YAML or JSON cluster file (local path or URL) into a mapping."""
    from .. import storage

    text = storage.read_bytes(path).decode("utf-8", errors="replace")  # StorageError names a missing file
    import yaml

    kind = "JSON" if path.endswith(".json") else "YAML"
    try:
        data = json.loads(text) if kind == "JSON" else yaml.safe_load(text)
    except (ValueError, yaml.YAMLError) as exc:
        raise ConfigError(f"{path}: not valid {kind}: {exc}") from None
    if not isinstance(data, dict):
        raise ConfigError(f"{path}: expected a mapping of cluster options at the top level")
    return data


def _classes(kind: str) -> tuple[Any, Any]:
    if kind == "slurm":
        from dask_jobqueue import SLURMCluster
        from dask_jobqueue.slurm import SLURMJob

        return SLURMCluster, SLURMJob
    from dask_jobqueue import PBSCluster
    from dask_jobqueue.pbs import PBSJob

    return PBSCluster, PBSJob


def make_cluster(spec: JobSpec) -> Any:
    """Build (but do not scale) the dask-jobqueue cluster for ``spec``; its scheduler runs in this process."""
    spec.validate()
    cluster_cls, _ = _classes(spec.kind)
    return cluster_cls(**spec.cluster_kwargs())


def job_script(spec: JobSpec, scheduler: str = "tcp://SCHEDULER-ADDRESS:8786") -> str:
    """The batch script each job of ``spec`` runs, rendered without starting a scheduler or submitting.

    The real script carries the scheduler address of the run (this machine) instead of ``scheduler``.
    """
    spec.validate()
    _, job_cls = _classes(spec.kind)
    kwargs = spec.cluster_kwargs()
    kwargs.pop("scheduler_options")
    return job_cls(scheduler=scheduler, name="dummy-name", **kwargs).job_script()
