"""Where a run executes. :func:`get_runner` gives the runner called by a name of :mod:`.registry`: ``local``,
``dask``, ``lithops`` (a backend the pipeline runner maps ranks on), ``aws`` (the Step Functions runner), or a
plug-in's. Each runs whole runs: ``run(config) -> RunResult``, then ``close()``."""

from __future__ import annotations

from typing import Any

from ..errors import ConfigError
from .registry import available_runners, entry, load_target, register_backend, register_runner

__all__ = ["available_runners", "get_runner", "register_backend", "register_runner"]


def get_runner(name: str, /, **options: Any) -> Any:
    """The runner called ``name``. ``options``: a ``runner`` entry's own keyword options (``stack=``...); a
    ``backend`` entry takes none here (its options come from each run's config)."""
    spec = entry(name)
    if spec.kind == "runner":
        factory = load_target(spec)
        unknown = sorted(set(options) - set(spec.options)) if spec.options else []
        if unknown:
            raise ConfigError(f"backend {name!r} does not take {', '.join(unknown)}; it takes "
                              f"{', '.join(o for o in spec.options if not o.startswith('on_'))}")
        return factory(**{k: v for k, v in options.items() if v is not None})
    load_target(spec)  # a missing extra is named now, not at the first rank
    if options:
        raise ConfigError(f"backend {name!r} takes no {', '.join(sorted(options))}: its options are run config "
                          f"keys (workers, threads, backend_options)")
    from .pipeline import PipelineRunner

    return PipelineRunner(name)


