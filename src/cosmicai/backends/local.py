"""The local backend: a pool of spawned processes on this machine, each keeping its model across tasks."""

from __future__ import annotations

import multiprocessing
import os
from concurrent.futures import FIRST_COMPLETED, Future, ProcessPoolExecutor, wait
from concurrent.futures.process import BrokenProcessPool
from typing import Any, Callable, Iterator

from ..errors import ConfigError


def _init_worker(threads: int) -> None:
    # Before torch starts its thread pools in this fresh (spawned) process.
    os.environ["OMP_NUM_THREADS"] = str(threads)
    os.environ["MKL_NUM_THREADS"] = str(threads)
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


class LocalBackend:
    """``workers`` processes (spawn context) with ``threads`` torch threads each.

    With ``workers=1`` tasks run in this process by default (``in_process``), which avoids the start-up of a
    fresh interpreter and lets the caller's model cache be reused. Ctrl-C cancels pending tasks; finished ranks
    keep their outputs, so a rerun resumes.
    """

    name = "local"

    def __init__(self, workers: int | None = None, threads: int | None = None, in_process: bool | None = None):
        self.workers, self.threads = default_workers_threads(workers, threads)
        self._threads_given = bool(threads)
        self.in_process = (self.workers == 1) if in_process is None else bool(in_process)
        self._pool: ProcessPoolExecutor | None = None

    def _get_pool(self, n_tasks: int) -> ProcessPoolExecutor:
        if self._pool is None:
            procs = max(1, min(self.workers, n_tasks))
            if not self._threads_given:  # fewer tasks than workers: give the idle cores to the processes started
                self.threads = default_workers_threads(procs, None)[1]
            ctx = multiprocessing.get_context("spawn")
            self._pool = ProcessPoolExecutor(max_workers=procs, mp_context=ctx,
                                             initializer=_init_worker, initargs=(self.threads,))
        return self._pool

    def map(self, fn: Callable[..., dict], tasks: list[dict]) -> Iterator[tuple[dict, dict | BaseException]]:
        """Run ``fn(**task)`` for each task; yield ``(task, record or exception)`` as each finishes."""
        if not tasks:
            return
        if self.in_process:
            yield from self._map_in_process(fn, tasks)
            return
        pool = self._get_pool(len(tasks))
        futures: dict[Future, dict] = {pool.submit(fn, **task): task for task in tasks}
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
        except BaseException:
            for fut in futures:
                fut.cancel()
            self.close(wait=False)
            raise

    def _map_in_process(self, fn: Callable[..., dict], tasks: list[dict]) -> Iterator[tuple[dict, Any]]:
        import torch

        from ..pipeline.infer import configure_worker, worker_threads

        before, before_worker = torch.get_num_threads(), worker_threads()
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
            torch.set_num_threads(before)

    def close(self, wait: bool = True) -> None:
        """Shut the pool down (pending tasks are cancelled)."""
        if self._pool is not None:
            self._pool.shutdown(wait=wait, cancel_futures=True)
            self._pool = None

    def __enter__(self) -> "LocalBackend":
        return self

    def __exit__(self, *exc: Any) -> None:
        self.close()
