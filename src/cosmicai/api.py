"""The Python API, for notebooks and scripts: ``run`` a model over a dataset on a backend and get a
:class:`RunResult`; ``open`` a finished run again; ``load_model``; ``predict`` on arrays already in memory.
Nothing here prints unless asked (``report=True``, ``progress=True``)."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import numpy as np

from . import storage
from .errors import CaiError, ConfigError, DataError

#: ``run`` options that go to the Step Functions runner, not into the run config.
AWS_OPTIONS = ("stack", "state_machine_arn", "endpoint", "region", "name", "upload", "poll_s", "timeout_s")


@dataclass
class RunResult:
    """A finished run: ``summary`` (summary.json), ``metrics``, ``failures``, and the predictions on demand."""

    result_url: str
    summary: dict[str, Any]
    execution_arn: str | None = None

    @property
    def metrics(self) -> dict[str, Any]:
        """Accuracy against the catalogue redshifts (MAE, MSE, Bias, Precision, R2, outlier_fraction, n)."""
        return dict(self.summary.get("metrics") or {})

    @property
    def failures(self) -> list[dict[str, Any]]:
        """One entry per failed rank, naming its partitions and the error (empty when every rank succeeded)."""
        return list(self.summary.get("failures") or [])

    @property
    def complete(self) -> bool:
        """Every rank succeeded and rows in == rows out."""
        return bool((self.summary.get("completeness") or {}).get("complete"))

    def predictions(self, columns: list[str] | None = None):
        """``predictions.parquet`` as a pyarrow Table (object_id, partition, row, z_pred, z_true, flag)."""
        import pyarrow as pa
        import pyarrow.parquet as pq

        from .results import PREDICTIONS_NAME

        data = storage.read_bytes(storage.join(self.result_url, PREDICTIONS_NAME))
        # One thread and an arrow buffer: pyarrow 26 can abort the interpreter at exit ("terminate called without an
        # active exception") after a threaded read, about one run in four here.
        return pq.read_table(pa.BufferReader(data), columns=columns, use_threads=False)

    def to_pandas(self, columns: list[str] | None = None):
        """The predictions as a pandas DataFrame (needs pandas)."""
        import importlib.util

        if importlib.util.find_spec("pandas") is None:  # pyarrow converts; pandas itself is the user's
            raise ImportError("RunResult.to_pandas needs pandas (pip install pandas); predictions() returns a "
                              "pyarrow Table without it")
        return self.predictions(columns).to_pandas()

    def __repr__(self) -> str:
        done = self.summary.get("completeness") or {}
        r2 = self.metrics.get("R2")
        return (f"RunResult({self.result_url!r}, complete={self.complete}, rows={done.get('rows_out')}, "
                f"ranks={done.get('ranks_done')}/{self.summary.get('world_size')}, "
                f"R2={'n/a' if r2 is None else f'{r2:.4f}'})")


def run(data: str, result: str | None = None, *, model: str = "astromae-demo", backend: str = "local",
        weights: str | None = None, mode: str = "exact", progress: bool = False, report: bool = False,
        task_timeout: float | str | None = None, allow_unsafe_lease: bool = False, **options: Any) -> RunResult:
    """Run ``model`` over the dataset at ``data`` and write everything under ``result``; returns the result.

    ``backend``: ``local`` (processes on this machine), ``dask`` (``scheduler=`` an address, or a local cluster),
    a registered one (``backends.base.register_backend`` or the ``cosmicai.backends`` entry points), or ``aws`` (the deployed Step Functions state machine: ``stack=`` or ``state_machine_arn=``, plus
    ``endpoint=``, ``region=``, ``name=``, ``upload=``, ``poll_s=``, ``timeout_s=``). Other ``options`` are run
    config keys (``batch_size``, ``world_size``, ``workers``, ``threads``, ``device``, ``allow_failures``,
    ``overwrite``, ...; see docs/pipeline.md); an unknown one raises ConfigError naming it. A rerun resumes, however
    ``data`` and ``result`` are spelled (relative, absolute, ``~``). Failed ranks raise IncompleteRunError unless
    ``allow_failures=True``.

    ``task_timeout``: seconds a rank may run before it is failed by name and its worker killed; None or
    ``"auto"`` derives it from the measured time per row with a wide margin, 0 or ``"none"`` means no timeout.
    ``allow_unsafe_lease``: accept an S3 server that ignores conditional writes, where two runs on one result
    path are not excluded."""
    from .config import load_config

    from .backends.base import available_backends

    if backend != "aws" and backend not in available_backends():
        raise ConfigError(f"backend '{backend}' is not known; choose one of "
                          f"{', '.join([*available_backends(), 'aws'])}")
    values = {"data": data, "model": model, "weights": weights, "mode": mode, "task_timeout": task_timeout,
              **options}
    if allow_unsafe_lease:
        values["allow_unsafe_lease"] = allow_unsafe_lease
    if result is not None:
        values["result"] = result
    values = {k: v for k, v in values.items() if v is not None}
    if backend == "aws":
        return _run_aws(values, report)
    from .runners.pipeline import run as run_pipeline

    config, _ = load_config({**values, "backend": backend})
    return RunResult(config.result, run_pipeline(config, progress=progress, report=report))


def _run_aws(values: dict[str, Any], report: bool) -> RunResult:
    from .runners.stepfunctions import run_on_stepfunctions
    from .config import load_config
    from .pipeline.summarize import IncompleteRunError

    runner = {k: values.pop(k) for k in AWS_OPTIONS if k in values}
    if "result" in values:
        load_config(values)  # a typo fails here, before an execution starts
    execution = run_on_stepfunctions(values, **runner)
    if execution.summary is None:
        raise IncompleteRunError(f"execution {execution.name} ended {execution.status.get('status')} "
                                 f"({execution.status.get('error')}) and wrote no summary under "
                                 f"{execution.result_url}")
    if report:
        from .runners.pipeline import format_report

        print(format_report(execution.summary))
    complete = (execution.summary.get("completeness") or {}).get("complete")
    if not complete and not values.get("allow_failures"):
        from .pipeline.summarize import incomplete_message

        raise IncompleteRunError(incomplete_message(execution.summary))
    return RunResult(execution.result_url, execution.summary, execution.arn)


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
    from .results import PLAN_NAME, SUMMARY_NAME

    url = canonical_url(result, "result")
    summary_url, plan_url = storage.join(url, SUMMARY_NAME), storage.join(url, PLAN_NAME)
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
    from .results import LEASE_NAME, RANKS_DIR

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
    done = sum(1 for u in storage.list_files(storage.join(url, RANKS_DIR), suffixes=".json"))
    state = "re-planned since its summary.json was written" if stale else "planned but not summarized"
    lease = ""
    if storage.exists(storage.join(url, LEASE_NAME)):
        from .pipeline.lease import describe

        try:
            info = storage.read_json(storage.join(url, LEASE_NAME))
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
    threads), in the pipeline's model cache."""
    from .pipeline.infer import get_model

    predictor = get_model(model, weights, device, mode, threads=threads)[0]
    return predictor.predict(images, magnitudes, batch_size=batch_size)
