"""Slurm and PBS clusters through dask-jobqueue, described by a :class:`JobSpec`.

Each batch job starts ``processes`` Dask worker processes (one per GPU when GPUs are requested, else one),
each running one task at a time (``--nthreads 1``) with ``cores // processes`` torch/OpenMP threads.

Submission is checked, not assumed: :func:`make_cluster` returns a cluster whose jobs report what the scheduler
answered (:class:`Submissions`); :meth:`Submissions.wait` returns the job ids once every job was accepted, or
cancels the accepted ones and raises :class:`SubmitError` with the scheduler's own message. Each ``sbatch`` /
``qsub`` call is bounded by ``submit_timeout`` seconds.
"""

from __future__ import annotations

import asyncio
import json
import re
import shlex
import shutil
import subprocess
import threading
import time
import weakref
from dataclasses import asdict, dataclass, field, fields
from typing import Any

from ..errors import CaiError, ConfigError
from ..backends.env import THREAD_VARS

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
    submit_timeout: float = 60.0

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
        timeout = self.submit_timeout
        if isinstance(timeout, bool) or not isinstance(timeout, (int, float)) or not 0 < timeout <= 3600:
            raise ConfigError(f"cluster: submit_timeout must be seconds in (0, 3600], got {timeout!r}")
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


class SubmitError(CaiError):
    """The batch system refused (or did not answer) a job submission; the message carries its own words."""


#: Seconds allowed to the cancel command (scancel/qdel) of the jobs already accepted when another was refused.
CANCEL_TIMEOUT_S = 30.0


def _one_line(text: str, limit: int = 400) -> str:
    line = "; ".join(part.strip() for part in text.splitlines() if part.strip())
    return line if len(line) <= limit else line[:limit - 3] + "..."


class Submissions:
    """What the batch system answered to each job of a cluster (written by the jobs on the cluster's event loop,
    read by the command through :meth:`wait`)."""

    def __init__(self, kind: str, expected: int, submit_command: str, cancel_command: str) -> None:
        self.kind, self.expected = kind, expected
        self.submit_command, self.cancel_command = submit_command, cancel_command
        self.ids: list[str] = []
        self.errors: list[str] = []
        self._jobs: weakref.WeakSet = weakref.WeakSet()  # weak: the cluster asserts closed jobs are gone
        self._cond = threading.Condition()

    def accepted(self, job: Any) -> None:
        with self._cond:
            self.ids.append(str(job.job_id))
            self._jobs.add(job)
            self._cond.notify_all()

    def refused(self, message: str) -> None:
        with self._cond:
            self.errors.append(message)
            self._cond.notify_all()

    def wait(self, timeout: float) -> list[str]:
        """The accepted job ids once all ``expected`` jobs were answered; otherwise (a refusal, or no answer within
        ``timeout`` s) the accepted jobs are cancelled and :class:`SubmitError` raised, on one line."""
        deadline = time.monotonic() + timeout
        with self._cond:
            while len(self.ids) + len(self.errors) < self.expected:
                left = deadline - time.monotonic()
                if left <= 0:
                    break
                self._cond.wait(min(left, 0.5))
            ids, errors = list(self.ids), list(self.errors)
        if not errors and len(ids) == self.expected:
            return ids
        answered = len(ids) + len(errors)
        what = errors[0] if errors else (f"{self.submit_command} answered {answered} of {self.expected} "
                                         f"submission(s) within {timeout:g} s")
        raise SubmitError(f"cai cluster {self.kind}: {what}{self._refused_count(errors)}; {self.cancel()}; check "
                          "the job options (--account, --queue, --memory, --walltime; --dry-run prints the script)")

    def _refused_count(self, errors: list[str]) -> str:
        return f" ({len(errors)} of {self.expected} job(s) refused)" if self.expected > 1 else ""

    def cancel(self) -> str:
        """Cancel every accepted job (one ``scancel``/``qdel`` call, bounded); says what was done."""
        with self._cond:
            ids, jobs = list(self.ids), list(self._jobs)
        if not ids:
            return "no job was submitted"
        cmd = shlex.split(self.cancel_command) + ids
        try:
            done = subprocess.run(cmd, capture_output=True, text=True, timeout=CANCEL_TIMEOUT_S)
            failed = _one_line(done.stderr) if done.returncode else ""
        except (OSError, subprocess.TimeoutExpired) as exc:
            failed = str(exc)
        for job in jobs:  # cancelled here: closing the cluster must not cancel them again
            job.job_id = None
        listed = ", ".join(ids)
        if failed:
            return (f"cancelling the {len(ids)} job(s) already submitted ({listed}) failed ({failed}): "
                    "cancel them by hand")
        return f"cancelled the {len(ids)} job(s) already submitted ({listed})"


def _tracked_job_class(base: Any, submissions: Submissions, timeout: float) -> Any:
    """``base`` (SLURMJob / PBSJob) whose submission is bounded by ``timeout`` s and reported to ``submissions``;
    a refused job ends as ``failed`` instead of raising inside the cluster's event loop (where the message would
    only be logged, with a traceback, and the run would wait for workers that never come)."""
    from distributed.core import Status

    class TrackedJob(base):  # type: ignore[misc, valid-type]
        async def _submit_job(self, script_filename: str) -> str:
            cmd = shlex.split(self.submit_command) + [script_filename]
            try:
                proc = await asyncio.create_subprocess_exec(*cmd, stdout=asyncio.subprocess.PIPE,
                                                            stderr=asyncio.subprocess.PIPE)
            except OSError as exc:
                raise SubmitError(f"cannot run {cmd[0]} ({exc.strerror or exc})") from None
            try:
                out, err = await asyncio.wait_for(proc.communicate(), timeout)
            except asyncio.TimeoutError:
                proc.kill()
                await proc.wait()
                raise SubmitError(f"{cmd[0]} did not answer within {timeout:g} s (is the batch system "
                                  "reachable? submit_timeout sets the limit)") from None
            if proc.returncode:
                said = _one_line(err.decode(errors="replace") or out.decode(errors="replace")) or "(no message)"
                raise SubmitError(f"{cmd[0]} refused the job (exit status {proc.returncode}): {said}")
            return out.decode(errors="replace")

        def __await__(self) -> Any:
            async def _start() -> Any:
                async with self.lock:
                    if self.status == Status.created:
                        try:
                            await self.start()
                        except Exception as exc:  # noqa: BLE001 - reported to the command, which names it
                            self.status = Status.failed
                            submissions.refused(_one_line(str(exc)) or type(exc).__name__)
                        else:
                            submissions.accepted(self)
                return self

            return _start().__await__()

    TrackedJob.__name__ = TrackedJob.__qualname__ = f"Tracked{base.__name__}"
    return TrackedJob


def check_submit_command(spec: JobSpec) -> None:
    """ConfigError (before anything starts) when the batch system's submit command is not on PATH here."""
    _, job_cls = _classes(spec.kind)
    name = shlex.split(job_cls.submit_command)[0]
    if shutil.which(name) is None:
        raise ConfigError(f"cai cluster {spec.kind}: {name} was not found on PATH; run this on a login node of the "
                          f"{spec.kind.upper()} cluster (where `{name}` works), or load its module first")


def make_cluster(spec: JobSpec) -> Any:
    """Build (but do not scale) the dask-jobqueue cluster for ``spec``; its scheduler runs in this process.

    ``cluster.cai_submissions`` (a :class:`Submissions` expecting ``spec.jobs`` answers) reports how the batch
    system answered each submission once the cluster is scaled."""
    spec.validate()
    cluster_cls, job_cls = _classes(spec.kind)
    submissions = Submissions(spec.kind, spec.jobs, job_cls.submit_command, job_cls.cancel_command)
    cluster = cluster_cls(job_cls=_tracked_job_class(job_cls, submissions, float(spec.submit_timeout)),
                          **spec.cluster_kwargs())
    cluster.cai_submissions = submissions
    return cluster


def job_script(spec: JobSpec, scheduler: str = "tcp://SCHEDULER-ADDRESS:8786") -> str:
    """The batch script each job of ``spec`` runs, rendered without starting a scheduler or submitting.

    The real script carries the scheduler address of the run (this machine) instead of ``scheduler``.
    """
    spec.validate()
    _, job_cls = _classes(spec.kind)
    kwargs = spec.cluster_kwargs()
    kwargs.pop("scheduler_options")
    return job_cls(scheduler=scheduler, name="dummy-name", **kwargs).job_script()
