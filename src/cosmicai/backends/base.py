"""The backend interface: a backend only decides where ``run_task`` runs."""

from __future__ import annotations

from typing import Any, Callable, Iterator, Protocol, runtime_checkable

from ..errors import ConfigError



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


#: Built-in backends: name -> "module:factory", imported on first use. Others come from the
#: ``cosmicai.backends`` entry-point group (docs/architecture.md, "Writing a backend").
REGISTRY: dict[str, str] = {"local": "cosmicai.backends.local:from_options",
                            "dask": "cosmicai.backends.dask:DaskBackend"}
ENTRY_POINT_GROUP = "cosmicai.backends"
_REGISTERED: dict[str, Callable[..., Backend]] = {}


def register_backend(name: str, factory: Callable[..., Backend] | str, clobber: bool = False) -> None:
    """Make ``factory`` (a callable, or ``"module:attr"`` imported on first use) the backend called ``name``."""
    if not clobber and (name in _REGISTERED or name in REGISTRY):
        raise ConfigError(f"backend {name!r} is already registered (pass clobber=True to replace it)")
    if isinstance(factory, str):
        REGISTRY[name] = factory
        _REGISTERED.pop(name, None)
    else:
        _REGISTERED[name] = factory


def available_backends() -> list[str]:
    """Every backend name: the built-in ones, those registered in this process, and entry points."""
    from importlib.metadata import entry_points

    return sorted({*REGISTRY, *_REGISTERED, *(ep.name for ep in entry_points(group=ENTRY_POINT_GROUP))})


def _factory(name: str) -> Callable[..., Backend]:
    import importlib
    from importlib.metadata import entry_points

    if name in _REGISTERED:
        return _REGISTERED[name]
    if name in REGISTRY:
        module, _, attr = REGISTRY[name].partition(":")
        return getattr(importlib.import_module(module), attr)
    for ep in entry_points(group=ENTRY_POINT_GROUP):
        if ep.name == name:
            return ep.load()
    raise ConfigError(f"unknown backend {name!r}; choose one of {', '.join(available_backends())} "
                      f"(AWS runs through `cai aws run` or cosmicai.run(..., backend='aws'))")


def get_backend(name: str, **options: Any) -> Backend:
    """The backend called ``name``, built with ``options`` (None-valued options are dropped)."""
    options = {k: v for k, v in options.items() if v is not None}
    backend = _factory(name)(**options)
    if not callable(getattr(backend, "map", None)) or not callable(getattr(backend, "close", None)):
        raise ConfigError(f"backend {name!r} built a {type(backend).__name__}, which has no map() and close()")
    return backend

