"""Where a run executes. :func:`get_runner` gives the runner called by a name of :mod:`.registry`: ``local``,
``dask``, ``lithops`` (a backend the pipeline runner maps ranks on), ``aws`` (the Step Functions runner), or a
plug-in's. Each runs whole runs: ``run(config) -> RunResult``, then ``close()``."""

from __future__ import annotations

from typing import Any

from ..errors import ConfigError
from .registry import (Runner, available_runners, entry, load_target, register_backend, register_runner,
                       runner_options)

__all__ = ["available_runners", "get_runner", "register_backend", "register_runner"]


def get_runner(name: str, /, **options: Any) -> Runner:
    """The runner called ``name``. ``options``: a ``runner`` entry's own keyword options (``stack=``...); a
    ``backend`` entry takes none here (its options come from each run's config)."""
    spec = entry(name)
    if spec.kind == "runner":
        factory = load_target(spec)
        known = runner_options(name)
        unknown = sorted(set(options) - set(known))
        if unknown:
            takes = ", ".join(o for o in known if not o.startswith("on_")) or "no options"
            raise ConfigError(f"backend {name!r} does not take {', '.join(unknown)}; it takes {takes}")
        return factory(**{k: v for k, v in options.items() if v is not None})
    load_target(spec)  # a missing extra is named now, not at the first rank
    if options:
        raise ConfigError(f"backend {name!r} takes no {', '.join(sorted(options))}: its options are run config "
                          f"keys (workers, threads, backend_options)")
    from .pipeline import PipelineRunner

    return PipelineRunner(name)


