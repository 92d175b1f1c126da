"""The results contract: what a run leaves under its result URL, what each file holds, and the experiment
(bench) tree that holds many runs. Every stage, backend and analysis reads these names from here.

A run's result folder::

    plan.json  plan_hash.json  tasks.json   written by plan (tasks.json: the backend's task items;
    task_digests.txt                       task_digests.txt: each item's sha256, one line per rank)
    lease.json                              held while a run is going (pipeline/lease.py)
    ranks/<rank>.json                       one RankRecord per rank, written last (it marks the rank done)
    predictions/<rank>.parquet              the rank's predictions (PREDICTION_COLUMNS; ``flag``: do not trust
                                            the row: non-finite or out-of-range inputs, or an overflow;
                                            ``outside_training_range``: z_pred outside the redshift range the
                                            weights were trained on), then the dataset's catalogue columns
    errors/<rank>.json                      why a rank failed (ErrorReport)
    fast_check/<key>.json                   the fast-mode check, measured once per weights, engine and CPU
    run.json                                the driver's stage timings
    combined_data.json                      every RankRecord, the original CAI's keys first
    predictions.parquet                     every prediction, in rank order
    summary.json                            the Summary

An experiment tree (``cai bench``, and the original's ``aws/stats.py`` layout)::

    <root>/result-partition-<P>MB/<size>/<run>/                      data-size sweep
    <root>/result-partition-<P>MB/<size>/batches/<batch>/<run>/      batch sweep
    <root>/results/state_machine_logs.csv                           stage durations of every run
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from typing import Any, TypedDict

from . import storage

PLAN_NAME = "plan.json"
PLAN_HASH_NAME = "plan_hash.json"
#: One 65-byte line per rank: the sha256 of the task item the plan wrote for it (what a worker checks an item against).
TASK_DIGESTS_NAME = "task_digests.txt"
TASKS_NAME = "tasks.json"
LEASE_NAME = "lease.json"
RUN_NAME = "run.json"
COMBINED_NAME = "combined_data.json"
PREDICTIONS_NAME = "predictions.parquet"
SUMMARY_NAME = "summary.json"
RANKS_DIR = "ranks"
PREDICTIONS_DIR = "predictions"
ERRORS_DIR = "errors"
#: The fast-mode check, measured once per run and shared by its workers (keyed by weights, engine and CPU).
FAST_CHECK_DIR = "fast_check"

#: Files a run writes at its top level, and its per-rank folders (``--overwrite`` clears exactly these).
RESULT_FILES = (PLAN_NAME, PLAN_HASH_NAME, TASK_DIGESTS_NAME, TASKS_NAME, RUN_NAME, COMBINED_NAME, PREDICTIONS_NAME, SUMMARY_NAME)
RESULT_DIRS = (RANKS_DIR, PREDICTIONS_DIR, ERRORS_DIR, FAST_CHECK_DIR)

#: Columns of the predictions files, in this order (z_true only when the data has redshifts); the catalogue
#: columns a dataset carries (ra, dec, survey ids...) follow them. ``flag`` rows (untrusted inputs) are not scored;
#: ``outside_training_range`` rows (the model extrapolating; always False when the weights state no training
#: range) are scored like any other.
PREDICTION_COLUMNS = ("object_id", "partition", "row", "z_pred", "z_true", "flag", "outside_training_range")

# Rows whose inputs fall outside the two bounds below are flagged (``flag``), still predicted, not scored, and
# counted (``RankRecord.out_of_range``, ``Summary.out_of_range``).

#: AB magnitudes (ugriz) a galaxy can have: no galaxy but our own is brighter than 0 (the LMC is 0.9, and it does
#: not fit in a 12.7-arcsec stamp), and no survey measures anything fainter than 40 (SDSS reaches ~23, the Hubble
#: Ultra Deep Field ~30). Outside it a value is a sentinel (-9999, 99), a flux given as a magnitude, or garbage.
MAGNITUDE_RANGE = (0.0, 40.0)
#: |pixel| in nanomaggies (sky-subtracted, the training data's unit: docs/data.md) beyond which an image is far
#: outside what the model was trained on: training pixels span about -0.4 to 30, and the brightest galaxy its
#: selection admits (r = 14, z ~ 13.2) holds ~5,000 nanomaggies in its whole stamp. One pixel above 1e4 (~330x
#: the training maximum, a 12.5-mag point source) is a saturated star, raw counts, or garbage.
PIXEL_LIMIT = 1.0e4

#: The phases of a rank's time (``RankRecord.phases``, summed and averaged in the Summary).
PHASES = ("fetch", "decode", "model_load", "fast_check", "inference", "write", "wait")

#: The original CAI per-rank record keys, first in every record (their meanings are in docs/pipeline.md).
ORIGINAL_KEYS = ("total_cpu_time (seconds)", "total_cpu_memory (MB)", "execution_time (seconds/batch)",
                 "num_batches", "batch_size", "device", "throughput_bps", "sample_persec", "result_path",
                 "data_path")

#: Experiment-tree folder names (see the module docstring), matched with ``.match``: the original's trees also
#: name sizes ``total12.6GB`` / ``total`` and runs ``run_1``.
SIZE_UNIT = r"(\d+(?:\.\d+)?)(KB|MB|GB|TB)"
PARTITION_DIR = re.compile(rf"result-partition-{SIZE_UNIT}$")
SIZE_DIR = re.compile(rf"(?:total)?{SIZE_UNIT}$|total$")
RUN_DIR = re.compile(r"(?:run[ _-]?)?(\d+)$")
BATCHES_DIR = "batches"
#: The experiment's stage durations, where the original's ``aws/stats.py`` reads them (run from ROOT).
LOGS_NAME = "state_machine_logs.csv"
LOGS_DIR = "results"


_OriginalRecord = TypedDict("_OriginalRecord", {
    "total_cpu_time (seconds)": float, "total_cpu_memory (MB)": float, "execution_time (seconds/batch)": float,
    "num_batches": int, "batch_size": int, "device": str, "throughput_bps": float, "sample_persec": float,
    "result_path": str, "data_path": str})


class RankRecord(_OriginalRecord):
    """``ranks/<rank>.json``: the original's keys, then ours."""

    rank: int
    rows: int
    partitions: list[str]
    partition_rows: dict[str, int]
    nonfinite_rows: int
    nonfinite_predictions: dict[str, int]
    out_of_range_rows: int
    out_of_range: dict[str, Any]
    outside_training_range: dict[str, Any]  # {"rows", "by_partition", "range": [z_min, z_max] or None}
    phases: dict[str, float]
    peak_rss_mb: float
    cold_start: bool
    cpu: dict[str, Any]
    model: str
    weights: dict[str, Any] | None  # registry.weights_card: file, sha256, origin, trained_on, caveat, training_range
    mode: str
    mode_used: str
    fast_check: dict[str, Any] | None
    plan_hash: str
    predictions_bytes: int
    started_at: str
    finished_at: str
    error: None


class ErrorReport(TypedDict, total=False):
    """``errors/<rank>.json``."""

    rank: int
    partitions: list[str]
    error_type: str
    message: str
    traceback: str | None
    plan_hash: str
    recorded_by: str
    host: str
    pid: int
    started_at: str
    failed_at: str
    remedy: str  # "restore": a changed or damaged partition (a rerun alone fails the same way)
    damaged_partition: str


class Completeness(TypedDict):
    """``Summary.completeness``: every planned rank, partition and row accounted for."""

    complete: bool
    ranks_planned: int
    ranks_done: int
    missing_ranks: list[int]
    failed_ranks: list[int]
    partitions_planned: int
    partitions_done: int
    rows_planned: int
    rows_in: int
    rows_out: int
    problems: list[str]


class Summary(TypedDict, total=False):
    """``summary.json`` (the keys every summary has; timing and mode keys are described in docs/pipeline.md)."""

    result_url: str
    data_url: str
    plan_hash: str
    model: str
    mode: str
    device: str
    batch_size: int
    world_size: int
    completeness: Completeness
    failures: list[dict[str, Any]]
    nonfinite_predictions: dict[str, Any]
    out_of_range: dict[str, Any]
    weights: dict[str, Any]  # the weights used (as RankRecord.weights; from the plan when no rank finished)
    outside_training_range: dict[str, Any]  # {"rows", "n_partitions", "partitions", "by_partition", "range", "known"}
    catalog_columns: list[str]
    duplicate_ids: dict[str, Any]
    metrics: dict[str, Any] | None


class RunFolder:
    """Every path of one run, under its result URL: the only place a run's file names are joined to it.

    ``RunFolder(url).summary`` is ``<url>/summary.json``; ``record(rank)``, ``prediction(rank)`` and ``error(rank)``
    are the per-rank files. Paths only: reading and writing stay with their owners (plan, infer, summarize, the
    runner, the lease).
    """

    def __init__(self, url: str):
        self.url = url

    def __repr__(self) -> str:
        return f"RunFolder({self.url!r})"

    def _file(self, name: str) -> str:
        return storage.join(self.url, name)

    plan = property(lambda self: self._file(PLAN_NAME), doc="plan.json")
    plan_hash = property(lambda self: self._file(PLAN_HASH_NAME), doc="plan_hash.json")
    tasks = property(lambda self: self._file(TASKS_NAME), doc="tasks.json: the backend's task items")
    task_digests = property(lambda self: self._file(TASK_DIGESTS_NAME), doc="task_digests.txt")
    lease = property(lambda self: self._file(LEASE_NAME), doc="lease.json")
    run = property(lambda self: self._file(RUN_NAME), doc="run.json: the driver's stage timings")
    combined = property(lambda self: self._file(COMBINED_NAME), doc="combined_data.json")
    predictions = property(lambda self: self._file(PREDICTIONS_NAME), doc="predictions.parquet")
    summary = property(lambda self: self._file(SUMMARY_NAME), doc="summary.json")
    ranks_dir = property(lambda self: self._file(RANKS_DIR), doc="ranks/")
    predictions_dir = property(lambda self: self._file(PREDICTIONS_DIR), doc="predictions/")
    errors_dir = property(lambda self: self._file(ERRORS_DIR), doc="errors/")
    fast_check_dir = property(lambda self: self._file(FAST_CHECK_DIR), doc="fast_check/")

    def record(self, rank: int) -> str:
        """``ranks/<rank>.json``: the rank's execution record (written last)."""
        return storage.join(self.url, RANKS_DIR, f"{int(rank)}.json")

    def prediction(self, rank: int) -> str:
        """``predictions/<rank>.parquet``: the rank's predictions."""
        return storage.join(self.url, PREDICTIONS_DIR, f"{int(rank)}.parquet")

    def error(self, rank: int) -> str:
        """``errors/<rank>.json``: why the rank failed."""
        return storage.join(self.url, ERRORS_DIR, f"{int(rank)}.json")

    def fast_check(self, key: str) -> str:
        """``fast_check/<key>.json``: a fast-mode check shared by the run's workers."""
        return storage.join(self.url, FAST_CHECK_DIR, f"{key}.json")

    def files(self) -> list[str]:
        """The run's top-level files (what ``--overwrite`` clears, with :meth:`dirs`)."""
        return [self._file(name) for name in RESULT_FILES]

    def dirs(self) -> list[str]:
        """The run's per-rank folders and the fast-check folder."""
        return [self._file(name) for name in RESULT_DIRS]


def rank_of(url: str) -> int | None:
    """The rank number in ``.../<rank>.json`` or ``.../<rank>.parquet``, or None for other names."""
    stem = storage.basename(url).split(".", 1)[0]
    return int(stem) if stem.isdigit() else None


@dataclass
class RunResult:
    """A finished run: ``summary`` (summary.json), ``metrics``, ``failures``, and the predictions on demand."""

    result_url: str
    summary: Summary
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

        data = storage.read_bytes(RunFolder(self.result_url).predictions)
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
