"""The local backend: a pool of spawned processes on this machine, each keeping its model across tasks."""

from __future__ import annotations

import multiprocessing
import os
import signal
import sys
import time
from concurrent.futures import FIRST_COMPLETED, Future, ProcessPoolExecutor, wait
from concurrent.futures.process import BrokenProcessPool
from typing import Any, Callable, Iterator

from ..errors import ConfigError
from .env import THREAD_VARS, gpu_ids


_IN_TASK = False


def _on_sigterm(signum: int, frame: Any) -> None:
    """In a pool worker: SIGTERM (the backend stopping an interrupted run) unwinds a running task, else exits."""
    if not _IN_TASK:
        os._exit(128 + signum)
    from .lifetime import Terminated

    signal.signal(signum, signal.SIG_DFL)
    raise Terminated(signum)  # the task's clean-up runs (temporary files removed); _call then exits


def _call(fn: Callable[..., dict], task: dict) -> dict:
    """Run one task in a pool worker; a SIGTERM during it ends the worker once the task has unwound."""
    from .lifetime import Terminated

    global _IN_TASK
    _IN_TASK = True
    try:
        return fn(**task)
    except Terminated as exc:
        os._exit(exc.exit_code)  # nothing more of this run is wanted: do not take the next queued task
    finally:
        _IN_TASK = False


def _init_worker(threads: int, parent_pid: int | None = None, gpus: Any = None) -> None:
    # A CUDA run with several workers: this process takes one GPU id off the queue before torch touches CUDA,
    # so it sees only its own GPU, as "cuda".
    if gpus is not None:
        import queue

        try:
            os.environ["CUDA_VISIBLE_DEVICES"] = gpus.get(timeout=30)
        except queue.Empty:  # more processes than GPUs handed out: cannot happen with the pool sized to them
            pass
    # First: this worker exits when the cai process dies (SIGKILL, OOM), instead of running on with PPID 1.
    if parent_pid is not None:
        from .lifetime import die_with_parent

        die_with_parent(parent_pid)
        if hasattr(signal, "SIGTERM"):
            signal.signal(signal.SIGTERM, _on_sigterm)
    # Before torch starts its thread pools in this fresh (spawned) process.
    for var in THREAD_VARS:
        os.environ[var] = str(threads)
    from ..pipeline.infer import configure_worker

    configure_worker(threads)


def default_workers_threads(workers: int | None, threads: int | None) -> tuple[int, int]:
    """``workers`` defaults to the cores; ``threads`` to cores // workers (at least 1)."""
    cores = os.cpu_count() or 1
    workers = int(workers) if workers else cores
    threads = int(threads) if threads else max(1, cores // workers)
    if workers < 1 or threads < 1:
        raise ConfigError(f"workers and threads must be >= 1, got workers={workers}, threads={threads}")
    return workers, threads


def gpu_assignment(workers: int, device: str, visible: str | None, count: int) -> list[str] | None:
    """``CUDA_VISIBLE_DEVICES`` for each of ``workers`` worker processes of a run on ``device``: one GPU per
    worker, taken from the parent's ``visible`` list (or 0..count-1). None when nothing is pinned (a CPU run, or
    a single worker, which uses the first visible GPU). ``count``: the GPUs torch sees. More workers than GPUs,
    or several workers on one named GPU (``cuda:N``), raise ConfigError."""
    if not str(device).startswith("cuda"):
        return None
    if count < 1:
        raise ConfigError(f"device '{device}': no CUDA GPU is visible (CUDA_VISIBLE_DEVICES={visible!r})")
    _, _, index = str(device).partition(":")
    if index:
        if workers > 1:
            raise ConfigError(f"device '{device}' names one GPU, but {workers} workers were asked for: the local "
                              "backend runs one worker per GPU; use --device cuda --workers N (N <= GPUs) to use "
                              f"several GPUs, or --workers 1 to run on {device}")
        return None
    if workers > count:
        seen = f"CUDA_VISIBLE_DEVICES={visible}" if visible is not None else "all GPUs visible"
        raise ConfigError(f"--workers {workers} with --device {device}: this host has {count} visible CUDA GPU(s) "
                          f"({seen}) and the local backend runs one worker per GPU; use --workers {count} or "
                          "fewer (each worker then predicts with large batches on its own GPU)")
    if workers <= 1:
        return None
    return gpu_ids(visible, count)[:count][:workers]


def visible_gpus() -> int:
    """CUDA GPUs this process can see (0 without CUDA); torch's count respects CUDA_VISIBLE_DEVICES."""
    import torch

    return int(torch.cuda.device_count()) if torch.cuda.is_available() else 0


def _task_device(tasks: list[dict]) -> str | None:
    """The device the run's tasks predict on (their run config carries it), when they say."""
    for task in tasks[:1]:
        config = (task.get("task") or {}).get("config") if isinstance(task, dict) else None
        if isinstance(config, dict) and config.get("device"):
            return str(config["device"])
    return None


def _stop(procs: list, grace_s: float = 2.0) -> None:
    """SIGTERM the pool's worker processes, then SIGKILL any still alive after ``grace_s``; reap them all."""
    for proc in procs:
        try:
            proc.terminate()
        except (OSError, ValueError, AttributeError):
            pass
    deadline = time.monotonic() + grace_s
    for proc in procs:
        try:
            proc.join(max(0.0, deadline - time.monotonic()))
            if proc.is_alive():
                proc.kill()
                proc.join(grace_s)
        except (OSError, ValueError, AttributeError, AssertionError):
            pass


class LocalBackend:
    """``workers`` processes (spawn context) with ``threads`` torch threads each.

    With ``workers=1`` tasks run in this process by default (``in_process``), which avoids the start-up of a
    fresh interpreter and lets the caller's model cache be reused. Ctrl-C (or SIGTERM, turned into the same
    interrupt by the CLI) cancels pending tasks and stops the workers; finished ranks keep their outputs, so a
    rerun resumes. Workers exit on their own when this process dies (see :mod:`.lifetime`).

    A CUDA run (the tasks' ``device`` is ``cuda``) gets one worker per GPU: ``workers`` defaults to the visible
    GPUs (one GPU: the tasks run in this process), more workers than GPUs are refused, and each worker process
    is pinned to its own GPU (``CUDA_VISIBLE_DEVICES`` set before torch initialises CUDA), where it is ``cuda``.
    """

    name = "local"

    def __init__(self, workers: int | None = None, threads: int | None = None, in_process: bool | None = None,
                 device: str | None = None):
        self.workers, self.threads = default_workers_threads(workers, threads)
        self._workers_given = bool(workers)
        self._threads_given = bool(threads)
        self._in_process_given = in_process
        self.in_process = (self.workers == 1) if in_process is None else bool(in_process)
        self.device = device  # None: taken from the tasks' run config
        self._gpus: list[str] | None = None
        self._gpus_for: str | None = None
        self._pool: ProcessPoolExecutor | None = None

    def _setup_gpus(self, device: str) -> None:
        """A CUDA run: one worker per visible GPU by default; refuse more workers than GPUs; pin each worker."""
        if self._gpus_for == device or self._pool is not None:
            return
        count = visible_gpus()
        if not self._workers_given:
            self.workers = max(1, min(self.workers, count)) if count else 1
            if not self._threads_given:
                self.threads = default_workers_threads(self.workers, None)[1]
            if self._in_process_given is None:
                self.in_process = self.workers == 1
        self._gpus = None if self.in_process else gpu_assignment(self.workers, device, os.environ.get(
            "CUDA_VISIBLE_DEVICES"), count)
        if self.in_process:
            gpu_assignment(1, device, os.environ.get("CUDA_VISIBLE_DEVICES"), count)  # still refuses no GPU
        self._gpus_for = device

    def _get_pool(self, n_tasks: int) -> ProcessPoolExecutor:
        if self._pool is None:
            procs = max(1, min(self.workers, n_tasks))
            if not self._threads_given:  # fewer tasks than workers: give the idle cores to the processes started
                self.threads = default_workers_threads(procs, None)[1]
            ctx = multiprocessing.get_context("spawn")
            initargs: tuple = (self.threads, os.getpid())
            if self._gpus is not None and procs > 1:
                gpus = ctx.Queue()
                for gpu in self._gpus[:procs]:
                    gpus.put(gpu)
                initargs += (gpus,)
            self._pool = ProcessPoolExecutor(max_workers=procs, mp_context=ctx,
                                             initializer=_init_worker, initargs=initargs)
        return self._pool

    def map(self, fn: Callable[..., dict], tasks: list[dict]) -> Iterator[tuple[dict, dict | BaseException]]:
        """Run ``fn(**task)`` for each task; yield ``(task, record or exception)`` as each finishes."""
        if not tasks:
            return
        device = self.device or _task_device(tasks)
        if device and device.startswith("cuda"):
            self._setup_gpus(device)
        if self.in_process:
            yield from self._map_in_process(fn, tasks)
            return
        pool = self._get_pool(len(tasks))
        futures: dict[Future, dict] = {pool.submit(_call, fn, task): task for task in tasks}
        broken = False
        try:
            pending = set(futures)
            while pending:
                done, pending = wait(pending, return_when=FIRST_COMPLETED)
                for fut in done:
                    exc = fut.exception()
                    broken = broken or isinstance(exc, BrokenProcessPool)
                    yield futures[fut], (exc if exc is not None else fut.result())
            if broken:  # a worker died (killed, out of memory): start a fresh pool next time
                self.close(wait=False)
        except BaseException:  # interrupted (Ctrl-C, SIGTERM) or abandoned: no task of this run goes on
            for fut in futures:
                fut.cancel()
            self.close(wait=False, stop_workers=True)
            raise

    def _map_in_process(self, fn: Callable[..., dict], tasks: list[dict]) -> Iterator[tuple[dict, Any]]:
        from ..pipeline.infer import configure_worker, worker_threads

        torch = sys.modules.get("torch")  # loaded only where a torch engine runs: restore its threads after
        before, before_worker = (torch.get_num_threads() if torch else None), worker_threads()
        configure_worker(self.threads)
        try:
            for task in tasks:
                try:
                    result: Any = fn(**task)
                except Exception as exc:  # noqa: BLE001 - reported per task, the run goes on
                    result = exc
                yield task, result
        finally:
            configure_worker(before_worker)
            if torch is not None and before is not None:
                torch.set_num_threads(before)

    def close(self, wait: bool = True, stop_workers: bool = False) -> None:
        """Shut the pool down (pending tasks are cancelled); ``stop_workers`` also ends running tasks at once.

        A rank whose task is stopped writes nothing under its final names (outputs are written atomically), so a
        rerun redoes it.
        """
        pool, self._pool = self._pool, None
        if pool is None:
            return
        procs = list((getattr(pool, "_processes", None) or {}).values()) if stop_workers else []
        pool.shutdown(wait=wait and not procs, cancel_futures=True)
        _stop(procs)

    def __enter__(self) -> "LocalBackend":
        return self

    def __exit__(self, *exc: Any) -> None:
        self.close()


def from_options(workers: int | None = None, threads: int | None = None, in_process: bool | None = None,
                 **ignored: Any) -> LocalBackend:
    """The ``local`` backend from a run's backend options (Dask-only ones, such as ``scheduler`` and ``device``, are
    ignored: the local pool pins GPUs itself)."""
    return LocalBackend(workers=workers, threads=threads, in_process=in_process)
