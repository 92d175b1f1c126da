"""Where a run's per-rank outputs live under its result URL, and the record's original CAI keys."""

from __future__ import annotations

from .. import storage

#: The original CAI per-rank record keys, first in every record (their meanings are in docs/pipeline.md).
ORIGINAL_KEYS = ("total_cpu_time (seconds)", "total_cpu_memory (MB)", "execution_time (seconds/batch)",
                 "num_batches", "batch_size", "device", "throughput_bps", "sample_persec", "result_path",
                 "data_path")
RANKS_DIR = "ranks"
PREDICTIONS_DIR = "predictions"
ERRORS_DIR = "errors"
RUN_NAME = "run.json"
COMBINED_NAME = "combined_data.json"
PREDICTIONS_NAME = "predictions.parquet"
SUMMARY_NAME = "summary.json"


def record_url(result_url: str, rank: int) -> str:
    """``ranks/<rank>.json``: the rank's execution record (written last)."""
    return storage.join(result_url, RANKS_DIR, f"{int(rank)}.json")


def predictions_url(result_url: str, rank: int) -> str:
    """``predictions/<rank>.parquet``: the rank's predictions."""
    return storage.join(result_url, PREDICTIONS_DIR, f"{int(rank)}.parquet")


def error_url(result_url: str, rank: int) -> str:
    """``errors/<rank>.json``: why the rank failed."""
    return storage.join(result_url, ERRORS_DIR, f"{int(rank)}.json")


def rank_of(url: str) -> int | None:
    """The rank number in ``.../<rank>.json`` or ``.../<rank>.parquet``, or None for other names."""
    stem = storage.basename(url).split(".", 1)[0]
    return int(stem) if stem.isdigit() else None
