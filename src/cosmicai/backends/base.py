"""The backend interface: a backend only decides where ``run_task`` runs. Backends are found by name through
``cosmicai.runners.registry``."""

from __future__ import annotations

from typing import Any, Callable, Iterator, Protocol, runtime_checkable


#: The automatic task timeout (``task_timeout="auto"``): ``max(AUTO_FLOOR_S, AUTO_FACTOR x the slowest time per
#: row seen so far in this run x the task's rows)``. The floor covers a cold start (interpreter, torch, model
#: load, first fetch); before any task has finished, AUTO_PRIOR_S_PER_ROW (a slow CPU core) stands in for the
#: measurement.
AUTO_FLOOR_S = 600.0
AUTO_FACTOR = 10.0
AUTO_PRIOR_S_PER_ROW = 0.05
#: Bytes of one row's image (5 x 32 x 32 float32): estimates a partition's rows when its manifest does not say.
ROW_BYTES = 5 * 32 * 32 * 4


class TaskTimeoutError(TimeoutError):
    """A task ran past its timeout; its worker was killed. The rank is failed and a rerun runs it again."""


def task_rows(task: dict) -> int | None:
    """The rows a task item (:meth:`Plan.task_list`) will predict, from its partitions' row counts, else their
    sizes; None when the item does not carry its partitions."""
    parts = (task.get("task") or {}).get("partitions") if isinstance(task, dict) else None
    if not isinstance(parts, list):
        return None
    rows = 0
    for part in parts:
        n = part.get("rows") if isinstance(part, dict) else None
        size = part.get("bytes") if isinstance(part, dict) else None
        if isinstance(n, int):
            rows += n
        elif isinstance(size, int):
            rows += max(1, size // ROW_BYTES)
        else:
            return None
    return rows


class TaskTimeouts:
    """How long each task may run: a fixed number of seconds, none, or (``"auto"``) derived from the time per row
    measured on the tasks finished so far, with a wide margin.

    A backend that enforces timeouts calls :meth:`limit` for a running task, :meth:`finished` when one ends
    (feeding the measurement), and :meth:`message` for the error of a task it stopped.
    """

    def __init__(self, seconds: float | str | None = "auto", floor_s: float = AUTO_FLOOR_S,
                 factor: float = AUTO_FACTOR, prior_s_per_row: float = AUTO_PRIOR_S_PER_ROW):
        self.auto = seconds == "auto"
        self.fixed = None if self.auto or not seconds else float(seconds)
        self.floor_s, self.factor, self.prior_s_per_row = floor_s, factor, prior_s_per_row
        self.slowest_s_per_row: float | None = None

    @property
    def enabled(self) -> bool:
        return self.auto or self.fixed is not None

    def limit(self, task: dict) -> float | None:
        """Seconds ``task`` may run, or None for no limit (also for an item that does not carry its partitions,
        whose size is unknown)."""
        if not self.auto:
            return self.fixed
        rows = task_rows(task)
        per_row = self.slowest_s_per_row if self.slowest_s_per_row is not None else self.prior_s_per_row
        return None if rows is None else max(self.floor_s, self.factor * per_row * rows)

    def finished(self, task: dict, seconds: float) -> None:
        """Record that ``task`` ran ``seconds`` (start to end on its worker)."""
        rows = task_rows(task)
        if rows:
            per_row = seconds / rows
            self.slowest_s_per_row = max(self.slowest_s_per_row or 0.0, per_row)

    def message(self, task: dict, limit: float, worker: str) -> str:
        """The one-line error of a task stopped after ``limit`` seconds."""
        name = f"rank {task['rank']}" if isinstance(task, dict) and "rank" in task else "a task"
        if self.auto:
            basis = (f"auto: {self.factor:g} x the slowest {self.slowest_s_per_row:.3g} s/row seen"
                     if self.slowest_s_per_row is not None else "auto: no task had finished yet")
            how = f"{basis}, at least {self.floor_s:g} s"
        else:
            how = "set by task_timeout"
        return (f"{name} did not finish within its task timeout of {limit:.3g} s ({how}); its worker ({worker}) "
                f"was killed. A rerun resumes it; if it is just slow, raise --task-timeout")


@runtime_checkable
class Backend(Protocol):
    """Runs ``fn(**task)`` for every task, yielding ``(task, record or exception)`` as tasks finish.

    A backend never loses a task: every task given to :meth:`map` is yielded exactly once.
    """

    name: str

    def map(self, fn: Callable[..., dict], tasks: list[dict]) -> Iterator[tuple[dict, dict | BaseException]]:
        """May also take ``timeouts`` (a :class:`TaskTimeouts`): a task past its limit is yielded with a
        :class:`TaskTimeoutError` and its worker stopped. The runner passes it only to backends whose ``map``
        accepts it."""
        ...

    def close(self) -> None:
        ...


def accepts_timeouts(backend: Any) -> bool:
    """Whether ``backend.map`` takes a ``timeouts`` keyword (third-party backends need not)."""
    import inspect

    try:
        return "timeouts" in inspect.signature(backend.map).parameters
    except (TypeError, ValueError):
        return False
