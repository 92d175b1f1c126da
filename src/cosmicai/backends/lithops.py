"""The Lithops backend: one Lithops function call per rank, on any compute backend Lithops supports.

``LithopsBackend`` maps the run's tasks with a ``lithops.FunctionExecutor``: each call runs ``fn(**task)`` (the
pipeline's ``run_task``) in a Lithops worker, which reads the data and writes the rank's outputs through the same
storage URLs as every other backend. Lithops' own storage (``storage``) carries only the calls' arguments,
statuses and return values; it is cleaned when the map ends.

* ``backend="localhost"`` (default, unless ``config`` names another): calls run in processes on this machine,
  ``workers`` at a time, with this interpreter (``runtime`` defaults to ``sys.executable``). No account needed.
* ``backend="aws_lambda"``, ``"gcp_cloudrun"``, ``"gcp_functions"``, ``"azure_functions"``, ``"k8s"``, ...:
  the Lithops configuration (``config``: a dict or the path of a Lithops config file, else Lithops' usual
  lookup) names the account, the runtime image (which must have ``cosmicai[worker]`` installed) and the
  storage; ``workers`` caps the concurrent calls (``max_workers``). See docs/lithops.md.

Task timeouts use Lithops' own: each group of tasks with the same limit is one ``map`` with ``timeout=limit``;
the Lithops worker kills a call past it and reports it, which is yielded as a :class:`TaskTimeoutError`. The
S3 client settings (``storage.S3_CLIENT_VARS``) and the thread counts reach the workers as environment variables.
"""

from __future__ import annotations

import atexit
import logging
import math
import os
import sys
import time
from typing import Any, Callable, Iterator

from ..errors import ConfigError
from ..storage import S3_CLIENT_VARS
from .base import TaskTimeoutError, TaskTimeouts
from .env import THREAD_VARS

INSTALL_HINT = "pip install 'cosmicai[lithops]'"
#: How often the client polls Lithops for finished calls, in seconds: its storage on this machine, elsewhere.
POLL_S = 0.2
REMOTE_POLL_S = 1.0
#: After a localhost job's worker processes have all exited, how long a call of it may still take to report.
LOST_GRACE_S = 3.0
#: How long past its timeout a call seen running elsewhere may take to report before it is taken as lost.
REMOTE_GRACE_S = 120.0
#: Where Lithops keeps a job's temporary objects in its storage bucket (``lithops.constants.JOBS_PREFIX``).
JOBS_PREFIX = "lithops.jobs"
#: The message Lithops' worker gives a call it killed at its ``timeout``.
LITHOPS_TIMEOUT_TEXT = "exceeded maximum time"


def _lithops() -> Any:
    """The lithops package, or a one-line ConfigError saying how to install it."""
    try:
        import lithops
    except ModuleNotFoundError as exc:
        if (exc.name or "").split(".")[0] != "lithops":
            raise ConfigError(f"backend 'lithops': the lithops package cannot load ({exc}); reinstall it with "
                              f"{INSTALL_HINT}") from exc
        raise ConfigError(f"backend 'lithops' needs the lithops package, which is not installed: {INSTALL_HINT}"
                          ) from exc
    return lithops


def _call(task: dict, fn: Callable[..., dict], threads: int | None = None) -> dict:
    """In a Lithops worker: set the model threads, then run one task."""
    if threads:
        from ..models.worker import worker_models

        worker_models().configure(threads)
    return fn(**task)


class _LostCalls:
    """Finds calls that will never report: on localhost, those whose job's worker processes have all exited
    without a result for them; elsewhere, those seen running for longer than their timeout plus a grace (the
    Lithops worker kills a call at its timeout, so no result by then means the worker itself was lost)."""

    def __init__(self, executor: Any):
        self.executor = executor
        self.execution_timeout = float((executor.config.get("lithops") or {}).get("execution_timeout") or 1800)
        self.running_since: dict[Any, float] = {}
        self.ended_at: dict[str, float] = {}

    def lost(self, pending: dict[Any, tuple[dict, int | None, float]], backend: str
             ) -> list[tuple[Any, BaseException]]:
        now = time.monotonic()
        jobs = getattr(getattr(self.executor.compute_handler, "env", None), "jobs", None) or {}
        out: list[tuple[Any, BaseException]] = []
        for fut, (task, limit, _) in pending.items():
            latch = jobs.get(fut.job_key)
            if latch is not None and latch.done:  # localhost: every worker process of this job has exited
                ended = self.ended_at.setdefault(fut.job_key, now)
                if now - ended > LOST_GRACE_S:
                    from lithops.constants import RN_LOG_FILE

                    out.append((fut, RuntimeError(
                        f"{_name(task)}: its Lithops localhost worker process exited without a result "
                        f"(call {fut.call_id}); see the errors above and Lithops' log {RN_LOG_FILE}")))
                continue
            if fut.running:
                since = self.running_since.setdefault(fut, now)
                allowed = (limit or self.execution_timeout) + REMOTE_GRACE_S
                if now - since > allowed:
                    out.append((fut, TaskTimeoutError(
                        f"{_name(task)}: its Lithops {backend} call {fut.call_id} has run for more than "
                        f"{allowed:.0f} s without a result (its worker was lost); a rerun resumes it")))
        return out


def _configured_backend(config: dict | None, config_file: str | None) -> str | None:
    """The compute backend a Lithops config (a dict, or a YAML file) names under ``lithops.backend``."""
    if config_file is not None:
        import yaml

        try:
            with open(config_file) as fh:
                config = yaml.safe_load(fh)
        except (OSError, yaml.YAMLError) as exc:
            raise ConfigError(f"lithops backend: cannot read the config file {config_file}: {exc}".splitlines()[0]
                              ) from exc
    section = config.get("lithops") if isinstance(config, dict) else None
    return section.get("backend") if isinstance(section, dict) else None


def _name(task: Any) -> str:
    return f"rank {task['rank']}" if isinstance(task, dict) and "rank" in task else "a task"


def _positive(field: str, value: Any) -> int | None:
    if value is not None and (not isinstance(value, int) or isinstance(value, bool) or value < 1):
        raise ConfigError(f"lithops backend: {field} must be a positive integer, got {value!r}")
    return value


class LithopsBackend:
    """Run one Lithops call per task; see the module docstring for the options."""

    name = "lithops"

    def __init__(self, workers: int | None = None, threads: int | None = None, backend: str | None = None,
                 storage: str | None = None, config: dict | str | None = None, runtime: str | None = None,
                 log_level: str | None = None, device: str | None = None, scheduler: str | None = None,
                 poll_s: float | None = None, **options: Any):
        """``backend``: the Lithops compute backend (default: the one ``config`` names, else ``localhost``).
        ``options``: further keys of that backend's config section (``runtime_memory``, ...). ``device`` is carried
        by the tasks themselves; ``scheduler`` applies to the Dask backend only."""
        lithops = _lithops()
        if log_level is None and logging.getLogger("lithops").level == logging.NOTSET:
            logging.getLogger("lithops").setLevel(logging.ERROR)  # quiet unless asked: cai prints the report
        self.workers, self.threads = _positive("workers", workers), _positive("threads", threads)
        if scheduler:
            raise ConfigError(f"lithops backend: scheduler {scheduler!r} applies to the dask backend only")
        config_file = None
        if isinstance(config, str):
            if not os.path.isfile(config):
                raise ConfigError(f"lithops backend: config file {config} does not exist")
            config_file, config = config, None
        elif config is not None and not isinstance(config, dict):
            raise ConfigError(f"lithops backend: config must be a dict or the path of a Lithops config file, "
                              f"got {type(config).__name__}")
        backend = backend or _configured_backend(config, config_file) or "localhost"
        if not isinstance(backend, str):
            raise ConfigError(f"lithops backend: backend must name a Lithops compute backend, got {backend!r}")
        self.backend = backend
        localhost = backend == "localhost"
        section = dict(options)
        if localhost:  # this machine: its cores shared out as the local backend does
            cores = os.cpu_count() or 1
            self.threads = self.threads or max(1, cores // (workers or cores))
            section.setdefault("runtime", runtime or sys.executable)
            section.setdefault("worker_processes", workers or cores)
        else:
            if runtime:
                section.setdefault("runtime", runtime)
            if workers:
                section.setdefault("max_workers", workers)
        self.runtime = section.get("runtime")
        storage = storage or ("localhost" if localhost else None)
        self._closed = False
        try:
            self._executor = lithops.FunctionExecutor(
                config=config, config_file=config_file, backend=backend, storage=storage,
                log_level=log_level or None, **section)
        except Exception as exc:  # noqa: BLE001 - Lithops raises plain exceptions for a bad configuration
            raise ConfigError(f"lithops backend: cannot start a Lithops executor for backend {backend!r}: "
                              f"{type(exc).__name__}: {exc}".splitlines()[0]) from exc
        # the temporary objects are deleted by this backend (see _clean), not by Lithops' cleaner process,
        # which would outlive the run
        self._executor.data_cleaner = False
        local_storage = (self._executor.config.get("lithops") or {}).get("storage") == "localhost"
        self.poll_s = float(poll_s) if poll_s is not None else (POLL_S if local_storage else REMOTE_POLL_S)
        self._futures: list[Any] = []
        self._cleaned_jobs: set[str] = set()

    def _env(self) -> dict[str, str]:
        """Environment the workers need: the S3 client settings and the thread counts."""
        env = {var: os.environ[var] for var in S3_CLIENT_VARS if os.environ.get(var)}
        if self.threads:
            env.update({var: str(self.threads) for var in THREAD_VARS})
        return env

    def map(self, fn: Callable[..., dict], tasks: list[dict], timeouts: TaskTimeouts | None = None
            ) -> Iterator[tuple[dict, dict | BaseException]]:
        """Run ``fn(**task)`` for each task as a Lithops call; yield ``(task, record or exception)`` as each
        finishes. With ``timeouts``, a call past its limit is killed by Lithops' worker and yielded with a
        :class:`TaskTimeoutError`."""
        tasks = list(tasks)
        if not tasks:
            return
        groups: dict[int | None, list[dict]] = {}
        for task in tasks:
            limit = timeouts.limit(task) if timeouts is not None and timeouts.enabled else None
            groups.setdefault(None if limit is None else max(1, math.ceil(limit)), []).append(task)
        pending: dict[Any, tuple[dict, int | None, float]] = {}
        submitted: list[Any] = []
        env = self._env()
        try:
            for limit, group in groups.items():
                try:
                    futures = self._executor.map(_call, [{"task": t} for t in group],
                                                 extra_args={"fn": fn, "threads": self.threads}, extra_env=env,
                                                 timeout=limit, include_modules=None)
                except Exception as exc:  # noqa: BLE001 - Lithops raises plain exceptions for a bad runtime/config
                    raise ConfigError(f"lithops backend: cannot start the calls on Lithops backend {self.backend!r} "
                                      f"(runtime {self.runtime!r}): {type(exc).__name__}: {exc}".splitlines()[0]
                                      ) from exc
                self._futures.extend(futures)
                submitted.extend(futures)
                now = time.monotonic()
                pending.update({fut: (task, limit, now) for fut, task in zip(futures, group)})
            yield from self._collect(pending, timeouts)
        finally:
            self._clean(submitted)

    def _collect(self, pending: dict[Any, tuple[dict, int | None, float]], timeouts: TaskTimeouts | None
                 ) -> Iterator[tuple[dict, Any]]:
        from lithops.wait import ALWAYS

        watch = _LostCalls(self._executor)
        while pending:
            self._executor.wait(fs=list(pending), throw_except=False, return_when=ALWAYS, download_results=True,
                                show_progressbar=False)
            finished = [fut for fut in pending if fut.done]
            for fut in finished:
                task, limit, _ = pending.pop(fut)
                yield task, self._outcome(fut, task, limit, timeouts)
            for fut, error in watch.lost({f: v for f, v in pending.items()}, self.backend):
                task, _, _ = pending.pop(fut)
                yield task, error
            if not finished:
                time.sleep(self.poll_s)

    def _outcome(self, fut: Any, task: dict, limit: int | None, timeouts: TaskTimeouts | None) -> Any:
        """The record a finished call returned, or its exception as the task raised it."""
        hook = sys.excepthook  # lithops installs its own hook when it re-raises; keep ours
        try:
            result = fut.result(throw_except=True, internal_storage=self._executor.internal_storage)
        except Exception as exc:  # noqa: BLE001 - the task's own exception, handed to the runner by value
            if isinstance(exc, TimeoutError) and LITHOPS_TIMEOUT_TEXT in str(exc):
                worker = f"Lithops {self.backend} call {getattr(fut, 'call_id', '?')}"
                if timeouts is not None and limit is not None:
                    return TaskTimeoutError(timeouts.message(task, limit, worker))
                return TaskTimeoutError(f"{_name(task)} did not finish within Lithops' execution_timeout "
                                        f"({exc}); raise lithops.execution_timeout in the Lithops config")
            return exc
        finally:
            sys.excepthook = hook
        if timeouts is not None:
            seconds = (getattr(fut, "stats", None) or {}).get("worker_func_exec_time")
            if isinstance(seconds, (int, float)):
                timeouts.finished(task, float(seconds))
        return result

    def _clean(self, futures: list) -> None:
        """Kill the calls of ``futures`` still running, and delete their jobs' temporary objects (arguments,
        statuses, return values) from Lithops' storage, here and now (no cleaner process is left behind)."""
        if not futures:
            return
        jobs = sorted({fut.job_key for fut in futures})
        running = {fut.job_key for fut in futures if not fut.done}
        if running:
            self._executor.compute_handler.clear(running, exception=KeyboardInterrupt())
        self._executor.job_monitor.remove(futures)
        for job in jobs:
            self._delete_prefix(f"{JOBS_PREFIX}/{job}/")
            self._delete_scratch(job)
            self._cleaned_jobs.add(job)

    def _delete_prefix(self, prefix: str) -> None:
        """Delete the objects under ``prefix`` in Lithops' storage bucket."""
        store = self._executor.storage
        try:
            keys = store.list_keys(store.bucket, prefix)
            if keys:
                store.delete_objects(store.bucket, keys)
        except Exception:  # noqa: BLE001 - leftover temporary objects must not fail a finished run
            pass

    def _delete_scratch(self, job: str) -> None:
        """On localhost: remove the job's folder and log that Lithops keeps beside its storage (literal names)."""
        if self.backend != "localhost":
            return
        from lithops.constants import JOBS_DIR, LOGS_DIR

        for path in (os.path.join(JOBS_DIR, job), os.path.join(LOGS_DIR, job + ".log")):
            try:
                os.rmdir(path) if os.path.isdir(path) else os.remove(path)
            except OSError:  # absent, or a call's task file not yet removed: retried by close()
                pass

    def close(self) -> None:
        """Stop Lithops' workers and job monitor and remove this executor's temporary objects; nothing started
        here outlives it."""
        if self._closed:
            return
        self._closed = True
        executor = self._executor
        try:
            executor.job_monitor.stop()
            executor.invoker.stop(wait=True)
            executor.compute_handler.clear()
            executor.job_monitor.cleanup()
            self._clean([f for f in self._futures if f.job_key not in self._cleaned_jobs])
            self._delete_prefix(f"{JOBS_PREFIX}/{executor.executor_id}/")  # the pickled function
            for job in sorted({f.job_key for f in self._futures}):  # the workers have stopped: nothing is in use
                self._delete_scratch(job)
        finally:
            atexit.unregister(executor._clean_at_exit)  # cleaned here: nothing is spawned at interpreter exit

    def __enter__(self) -> "LithopsBackend":
        return self

    def __exit__(self, *exc: Any) -> None:
        self.close()
