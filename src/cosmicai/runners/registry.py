"""Where a run executes: one registry of runners, each a name (``local``, ``dask``, ``lithops``, ``aws``, or a
plug-in's), with the install hint of the extra it needs, as fsspec's ``known_implementations`` does.

Two kinds of entry:

* ``backend``: an object with ``map(run_task, tasks)`` and ``close()`` (docs/architecture.md, "Writing a
  backend"). The pipeline runner plans here, maps the ranks on it and summarizes here.
* ``runner``: a class that runs the whole run itself (the Step Functions runner: plan, the Map and summarize run
  in the cloud), built with its own options (``stack=``, ``region=``...).

Either way :func:`get_runner` gives a :class:`Runner`: ``run(config) -> RunResult`` any number of times, then
``close()``. Third-party packages add entries through the ``cosmicai.backends`` (backend) and ``cosmicai.runners``
(runner) entry-point groups, or :func:`register_runner` in code.
"""

from __future__ import annotations

import importlib
import importlib.util
import inspect
from dataclasses import dataclass
from typing import Any, Callable, Protocol

from ..config import RunConfig
from ..errors import ConfigError
from ..results import RunResult

BACKEND_GROUP = "cosmicai.backends"
RUNNER_GROUP = "cosmicai.runners"


@dataclass(frozen=True)
class RunnerEntry:
    """One name in the registry: what to import, what it needs installed, and which options it takes."""

    name: str
    target: str | Callable[..., Any]  #: ``"module:attr"`` (imported on first use) or the factory itself
    kind: str = "backend"  #: ``backend`` (mapped by the pipeline runner) or ``runner`` (runs whole runs)
    needs: tuple[str, ...] = ()  #: third-party modules it imports
    install: str = ""  #: how to get them, e.g. ``pip install 'cosmicai[full]'``
    entry_point: Any = None  #: the ``importlib.metadata.EntryPoint`` a plug-in's entry came from


#: The built-in entries. ``local`` needs only the worker install.
KNOWN: dict[str, RunnerEntry] = {e.name: e for e in (
    RunnerEntry("local", "cosmicai.backends.local:from_options"),  # processes on this machine
    RunnerEntry("dask", "cosmicai.backends.dask:DaskBackend", needs=("dask", "distributed"),
                install="pip install 'cosmicai[full]'"),
    RunnerEntry("lithops", "cosmicai.backends.lithops:LithopsBackend", needs=("lithops",),
                install="pip install 'cosmicai[lithops]'"),
    # The deployed Step Functions state machine and its Lambdas (docs/aws.md).
    RunnerEntry("aws", "cosmicai.runners.stepfunctions:StepFunctionsRunner", kind="runner", needs=("boto3",),
                install="pip install 'cosmicai[worker]'"),
)}
_ADDED: dict[str, RunnerEntry] = {}


def register_runner(name: str, target: str | Callable[..., Any], *, kind: str = "backend",
                    needs: tuple[str, ...] = (), install: str = "", clobber: bool = False) -> None:
    """Make ``target`` (``"module:attr"`` or a callable) the runner called ``name``: a backend factory
    (``kind="backend"``, called with ``workers``, ``threads`` and the run's ``backend_options``) or a runner class
    (``kind="runner"``, called with its own keyword options, see :func:`runner_options`)."""
    if kind not in ("backend", "runner"):
        raise ConfigError(f"runner {name!r}: kind must be 'backend' or 'runner', got {kind!r}")
    if not clobber and (name in _ADDED or name in KNOWN):
        raise ConfigError(f"runner {name!r} is already registered (pass clobber=True to replace it)")
    _ADDED[name] = RunnerEntry(name, target, kind, tuple(needs), install)


def register_backend(name: str, factory: str | Callable[..., Any], clobber: bool = False) -> None:
    """Make ``factory`` (``"module:attr"`` or a callable) the backend called ``name``."""
    register_runner(name, factory, kind="backend", clobber=clobber)


def _entry_points() -> dict[str, tuple[str, Any]]:
    from importlib.metadata import entry_points

    found: dict[str, tuple[str, Any]] = {}
    for group, kind in ((BACKEND_GROUP, "backend"), (RUNNER_GROUP, "runner")):
        for ep in entry_points(group=group):
            found.setdefault(ep.name, (kind, ep))
    return found


def available_runners() -> list[str]:
    """Every name: the built-in ones, those registered in this process, and the entry points."""
    return sorted({*KNOWN, *_ADDED, *_entry_points()})


def entry(name: str) -> RunnerEntry:
    """The registry entry called ``name``; an unknown name is one line listing the known ones."""
    if name in _ADDED:
        return _ADDED[name]
    if name in KNOWN:
        return KNOWN[name]
    found = _entry_points().get(name)
    if found is not None:
        kind, ep = found
        return RunnerEntry(name, ep.value, kind, entry_point=ep)
    raise ConfigError(f"backend {name!r} is not known; choose one of {', '.join(available_runners())}")


def load_target(spec: RunnerEntry) -> Callable[..., Any]:
    """The entry's factory, imported now; a missing third-party module is one line with the install hint."""
    missing = [m for m in spec.needs if not _installed(m)]
    if missing:
        raise ConfigError(_missing(spec, missing[0]))
    try:
        if spec.entry_point is not None:
            return spec.entry_point.load()
        if callable(spec.target):
            return spec.target
        module, _, attr = spec.target.partition(":")
        return getattr(importlib.import_module(module), attr)
    except ModuleNotFoundError as exc:
        if exc.name and exc.name.split(".")[0] != "cosmicai":
            raise ConfigError(_missing(spec, exc.name)) from exc
        raise


def _installed(module: str) -> bool:
    try:
        return importlib.util.find_spec(module) is not None
    except (ImportError, ValueError):  # a finder refused it, or a module left half-imported
        return False


def _missing(spec: RunnerEntry, module: str) -> str:
    hint = spec.install or f"install the package that provides {module}"
    return f"backend {spec.name!r} needs {module}, which this install does not have: {hint}"


class Runner(Protocol):
    """Runs whole runs (plan -> infer on every rank -> summarize) and returns each one's :class:`RunResult`."""

    name: str

    def run(self, config: RunConfig | dict[str, Any], *, progress: bool = False,
            report: bool = False) -> RunResult:
        ...

    def close(self) -> None:
        ...


def backend_options(config: RunConfig) -> dict[str, Any]:
    """The options a run's backend is built with: ``workers``, ``threads``, and for other backends than local
    ``scheduler`` and ``device``, under the config's ``backend_options`` (None-valued ones dropped)."""
    options = dict(config.backend_options)
    options.setdefault("workers", config.workers)
    options.setdefault("threads", config.threads)
    if config.backend != "local":
        options.setdefault("scheduler", config.scheduler)
        options.setdefault("device", config.device)
    return {k: v for k, v in options.items() if v is not None}


def make_backend(name: str, **options: Any) -> Any:
    """The backend called ``name`` itself (a ``backend`` entry), built with ``options`` (None-valued ones dropped),
    for callers that drive ``map`` themselves or reuse one backend over runs (``runners.pipeline.run(backend=)``)."""
    spec = entry(name)
    if spec.kind != "backend":
        raise ConfigError(f"{name!r} runs whole runs, not tasks: use get_runner({name!r})")
    backend = load_target(spec)(**{k: v for k, v in options.items() if v is not None})
    if not callable(getattr(backend, "map", None)) or not callable(getattr(backend, "close", None)):
        raise ConfigError(f"backend {name!r} built a {type(backend).__name__}, which has no map() and close()")
    return backend


def runner_options(name: str) -> tuple[str, ...]:
    """The keyword options the runner called ``name`` takes besides the run config: the named parameters of its
    class (empty for backends, whose options are run config keys)."""
    spec = entry(name)
    if spec.kind != "runner":
        return ()
    named = (inspect.Parameter.KEYWORD_ONLY, inspect.Parameter.POSITIONAL_OR_KEYWORD)
    return tuple(p.name for p in inspect.signature(load_target(spec)).parameters.values() if p.kind in named)
