"""CAI-compatible result tables (``result_stats.csv``, ``batch_varying_results.csv``) and our ``cai_runs.csv``.

A result tree is laid out like the original's::

    ROOT/result-partition-<P>MB/<size>/<run>/combined_data.json                  (data-size sweep)
    ROOT/result-partition-<P>MB/<size>/Batches/<batch>/<run>/combined_data.json  (batch-size sweep)

``<size>`` is ``1GB``, ``total`` (the whole dataset) or ``total<N>GB``; ``<run>`` is ``1`` or ``run 1``.
Per run, the original aggregated its per-rank records as follows (reproduced to the cent here):

* ``total_cpu_time (seconds)``: mean of the per-rank values left after dropping those outside
  [Q1 - 1.5 IQR, Q3 + 1.5 IQR] (bounds inclusive), quartiles by linear interpolation (numpy/pandas default);
* ``total_cpu_memory (MB)`` and ``throughput_bps``: sums over all ranks (no outlier removal);
* ``total_bits``: sum over all ranks of ``throughput_bps x total_cpu_time`` (each rank's own bits);
* a ``mean`` row per group (mean of the run rows); every value rounded to 2 decimals.
"""

from __future__ import annotations

import csv
import io
import math
import os
import re
from dataclasses import dataclass, field
from typing import Any, Iterable, Sequence

import numpy as np

from .. import storage
from ..errors import DataError
from ..lambda_limits import MAX_MEMORY_MB
from ..results import BATCHES_DIR, COMBINED_NAME, PARTITION_DIR, RUN_DIR, SIZE_DIR, SUMMARY_NAME, RunFolder

CPU_TIME = "total_cpu_time (seconds)"
CPU_MEMORY = "total_cpu_memory (MB)"
THROUGHPUT = "throughput_bps"
TOTAL_BITS = "total_bits"
RESULT_STATS_COLUMNS = ["partition (MB)", "data (GB)", "run", CPU_TIME, CPU_MEMORY, THROUGHPUT, TOTAL_BITS]
BATCH_COLUMNS = ["batch_size", "run", CPU_TIME, CPU_MEMORY, THROUGHPUT, TOTAL_BITS]
LOG_COLUMNS = ["partition (MB)", "data (GB)", "batch_size", "batch_varying", "run", "num_worlds",
               "total_duration (s)", "inference_duration (s)"]
ADJUSTED_EXTRA = ["num_worlds", "total_duration (s)", "inference_duration (s)"]
BITS_PER_GIB = 8 * 1024**3

_PARTITION_DIR, _SIZE_DIR, _RUN_DIR = PARTITION_DIR, SIZE_DIR, RUN_DIR  # the experiment tree (results.py)
_TO_MB = {"KB": 1 / 1024, "MB": 1.0, "GB": 1024.0, "TB": 1024.0**2}


@dataclass
class RunStats:
    """One run's aggregate over its per-rank records."""

    partition_mb: float
    size_label: str
    run: str
    batch_size: int | None
    path: str
    ranks: int
    cpu_time: float
    cpu_memory: float
    throughput: float
    total_bits: float
    kept_ranks: int
    records: list[dict[str, Any]] = field(default_factory=list, repr=False)
    data_gb: float = math.nan


def iqr_mask(values: Sequence[float], k: float = 1.5) -> np.ndarray:
    """Boolean mask of values inside [Q1 - k IQR, Q3 + k IQR] (linear-interpolated quartiles, inclusive)."""
    arr = np.asarray(values, dtype=float)
    if arr.size == 0:
        return np.zeros(0, dtype=bool)
    q1, q3 = np.percentile(arr, [25, 75])
    iqr = q3 - q1
    return (arr >= q1 - k * iqr) & (arr <= q3 + k * iqr)


def _number(rec: dict[str, Any], key: str, source: str) -> float:
    value = rec.get(key)
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value):
        raise DataError(f"{source}: '{key}' is {value!r}, expected a finite number")
    return float(value)


def aggregate_records(records: list[dict[str, Any]], source: str = COMBINED_NAME) -> dict[str, float]:
    """The original's per-run aggregate of per-rank records (see the module docstring)."""
    if not isinstance(records, list) or not records:
        raise DataError(f"{source}: expected a non-empty list of per-rank records")
    times, mems, thr = [], [], []
    for i, rec in enumerate(records):
        if not isinstance(rec, dict):
            raise DataError(f"{source}[{i}]: expected a JSON object, got {type(rec).__name__}")
        times.append(_number(rec, CPU_TIME, f"{source}[{i}]"))
        mems.append(_number(rec, CPU_MEMORY, f"{source}[{i}]"))
        thr.append(_number(rec, THROUGHPUT, f"{source}[{i}]"))
    t, th = np.asarray(times), np.asarray(thr)
    keep = iqr_mask(t)
    return {CPU_TIME: float(t[keep].mean()), CPU_MEMORY: math.fsum(mems), THROUGHPUT: math.fsum(thr),
            TOTAL_BITS: math.fsum(th * t), "kept_ranks": int(keep.sum()), "ranks": len(records)}


def _mb(m: re.Match) -> float:
    return float(m.group(1)) * _TO_MB[m.group(2)]


def _classify(rel_parts: list[str]) -> tuple[float, str, int | None, str] | None:
    """(partition MB, size label, batch size or None, run) from a path relative to the root, or None."""
    for i, part in enumerate(rel_parts):
        m = _PARTITION_DIR.match(part)
        if not m:
            continue
        rest = rel_parts[i + 1:]
        if len(rest) == 2 and _SIZE_DIR.match(rest[0]) and _RUN_DIR.match(rest[1]):
            return _mb(m), rest[0], None, _RUN_DIR.match(rest[1]).group(1)
        if (len(rest) == 4 and _SIZE_DIR.match(rest[0]) and rest[1].lower() == BATCHES_DIR
                and rest[2].isdigit() and _RUN_DIR.match(rest[3])):
            return _mb(m), rest[0], int(rest[2]), _RUN_DIR.match(rest[3]).group(1)
    return None


def classify_url(url: str) -> tuple[float, str, int | None, str] | None:
    """Where a run's ``.../combined_data.json`` (or run folder) sits in an original-style tree, or None."""
    parts = url.rstrip("/").split("/")
    if parts[-1] == COMBINED_NAME:
        parts = parts[:-1]
    for start in range(len(parts) - 1, -1, -1):  # the innermost result-partition-* folder wins
        if _PARTITION_DIR.match(parts[start]):
            return _classify(parts[start:])
    return None


def find_runs(root: str) -> list[RunStats]:
    """Every run under ``root`` laid out like the original's, aggregated; DataError if there is none."""
    files = storage.list_files(root, suffixes=COMBINED_NAME, recursive=True)
    runs = []
    for url in files:
        where = classify_url(url)
        if where is None:
            continue
        partition_mb, size_label, batch, run = where
        records = storage.read_json(url)
        agg = aggregate_records(records, url)
        runs.append(RunStats(partition_mb, size_label, run, batch, url.rsplit("/", 1)[0], agg["ranks"],
                             agg[CPU_TIME], agg[CPU_MEMORY], agg[THROUGHPUT], agg[TOTAL_BITS],
                             agg["kept_ranks"], records))
    if not runs:
        raise DataError(f"{root}: no result-partition-<P>MB/<size>/<run>/combined_data.json found")
    _assign_sizes(runs)
    return runs


def _assign_sizes(runs: list[RunStats]) -> None:
    """Data size in GB per run: from the folder name (``4GB``, ``total100GB``), or for ``total`` the GiB of
    input bits the run processed (the original's 12.6 for its whole dataset), rounded to 0.1."""
    totals: dict[tuple[float, str], float] = {}
    for r in runs:
        m = _SIZE_DIR.match(r.size_label)
        if m and m.group(1):
            r.data_gb = _mb(m) / 1024.0
        else:
            key = (r.partition_mb, r.size_label)
            totals[key] = max(totals.get(key, 0.0), r.total_bits)
    for r in runs:
        if math.isnan(r.data_gb):
            r.data_gb = round(totals[(r.partition_mb, r.size_label)] / BITS_PER_GIB, 1)


def _fmt_num(x: float) -> str:
    """A number written the way pandas wrote the original CSVs (``5.6``, ``8601655680.0``, ``25``)."""
    if isinstance(x, int):
        return str(x)
    return repr(float(round(x, 2)))


def _fmt_partition(p: float) -> str:
    return str(int(p)) if float(p).is_integer() else repr(p)


def _run_key(run: str) -> tuple:
    return (0, int(run)) if run.isdigit() else (1, run)


def _group_rows(groups: dict[tuple, list[RunStats]], key_cells, extra=None) -> list[list[str]]:
    rows = []
    for key in sorted(groups):
        members = sorted(groups[key], key=lambda r: _run_key(r.run))
        vals = []
        for r in members:
            v = [r.cpu_time, r.cpu_memory, r.throughput, r.total_bits] + (extra(r) if extra else [])
            vals.append(v)
            rows.append(key_cells(key) + [r.run] + [_fmt_num(x) for x in v])
        mean = np.mean(np.asarray(vals, dtype=float), axis=0)
        rows.append(key_cells(key) + ["mean"] + [_fmt_num(float(x)) for x in mean])
    return rows


def result_stats_rows(runs: Iterable[RunStats]) -> list[list[str]]:
    """Rows of ``result_stats.csv`` (data-size sweep runs only), ordered by partition, size, run."""
    groups: dict[tuple, list[RunStats]] = {}
    for r in runs:
        if r.batch_size is None:
            groups.setdefault((r.partition_mb, r.data_gb), []).append(r)
    return _group_rows(groups, lambda k: [_fmt_partition(k[0]), repr(float(k[1]))])


def batch_groups(runs: Iterable[RunStats]) -> dict[tuple[float, float], list[RunStats]]:
    """Batch-size sweep runs grouped by (partition MB, data GB)."""
    out: dict[tuple[float, float], list[RunStats]] = {}
    for r in runs:
        if r.batch_size is not None:
            out.setdefault((r.partition_mb, r.data_gb), []).append(r)
    return out


def batch_rows(runs: Iterable[RunStats]) -> list[list[str]]:
    """Rows of ``batch_varying_results.csv`` for one sweep, ordered by batch size then run."""
    groups: dict[tuple, list[RunStats]] = {}
    for r in runs:
        groups.setdefault((r.batch_size,), []).append(r)
    return _group_rows(groups, lambda k: [str(k[0])])


# --- stage durations (state_machine_logs.csv) and the adjusted tables ------------------------------

def read_state_logs(url: str) -> list[dict[str, Any]]:
    """Rows of a ``state_machine_logs.csv`` (the original's columns), typed."""
    text = storage.read_bytes(url).decode()
    reader = csv.DictReader(io.StringIO(text))
    missing = [c for c in LOG_COLUMNS if c not in (reader.fieldnames or [])]
    if missing:
        raise DataError(f"{url}: missing column(s) {missing}; expected {LOG_COLUMNS}")
    out = []
    for i, row in enumerate(reader, start=2):
        try:
            out.append({"partition_mb": float(row["partition (MB)"]), "data_gb": float(row["data (GB)"]),
                        "batch_size": int(row["batch_size"]),
                        "batch_varying": row["batch_varying"].strip().lower() == "true",
                        "run": str(row["run"]).strip(), "num_worlds": int(float(row["num_worlds"])),
                        "total_duration": float(row["total_duration (s)"]),
                        "inference_duration": float(row["inference_duration (s)"])})
        except (TypeError, ValueError) as exc:
            raise DataError(f"{url}: line {i} is malformed ({exc})") from exc
    return out


def _log_for(run: RunStats, logs: list[dict[str, Any]]) -> dict[str, Any] | None:
    for log in logs:
        if (log["partition_mb"] == run.partition_mb and log["data_gb"] == run.data_gb and log["run"] == run.run
                and log["batch_varying"] == (run.batch_size is not None)
                and (run.batch_size is None or log["batch_size"] == run.batch_size)):
            return log
    return None


def adjusted(runs: list[RunStats], logs: list[dict[str, Any]]) -> list[RunStats]:
    """Runs with a matching stage-duration row, their throughput re-based on the inference (map) duration:
    throughput_bps = total_bits / inference duration (s)."""
    out = []
    for r in runs:
        log = _log_for(r, logs)
        if log is None or log["inference_duration"] <= 0:
            continue
        a = RunStats(**{**r.__dict__})
        a.throughput = r.total_bits / log["inference_duration"]
        a.log = log  # type: ignore[attr-defined]
        out.append(a)
    return out


def _log_extra(r: RunStats) -> list[float]:
    log = r.log  # type: ignore[attr-defined]
    return [log["num_worlds"], log["total_duration"], log["inference_duration"]]



def write_csv(path_url: str, header: list[str], rows: list[list[str]]) -> str:
    """Write a CSV atomically through storage; returns its URL."""
    buf = io.StringIO()
    writer = csv.writer(buf)  # the csv module's \r\n, as the original CSVs
    writer.writerow(header)
    writer.writerows(rows)
    storage.write_bytes(path_url, buf.getvalue().encode())
    return path_url


def write_tables(root: str, out: str, batch_group: tuple[float, float] | None = None,
                 logs_url: str | None = None) -> dict[str, Any]:
    """Write the CAI tables for the trees under ``root`` into ``out``; returns what was written.

    ``batch_varying_results.csv`` holds one sweep (``batch_group`` = (partition MB, data GB); default the
    smallest partition, then the smallest data size - the original's 25 MB / 1 GB); every sweep is also
    written to ``batch_varying_all.csv`` with partition and data columns in front. Stage durations come from
    ``logs_url`` or a ``state_machine_logs.csv`` in ``root`` or ``root/results``; with them the adjusted
    tables are written too.
    """
    runs = find_runs(root)
    written: dict[str, Any] = {"runs": len(runs), "files": []}
    stats_rows = result_stats_rows(runs)
    if stats_rows:
        written["files"].append(write_csv(storage.join(out, "result_stats.csv"), RESULT_STATS_COLUMNS, stats_rows))
    groups = batch_groups(runs)
    if groups:
        if batch_group is None:
            batch_group = min(groups)
        if batch_group not in groups:
            raise DataError(f"{root}: no batch-size sweep for partition {batch_group[0]} MB, data "
                            f"{batch_group[1]} GB; found {sorted(groups)}")
        written["batch_group"] = batch_group
        written["files"].append(write_csv(storage.join(out, "batch_varying_results.csv"), BATCH_COLUMNS,
                                          batch_rows(groups[batch_group])))
        all_rows = []
        for key in sorted(groups):
            for row in batch_rows(groups[key]):
                all_rows.append([_fmt_partition(key[0]), repr(float(key[1]))] + row)
        written["files"].append(write_csv(storage.join(out, "batch_varying_all.csv"),
                                          ["partition (MB)", "data (GB)"] + BATCH_COLUMNS, all_rows))
    logs_url = logs_url or _find_logs(root)
    logs = read_state_logs(logs_url) if logs_url else []
    logs += [log for log in _logs_from_summaries(runs) if _log_for_key(log) not in {_log_for_key(x) for x in logs}]
    if logs:
        adj = adjusted(runs, logs)
        size_adj = [r for r in adj if r.batch_size is None]
        if size_adj:
            groups_s: dict[tuple, list[RunStats]] = {}
            for r in size_adj:
                groups_s.setdefault((r.partition_mb, r.data_gb), []).append(r)
            rows = _group_rows(groups_s, lambda k: [_fmt_partition(k[0]), repr(float(k[1]))], _log_extra)
            written["files"].append(write_csv(storage.join(out, "result_stats_adjusted.csv"),
                                              RESULT_STATS_COLUMNS + ADJUSTED_EXTRA, rows))
        batch_adj = [r for r in adj if r.batch_size is not None and (r.partition_mb, r.data_gb) == batch_group]
        rows = []
        if batch_adj:
            groups_b: dict[tuple, list[RunStats]] = {}
            for r in batch_adj:
                groups_b.setdefault((r.batch_size,), []).append(r)
            rows = _group_rows(groups_b, lambda k: [str(k[0])], _log_extra)
        if groups:
            written["files"].append(write_csv(storage.join(out, "batch_varying_adjusted.csv"),
                                              BATCH_COLUMNS + ADJUSTED_EXTRA, rows))
    written["logs"] = len(logs)
    return written


def _log_for_key(log: dict[str, Any]) -> tuple:
    return (log["partition_mb"], log["data_gb"], log["batch_size"], log["batch_varying"], log["run"])


def _find_logs(root: str) -> str | None:
    for cand in (storage.join(root, "state_machine_logs.csv"), storage.join(root, "results", "state_machine_logs.csv")):
        if storage.exists(cand):
            return cand
    return None


def stage_durations(summary: dict[str, Any]) -> tuple[float | None, float | None]:
    """(whole-run wall seconds = plan + map (+ summarize when recorded) stages, map-stage wall seconds) from
    one of our ``summary.json`` documents or run summaries; None where unknown."""
    stages = summary.get("stages") or {}
    map_s = summary.get("map_wall_s")
    if map_s is None:
        map_s = stages.get("map_s")
    parts = [stages.get(k) for k in ("plan_s", "map_s", "summarize_s")]
    # summary.json is written inside the summarize stage, so it may lack summarize_s: sum what is known.
    known = [float(v) for v in parts if isinstance(v, (int, float))]
    total = math.fsum(known) if isinstance(stages.get("map_s"), (int, float)) else None
    if isinstance(stages.get("total_s"), (int, float)):  # measured around a whole execution (AWS)
        total = stages["total_s"]
    return (float(total) if total is not None else None, float(map_s) if map_s is not None else None)


def _logs_from_summaries(runs: list[RunStats]) -> list[dict[str, Any]]:
    """state_machine_logs-style rows for our runs (those with a summary.json)."""
    out = []
    for r in runs:
        url = RunFolder(r.path).summary
        if not storage.exists(url):
            continue
        total, map_s = stage_durations(storage.read_json(url))
        if total is None or map_s is None:
            continue
        out.append({"partition_mb": r.partition_mb, "data_gb": r.data_gb,
                    "batch_size": r.batch_size or _batch_of(r), "batch_varying": r.batch_size is not None,
                    "run": r.run, "num_worlds": r.ranks, "total_duration": total, "inference_duration": map_s})
    return out


def _batch_of(r: RunStats) -> int:
    sizes = {rec.get("batch_size") for rec in r.records if isinstance(rec.get("batch_size"), int)}
    return sizes.pop() if len(sizes) == 1 else 0


# --- our runs: cai_runs.csv ---------------------------------------------------------------------------

CAI_RUNS_COLUMNS = ["result_path", "partition (MB)", "data (GB)", "batch_size", "run", "ranks", "rows",
                    "distinct_samples", "map_wall_s", "total_wall_s", "throughput_bps", "samples_per_s",
                    "fetch_s", "decode_s", "model_load_s", "inference_s", "write_s", "wait_s", "peak_rss_mb",
                    "cold_starts", "lambda_cost_usd", "lambda_memory_mb", "complete"]


def distinct_samples(data_url: str | None) -> int | None:
    """Distinct source samples behind a dataset: from a resampled dataset's ``resample.json``, else its rows."""
    if not data_url:
        return None
    info_url = storage.join(data_url, "resample.json")
    if storage.exists(info_url):
        return int(storage.read_json(info_url)["distinct_samples"])
    return None


def cai_run_row(run_url: str, memory_mb: float = MAX_MEMORY_MB) -> list[str]:
    """One ``cai_runs.csv`` row for our run at ``run_url`` (it has summary.json and combined_data.json).

    Honest throughput = input bits / map-stage wall time; phase seconds are summed over ranks; the Lambda cost
    bills each rank's wall time (rounded up to 1 ms) at ``memory_mb``.
    """
    from .cost import cost_from_records

    folder = RunFolder(run_url)
    summary = storage.read_json(folder.summary)
    records = storage.read_json(folder.combined)
    where = classify_url(run_url) or (None, "", None, "")
    partition_mb, size_label, batch, run = where
    data_gb = ""
    m = _SIZE_DIR.match(size_label) if size_label else None
    if m and m.group(1):
        data_gb = repr(_mb(m) / 1024.0)
    total, map_s = stage_durations(summary)
    rows = summary.get("rows")
    phases = summary.get("phases_total_s") or {}
    comp = summary.get("completeness") or {}
    cost = cost_from_records(records, memory_mb, source=folder.combined) \
        if records else None
    distinct = distinct_samples(summary.get("data_url"))
    if distinct is None and rows is not None:
        distinct = rows

    def num(x: Any, nd: int = 4) -> str:
        return "" if x is None else (str(x) if isinstance(x, int) else repr(round(float(x), nd)))

    return [run_url, "" if partition_mb is None else _fmt_partition(partition_mb), data_gb,
            str(batch or summary.get("batch_size") or ""), run, num(len(records)), num(rows), num(distinct),
            num(map_s), num(total), num(summary.get("throughput_bps"), 1), num(summary.get("samples_per_s"), 2),
            *(num(phases.get(p)) for p in ("fetch", "decode", "model_load", "inference", "write", "wait")),
            num(summary.get("peak_rss_mb"), 1), num(summary.get("cold_starts")),
            num(cost["total"] if cost else None, 8), num(memory_mb, 1), str(bool(comp.get("complete")))]


def write_cai_runs(root: str, out: str, memory_mb: float = MAX_MEMORY_MB) -> str | None:
    """Write ``cai_runs.csv`` for every run of ours (a folder with summary.json) under ``root``; None if none."""
    urls = storage.list_files(root, suffixes=SUMMARY_NAME, recursive=True)
    runs = [u.rsplit("/", 1)[0] for u in urls if u.endswith("/" + SUMMARY_NAME)]
    runs = [u for u in runs if storage.exists(RunFolder(u).combined)]
    if not runs:
        return None
    rows = [cai_run_row(u, memory_mb) for u in runs]
    return write_csv(storage.join(out, "cai_runs.csv"), CAI_RUNS_COLUMNS, rows)


# --- tables on the terminal -----------------------------------------------------------------------------

def _cell(fmt: str, scale: float = 1.0):
    def render(text: str) -> str:
        try:
            return format(float(text) * scale, fmt)
        except ValueError:
            return text
    return render


_AS_IS = str
_TREE_VIEW = [("partition (MB)", "partition MB", _AS_IS), ("data (GB)", "data GB", _AS_IS),
              ("batch_size", "batch", _AS_IS), ("run", "run", _AS_IS),
              (CPU_TIME, "rank time s", _cell(".2f")), (CPU_MEMORY, "memory MB", _cell(".0f")),
              (THROUGHPUT, "throughput Mbit/s", _cell(".1f", 1e-6)),
              (TOTAL_BITS, "data GiB", _cell(".3f", 1 / BITS_PER_GIB)),
              ("num_worlds", "ranks", _cell(".0f")), ("total_duration (s)", "total s", _cell(".2f")),
              ("inference_duration (s)", "map s", _cell(".2f"))]
_RUNS_VIEW = [("result_path", "run", _AS_IS), ("rows", "rows", _AS_IS), ("ranks", "ranks", _AS_IS),
              ("map_wall_s", "map s", _cell(".2f")), ("total_wall_s", "total s", _cell(".2f")),
              ("samples_per_s", "samples/s", _cell(".1f")), ("throughput_bps", "Mbit/s", _cell(".2f", 1e-6)),
              ("inference_s", "inference s", _cell(".2f")), ("peak_rss_mb", "peak MB", _cell(".0f")),
              ("lambda_cost_usd", "Lambda $", _cell(".6f")), ("complete", "complete", _AS_IS)]
#: Per CSV: its title on the terminal, and whether only the ``mean`` row of each group is shown.
TABLE_TITLES = {"result_stats.csv": ("data-size sweep, mean over runs (original aggregation)", True),
                "batch_varying_results.csv": ("batch-size sweep, mean over runs", True),
                "batch_varying_all.csv": ("every batch-size sweep, mean over runs", True),
                "result_stats_adjusted.csv": ("data-size sweep, throughput over the map stage, mean over runs", True),
                "batch_varying_adjusted.csv": ("batch-size sweep, throughput over the map stage, mean over runs", True),
                "cai_runs.csv": ("our runs", False)}


def format_table(header: list[str], rows: list[list[str]]) -> str:
    """Rows under a header, columns right-aligned to their widest cell (the first column left-aligned)."""
    widths = [max(len(r[i]) for r in [header, *rows]) for i in range(len(header))]
    lines = []
    for row in [header, *rows]:
        cells = [c.ljust(w) if i == 0 else c.rjust(w) for i, (c, w) in enumerate(zip(row, widths))]
        lines.append("  ".join(cells).rstrip())
    return "\n".join(lines)


def table_text(url: str, root: str | None = None) -> str:
    """A compact view of one CSV written by ``cai stats``: a title line, then the important columns (the
    ``mean`` rows of the CAI tables; every run of ``cai_runs.csv``, named relative to ``root``)."""
    name = storage.basename(url)
    title, means_only = TABLE_TITLES.get(name, (name, False))
    reader = csv.reader(io.StringIO(storage.read_bytes(url).decode()))
    header = next(reader, [])
    rows = [dict(zip(header, r)) for r in reader]
    if means_only and any(r.get("run") == "mean" for r in rows):
        rows = [r for r in rows if r.get("run") == "mean"]
    view = [v for v in (_RUNS_VIEW if name == "cai_runs.csv" else _TREE_VIEW) if v[0] in header]
    if means_only:
        view = [v for v in view if v[0] != "run"]
    local = storage.local_path(root) if root else None
    prefixes = [p.rstrip("/") + "/" for p in ([root] if root else []) + ([os.path.abspath(local)] if local else [])]

    def render(col: str, fn, value: str) -> str:
        for prefix in prefixes if col == "result_path" else ():
            if value.startswith(prefix):
                return value[len(prefix):]
            if value == prefix.rstrip("/"):
                return root.rstrip("/")
        return fn(value) if value != "" else "-"

    body = [[render(col, fn, r.get(col, "")) for col, _, fn in view] for r in rows]
    text = format_table([h for _, h, _ in view], body) if body else "(no rows)"
    return f"{name}: {title}\n{text}"
