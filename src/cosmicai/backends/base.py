"""The backend interface: a backend only decides where ``run_task`` runs."""

from __future__ import annotations

from typing import Any, Callable, Iterator, Protocol, runtime_checkable

from ..errors import ConfigError

BACKENDS = ("local", "dask")


@runtime_checkable
class Backend(Protocol):
    """Runs ``fn(**task)`` for every task, yielding ``(task, record or exception)`` as tasks finish.

    A backend never loses a task: every task given to :meth:`map` is yielded exactly once.
    """

    name: str

    def map(self, fn: Callable[..., dict], tasks: list[dict]) -> Iterator[tuple[dict, dict | BaseException]]:
        ...

    def close(self) -> None:
        ...


def get_backend(name: str, **options: Any) -> Backend:
    """The backend called ``name`` ("local" or "dask"), built with ``options``; None-valued options are dropped."""
    options = {k: v for k, v in options.items() if v is not None}
    if name == "local":
        from .local import LocalBackend

        allowed = {"workers", "threads", "in_process"}
        return LocalBackend(**{k: v for k, v in options.items() if k in allowed})
    if name == "dask":
        from .dask import DaskBackend

        return DaskBackend(**options)
    raise ConfigError(f"unknown backend {name!r}; choose one of {', '.join(BACKENDS)} "
                      f"(AWS runs through `cai aws run`)")

