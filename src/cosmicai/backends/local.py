"""The local backend: a pool of spawned processes on this machine, each keeping its model across tasks."""

from __future__ import annotations

import os
import signal
import sys
import time
from concurrent.futures import FIRST_COMPLETED, Future, ProcessPoolExecutor, wait
from concurrent.futures.process import BrokenProcessPool
from typing import Any, Callable, Iterator

from ..errors import ConfigError
from .base import TaskTimeoutError, TaskTimeouts
from .env import THREAD_VARS, gpu_ids


_IN_TASK = False
#: In a pool worker: where it reports ``(token, pid)`` as it starts a task, so the parent can time it.
_STARTED: Any = None
#: How often the parent checks running tasks against their timeouts, in seconds.
POLL_S = 0.25
#: How long ``close`` waits for idle workers to exit before it kills them (a stopped worker never exits).
CLOSE_GRACE_S = 10.0


def _on_sigterm(signum: int, frame: Any) -> None:
    """In a pool worker: SIGTERM (the backend stopping an interrupted run) unwinds a running task, else exits."""
    if not _IN_TASK:
        os._exit(128 + signum)
    from .lifetime import Terminated

    signal.signal(signum, signal.SIG_DFL)
    raise Terminated(signum)  # the task's clean-up runs (temporary files removed); _call then exits


def _call(fn: Callable[..., dict], task: dict, token: int | None = None) -> dict:
    """Run one task in a pool worker; a SIGTERM during it ends the worker once the task has unwound."""
    from .lifetime import Terminated

    global _IN_TASK
    if _STARTED is not None and token is not None:
        _STARTED.put((token, os.getpid()))
    _IN_TASK = True
    try:
        return fn(**task)
    except Terminated as exc:
        os._exit(exc.exit_code)  # nothing more of this run is wanted: do not take the next queued task
    finally:
        _IN_TASK = False


def _init_worker(threads: int, parent_pid: int | None = None, gpus: Any = None, started: Any = None) -> None:
    global _STARTED
    _STARTED = started
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
    from ..models.worker import worker_models

    worker_models().configure(threads)


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


def _needs_main(fn: Callable[..., Any], tasks: list[dict]) -> bool:
    """Whether worker processes need the parent's ``__main__``: ``fn`` or the run's model is defined there.

    Otherwise workers start without re-importing it (:func:`cosmicai.processes.spawn_context`), so a script without an
    ``if __name__ == "__main__":`` guard runs once."""
    if getattr(fn, "__module__", None) == "__main__":
        return True
    for task in tasks[:1]:
        config = (task.get("task") or {}).get("config") if isinstance(task, dict) else None
        if isinstance(config, dict) and str(config.get("model") or "").startswith("__main__:"):
            return True
    return False


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


def _drain(started: Any, running: dict[int, tuple[int, float]]) -> None:
    """Take the workers' start reports off ``started`` into ``running`` (token -> (pid, monotonic start))."""
    import queue

    if started is None:
        return
    now = time.monotonic()
    while True:
        try:
            token, pid = started.get_nowait()
        except (queue.Empty, OSError, ValueError, EOFError):
            return
        running[token] = (pid, now)


def _kill(pid: int) -> None:
    """SIGKILL a worker process (it may be stopped or stuck in a system call, where SIGTERM would wait)."""
    try:
        os.kill(pid, getattr(signal, "SIGKILL", signal.SIGTERM))
    except (ProcessLookupError, PermissionError):
        pass


def _is_alive(proc: Any) -> bool:
    try:
        return bool(proc.is_alive())
    except (OSError, ValueError, AssertionError):
        return False


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
        self._started: Any = None
        self._needs_main = False  # the tasks run something defined in __main__: workers must re-import it

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
            from ..processes import spawn_context

            ctx = spawn_context(hide_main=not self._needs_main)
            gpus = None
            if self._gpus is not None and procs > 1:
                gpus = ctx.Queue()
                for gpu in self._gpus[:procs]:
                    gpus.put(gpu)
            self._started = ctx.Queue()  # one per pool: a worker killed mid-put may leave its lock taken
            self._pool = ProcessPoolExecutor(max_workers=procs, mp_context=ctx, initializer=_init_worker,
                                             initargs=(self.threads, os.getpid(), gpus, self._started))
        return self._pool

    def map(self, fn: Callable[..., dict], tasks: list[dict], timeouts: TaskTimeouts | None = None
            ) -> Iterator[tuple[dict, dict | BaseException]]:
        """Run ``fn(**task)`` for each task; yield ``(task, record or exception)`` as each finishes.

        ``timeouts``: a task running past its limit is yielded with a :class:`TaskTimeoutError` and its worker
        process is killed (SIGKILL: it may be stopped or stuck); the tasks that the killed worker's pool lost with
        it are run again in a fresh pool. Tasks running in this process (one worker) are timed, not stopped,
        unless a fixed timeout is set, which runs them in a one-process pool instead.
        """
        if not tasks:
            return
        device = self.device or _task_device(tasks)
        if device and device.startswith("cuda"):
            self._setup_gpus(device)
        pool_for_timeout = (timeouts is not None and timeouts.fixed is not None and self._in_process_given is None)
        if self.in_process and not pool_for_timeout:
            yield from self._map_in_process(fn, tasks, timeouts)
            return
        if self._pool is None:
            self._needs_main = _needs_main(fn, tasks)
        queue = list(enumerate(tasks))
        rerun: set[int] = set()
        while queue:
            lost: list[tuple[int, dict]] = []
            yield from self._map_pool(fn, queue, timeouts, lost)
            for token, task in lost:
                if token in rerun:  # lost a second time: reported, not retried for ever
                    yield task, BrokenProcessPool("a worker process was killed twice while this task was queued or "
                                                  "running")
            queue = [(token, task) for token, task in lost if token not in rerun]
            rerun.update(token for token, _ in queue)

    def _map_pool(self, fn: Callable[..., dict], items: list[tuple[int, dict]], timeouts: TaskTimeouts | None,
                  lost: list[tuple[int, dict]]) -> Iterator[tuple[dict, Any]]:
        """One pool's pass over ``items`` (token, task). Tasks lost to a pool broken by a timeout kill go to
        ``lost``."""
        pool = self._get_pool(len(items))
        started = self._started
        timed = timeouts is not None and timeouts.enabled
        futures: dict[Future, tuple[int, dict]] = {pool.submit(_call, fn, task, token if timed else None):
                                                   (token, task) for token, task in items}
        by_token = {token: fut for fut, (token, _) in futures.items()}
        running: dict[int, tuple[int, float]] = {}  # token -> (worker pid, monotonic start)
        killed = False
        broken = False
        poll = POLL_S if timed else None
        try:
            pending = set(futures)
            while pending:
                done, pending = wait(pending, timeout=poll, return_when=FIRST_COMPLETED)
                _drain(started, running)
                now = time.monotonic()
                for fut in done:
                    token, task = futures[fut]
                    exc = fut.exception()
                    began = running.pop(token, None)
                    if isinstance(exc, BrokenProcessPool):
                        broken = True
                        if killed:  # collateral of a timeout kill: not this task's fault, run it again
                            lost.append((token, task))
                            continue
                    elif exc is None and timed and began is not None:
                        timeouts.finished(task, now - began[1])
                    yield task, (exc if exc is not None else fut.result())
                if timed:
                    workers = set(getattr(pool, "_processes", None) or ())  # pids: never kill a stranger
                    for token, task, error in self._expired(timeouts, running, futures, by_token, now, workers):
                        killed = True
                        pending.discard(by_token[token])
                        yield task, error
            if broken or killed:  # a worker died (killed, out of memory, timed out): a fresh pool next time
                self.close(wait=False)
        except BaseException:  # interrupted (Ctrl-C, SIGTERM) or abandoned: no task of this run goes on
            for fut in futures:
                fut.cancel()
            self.close(wait=False, stop_workers=True)
            raise

    @staticmethod
    def _expired(timeouts: TaskTimeouts, running: dict[int, tuple[int, float]], futures: dict[Future, tuple],
                 by_token: dict[int, Future], now: float, workers: set[int]
                 ) -> list[tuple[int, dict, TaskTimeoutError]]:
        """Kill the worker of every running task past its limit; the tasks with their errors."""
        out = []
        for token, (pid, began) in list(running.items()):
            fut = by_token[token]
            task = futures[fut][1]
            if fut.done():  # its start was reported after it finished
                del running[token]
                continue
            limit = timeouts.limit(task)
            if limit is None or now - began <= limit:
                continue
            if pid in workers:
                _kill(pid)
            del running[token]
            out.append((token, task, TaskTimeoutError(timeouts.message(task, limit, f"pid {pid}"))))
        return out

    def _map_in_process(self, fn: Callable[..., dict], tasks: list[dict], timeouts: TaskTimeouts | None = None
                        ) -> Iterator[tuple[dict, Any]]:
        from ..models.worker import worker_models

        models = worker_models()
        torch = sys.modules.get("torch")  # loaded only where a torch engine runs: restore its threads after
        before, before_worker = (torch.get_num_threads() if torch else None), models.threads
        models.configure(self.threads)
        try:
            for task in tasks:
                began = time.monotonic()
                try:
                    result: Any = fn(**task)
                except Exception as exc:  # noqa: BLE001 - reported per task, the run goes on
                    result = exc
                if timeouts is not None and not isinstance(result, BaseException):
                    timeouts.finished(task, time.monotonic() - began)
                yield task, result
        finally:
            models.configure(before_worker)
            if torch is not None and before is not None:
                torch.set_num_threads(before)

    def close(self, wait: bool = True, stop_workers: bool = False) -> None:
        """Shut the pool down (pending tasks are cancelled); ``stop_workers`` also ends running tasks at once.

        Idle workers that have not exited :data:`CLOSE_GRACE_S` seconds after ``close(wait=True)`` (stopped,
        stuck) are killed, so closing never hangs. A rank whose task is stopped writes nothing under its final
        names (outputs are written atomically), so a rerun redoes it.
        """
        pool, self._pool = self._pool, None
        started, self._started = self._started, None
        if pool is None:
            return
        procs = list((getattr(pool, "_processes", None) or {}).values())
        manager = getattr(pool, "_executor_manager_thread", None)
        pool.shutdown(wait=False, cancel_futures=True)
        if stop_workers:
            _stop(procs)
        elif wait:
            if manager is not None:
                manager.join(CLOSE_GRACE_S)
            _stop([p for p in procs if _is_alive(p)], grace_s=0.0)
            if manager is not None:
                manager.join(CLOSE_GRACE_S)
        if started is not None:
            started.close()
            started.cancel_join_thread()

    def __enter__(self) -> "LocalBackend":
        return self

    def __exit__(self, *exc: Any) -> None:
        self.close()


def from_options(workers: int | None = None, threads: int | None = None, in_process: bool | None = None,
                 **ignored: Any) -> LocalBackend:
    """The ``local`` backend from a run's backend options (Dask-only ones, such as ``scheduler`` and ``device``, are
    ignored: the local pool pins GPUs itself)."""
    return LocalBackend(workers=workers, threads=threads, in_process=in_process)
