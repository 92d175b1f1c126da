"""The Python API, for notebooks and scripts: ``run`` a model over a dataset on a backend and get a
:class:`RunResult`; ``open`` a finished run again; ``load_model``; ``predict`` on arrays already in memory.
Nothing here prints unless asked (``report=True``, ``progress=True``)."""

from __future__ import annotations

from typing import Any

import numpy as np

from . import storage
from .errors import CaiError, DataError
from .results import RunResult



def run(data: str, result: str | None = None, *, model: str = "astromae-demo", backend: str = "local",
        weights: str | None = None, mode: str = "exact", progress: bool = False, report: bool = False,
        task_timeout: float | str | None = None, allow_unsafe_lease: bool = False, **options: Any) -> RunResult:
    """Run ``model`` over the dataset at ``data`` and write everything under ``result``; returns the result.

    ``backend``: a name of the runner registry (``cosmicai.runners.available_runners()``): ``local`` (processes
    on this machine), ``dask`` (``scheduler=`` an address, or a local cluster), ``lithops`` (Lithops functions;
    ``backend_options=`` its settings), ``aws`` (the deployed Step Functions state machine: ``stack=`` or
    ``state_machine_arn=``, plus ``endpoint=``, ``region=``, ``name=``, ``upload=``, ``poll_s=``, ``timeout_s=``), or
    a plug-in's. Other ``options`` are run config keys (``batch_size``, ``world_size``, ``workers``, ``threads``,
    ``device``, ``allow_failures``, ``overwrite``, ...; see docs/pipeline.md); an unknown one raises ConfigError
    naming it. A rerun resumes, however ``data`` and ``result`` are spelled (relative, absolute, ``~``). Failed ranks
    raise IncompleteRunError unless ``allow_failures=True``.

    ``task_timeout``: seconds a rank may run before it is failed by name and its worker killed; None or
    ``"auto"`` derives it from the measured time per row with a wide margin, 0 or ``"none"`` means no timeout.
    ``allow_unsafe_lease``: accept an S3 server that ignores conditional writes, where two runs on one result
    path are not excluded."""
    from .runners import get_runner
    from .runners.registry import runner_options

    values = {"data": data, "model": model, "weights": weights, "mode": mode, "task_timeout": task_timeout,
              **options}
    if allow_unsafe_lease:
        values["allow_unsafe_lease"] = allow_unsafe_lease
    if result is not None:
        values["result"] = result
    values = {k: v for k, v in values.items() if v is not None}
    own = {k: values.pop(k) for k in runner_options(backend) if k in values}
    runner = get_runner(backend, **own)
    try:
        return runner.run(values, progress=progress, report=report)
    finally:
        runner.close()


class NotFinishedError(DataError):
    """A result path that holds no finished run: nothing there, not a run folder, or planned but not summarized."""


def open(result: str) -> RunResult:  # noqa: A001 - cosmicai.open, as in the docs
    """The finished run under ``result`` (a local path or ``s3://`` URL), read only: nothing is written and no
    lease is taken, so a read-only folder or bucket will do. ``summary.json`` is read now, the predictions when
    asked for (``RunResult.predictions()``).

    Raises NotFinishedError, naming what the folder is, when it holds no finished run (no plan, or planned but
    not summarized: ``cai run`` finishes it). A summarized run whose ranks failed opens; ``complete`` is False.
    """
    from .config import canonical_url
    from .results import RunFolder

    url = canonical_url(result, "result")
    folder = RunFolder(url)
    summary_url, plan_url = folder.summary, folder.plan
    plan = storage.read_json(plan_url) if storage.exists(plan_url) else None
    if not storage.exists(summary_url):
        raise NotFinishedError(_not_finished(url, plan))
    summary = storage.read_json(summary_url)
    if not isinstance(summary, dict) or not isinstance(summary.get("completeness"), dict):
        raise DataError(f"{summary_url}: not a cosmicai summary (no 'completeness'); it was not written by `cai run`")
    if isinstance(plan, dict) and plan.get("plan_hash") not in (None, summary.get("plan_hash")):
        raise NotFinishedError(_not_finished(url, plan, stale=True))
    return RunResult(url, summary)


def _not_finished(url: str, plan: Any, stale: bool = False) -> str:
    """One line saying what ``url`` holds instead of a finished run, and what to do."""
    from .results import RunFolder

    folder = RunFolder(url)
    if plan is None:
        if not storage.exists(url):
            return f"{url}: no such folder; give the --result of a finished `cai run`"
        from .data.formats import MANIFEST_NAME

        if storage.exists(storage.join(url, MANIFEST_NAME)):
            return f"{url}: a dataset (manifest.json), not a run; give the --result of a finished `cai run`"
        found = len(storage.list_files(url))
        return (f"{url}: not a run (no plan.json or summary.json; {found} other file(s)); give the --result "
                f"of a finished `cai run`")
    if not isinstance(plan, dict) or not isinstance(plan.get("config"), dict):
        return f"{url}/plan.json: not a cosmicai plan; give the --result of a finished `cai run`"
    ranks = plan.get("world_size")
    done = sum(1 for u in storage.list_files(folder.ranks_dir, suffixes=".json"))
    state = "re-planned since its summary.json was written" if stale else "planned but not summarized"
    lease = ""
    if storage.exists(folder.lease):
        from .pipeline.lease import describe

        try:
            info = storage.read_json(folder.lease)
            lease = f"; a run holds it now ({describe(info) if isinstance(info, dict) else 'lease.json'})"
        except CaiError:
            lease = "; a run holds its lease.json now"
    return (f"{url}: {state} ({done}/{ranks} rank(s) done{lease}): run `cai run --data "
            f"{plan['config'].get('data')} --result {url}` to finish it, or `cai report {url}` after")


def load_model(name: str = "astromae-demo", weights: str | None = None, **kwargs: Any):
    """A loaded model (``predict(images, magnitudes, batch_size)``); see ``cosmicai.models.registry.load_model``."""
    from .models.registry import load_model as _load

    return _load(name, weights=weights, **kwargs)


def predict(images: Any, magnitudes: Any, *, model: str = "astromae-demo", weights: str | None = None,
            mode: str = "exact", device: str = "cpu", batch_size: int = 512, threads: int | None = None
            ) -> np.ndarray:
    """Redshifts (float32, one per row; NaN for rows with non-finite inputs) for raw images [N, 5, 32, 32] and
    magnitudes [N, 5] already in memory. The model is loaded once per process and (model, weights, mode, device,
    threads), in the worker's model state (``models.worker``)."""
    from .models.worker import worker_models

    predictor = worker_models().get(model, weights, device, mode, threads=threads)[0]
    return predictor.predict(images, magnitudes, batch_size=batch_size)
