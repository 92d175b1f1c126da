"""The authors' own analysis on our experiment trees: their ``aws/stats.py`` on a ``cai bench`` tree.

``aws/stats.py`` of github.com/mstaylor/AI-for-Astronomy (commit 100bcdcf69ac9d3fa8d2cb5baf73dc396b4b21de, its
last change) aggregates the result trees into ``result_stats.csv`` and ``batch_varying_results.csv``, then
adjusts both with the stage durations of ``state_machine_logs.csv``: ``adjust_throughput_stats`` merges on
``partition (MB)``, ``data (GB)`` and ``run``; ``adjust_throughput_batch_varying`` on ``batch_size`` and ``run``
after keeping the logs of its one data size. The sizes are matched by value, so a log written with 0.0999999996
for a ``0.1GB`` folder (read as 0.1 there) merges to nothing.

Their script uses pandas, which is not a dependency here, so its steps are rewritten below, fresh, in plain
Python with the pandas behaviour they rely on: ``read_csv``'s types (a column of whole numbers is int, one with
decimals float, ``True``/``False`` bool, anything else text), inner merges on equal keys, ``mean`` rows, sorting,
``round(2)`` and ``to_csv``'s numbers (an int column joined with float means becomes float: ``41.0``). Their
constants (partitions 25..100 MB, the batch sweep at 25 MB / 1 GB, the sweep batch 512) are parameters with
their values as defaults, so the small tree can use tiny sizes, and the paths are arguments (they read
``./result-partition-*`` and ``./results/state_machine_logs.csv`` and write into ``./results``, which is
where ``cai bench`` writes its log: their script runs from a bench ROOT as it is). The folder layout, the size parsing
(``float(label.replace('GB', ''))``, ``total`` = 12.6), the ``round(2)`` of every column (sizes included), the
column names and the merge keys are theirs.
``test_the_rewrite_reproduces_the_published_tables`` checks the rewrite against their published outputs.
"""

from __future__ import annotations

import csv
import json
import math
import re
from pathlib import Path

import numpy as np
import pytest

from cosmicai.simulator.calibrate import reference_dir
from cosmicai.cli import main

CPU_TIME, CPU_MEMORY, THROUGHPUT, TOTAL_BITS = ("total_cpu_time (seconds)", "total_cpu_memory (MB)",
                                                "throughput_bps", "total_bits")
KEYS = [CPU_TIME, CPU_MEMORY, THROUGHPUT]
DURATIONS = ["num_worlds", "total_duration (s)", "inference_duration (s)"]
REF = reference_dir() or Path("../shared/reference/cai")


# --- the pandas behaviour the script relies on ---------------------------------------------------------------

def _typed_column(cells: list[str]) -> list:
    if all(re.fullmatch(r"[+-]?\d+", c) for c in cells):
        return [int(c) for c in cells]
    try:
        return [float(c) if c else math.nan for c in cells]
    except ValueError:
        pass
    if all(c in ("True", "False") for c in cells):
        return [c == "True" for c in cells]
    return list(cells)


def read_csv(path: Path) -> tuple[list[str], list[dict]]:
    """``pd.read_csv``: the header and one dict per row, each column typed as a whole."""
    with open(path, newline="") as fh:
        header, *body = list(csv.reader(fh))
    columns = [_typed_column([row[i] for row in body]) for i in range(len(header))]
    return header, [dict(zip(header, values)) for values in zip(*columns)]


def _number(x) -> bool:
    return isinstance(x, (int, float, np.integer, np.floating)) and not isinstance(x, bool)


def concat(columns: list[str], *parts: list[dict]) -> list[dict]:
    """``pd.concat``: rows after rows; a column holding ints and floats becomes float."""
    rows = [dict(r) for part in parts for r in part]
    for c in columns:
        values = [r[c] for r in rows]
        if all(_number(v) for v in values) and any(isinstance(v, (float, np.floating)) for v in values):
            for r in rows:
                r[c] = float(r[c])
    return rows


def sort_rows(rows: list[dict], by: list[str]) -> list[dict]:
    """``sort_values``: numbers before text in a mixed column (``1, 2, 3, 'mean'``)."""
    return sorted(rows, key=lambda r: [(0, r[c], "") if _number(r[c]) else (1, 0, str(r[c])) for c in by])


def merge(left: list[dict], right: list[dict], on: list[str]) -> list[dict]:
    """``left.merge(right, on=...)``: an inner join on equal key values."""
    return [{**a, **{k: v for k, v in b.items() if k not in on}}
            for a in left for b in right if all(a[k] == b[k] for k in on)]


def mean_rows(rows: list[dict], by: list[str], columns: list[str]) -> list[dict]:
    """``groupby(by)[columns].mean().reset_index()``."""
    groups: dict[tuple, list[dict]] = {}
    for r in rows:
        groups.setdefault(tuple(r[c] for c in by), []).append(r)
    return [{**dict(zip(by, key)), **{c: math.fsum(r[c] for r in members) / len(members) for c in columns}}
            for key, members in sorted(groups.items())]


def to_csv(path: Path, columns: list[str], rows: list[dict]) -> None:
    """``df.round(2).to_csv(path, index=False)``."""
    def cell(x) -> str:
        if isinstance(x, (float, np.floating)):
            return repr(float(np.round(x, 2)))
        return str(x)

    with open(path, "w", newline="") as fh:
        writer = csv.writer(fh, lineterminator="\n")
        writer.writerow(columns)
        writer.writerows([cell(r[c]) for c in columns] for r in rows)


# --- their steps ---------------------------------------------------------------------------------------------

def remove_outliers_and_mean(data, threshold: float = 1.5) -> float:
    q1, q3 = np.percentile(data, 25), np.percentile(data, 75)
    iqr = q3 - q1
    return float(np.mean([x for x in data if q1 - threshold * iqr <= x <= q3 + threshold * iqr]))


def _run_aggregate(records: list[dict]) -> dict:
    """One run: IQR-filtered mean time, summed memory and throughput, summed per-rank bits."""
    return {CPU_TIME: remove_outliers_and_mean([d[CPU_TIME] for d in records]),
            CPU_MEMORY: math.fsum(d[CPU_MEMORY] for d in records),
            THROUGHPUT: math.fsum(d[THROUGHPUT] for d in records),
            TOTAL_BITS: math.fsum(d[THROUGHPUT] * d[CPU_TIME] for d in records)}


def _data_gb(data_size: str) -> float:
    if data_size == "total":
        return 12.6
    if data_size == "total100GB":
        return 100
    if data_size == "total1000GB":
        return 1000
    return float(data_size.replace("GB", ""))


def average_varying_batch_size(root: Path, results: Path, batch_sizes, runs: int, data_size: str = "1GB",
                               partition=25) -> None:
    rows = []
    for batch_size in batch_sizes:
        for run in range(1, runs + 1):
            combined = root / f"result-partition-{partition}MB" / data_size / "Batches" / str(batch_size) / str(run)
            records = json.loads((combined / "combined_data.json").read_text())  # no existence check there
            rows.append({"batch_size": batch_size, "run": run, **_run_aggregate(records)})
    columns = ["batch_size", "run", *KEYS, TOTAL_BITS]
    mean = [{**m, "run": "mean"} for m in mean_rows(rows, ["batch_size"], [*KEYS, TOTAL_BITS])]
    to_csv(results / "batch_varying_results.csv", columns,
           sort_rows(concat(columns, rows, mean), ["batch_size", "run"]))


def average_varying_data_size(root: Path, results: Path, data_sizes, runs: int,
                              partitions=(25, 50, 75, 100)) -> None:
    rows = []
    for partition in partitions:
        for data_size in data_sizes:
            for run in range(1, runs + 1):
                combined = root / f"result-partition-{partition}MB" / data_size / str(run) / "combined_data.json"
                if not combined.exists():
                    continue  # they print "File not found" and go on
                records = json.loads(combined.read_text())
                rows.append({"partition (MB)": partition, "data (GB)": _data_gb(data_size), "run": run,
                             **_run_aggregate(records)})
    by = ["partition (MB)", "data (GB)"]
    columns = [*by, "run", *KEYS, TOTAL_BITS]
    mean = [{**m, "run": "mean"} for m in mean_rows(rows, by, [*KEYS, TOTAL_BITS])]
    to_csv(results / "result_stats.csv", columns, sort_rows(concat(columns, rows, mean), [*by, "run"]))


def _state_logs(path: Path, drop: tuple[str, ...]) -> tuple[list[str], list[dict]]:
    header, logs = read_csv(path)
    for log in logs:
        log["run"] = str(log["run"])  # state_logs['run'].astype(str)
    return [c for c in header if c not in drop], logs


def _adjust(table_csv: Path, logs_columns: list[str], logs: list[dict], on: list[str], by: list[str],
            out: Path) -> None:
    header, table = read_csv(table_csv)
    merged = merge(table, logs, on)
    for r in merged:
        r[THROUGHPUT] = r[TOTAL_BITS] / r["inference_duration (s)"]
    columns = header + [c for c in logs_columns if c not in on]
    avg = [{**m, "run": "mean"} for m in mean_rows(merged, by, [*KEYS, *DURATIONS, TOTAL_BITS])]
    to_csv(out, columns, sort_rows(concat(columns, merged, avg), [*by, "run"]))


def adjust_throughput_stats(results: Path, logs_csv: Path, sweep_batch: int = 512) -> None:
    drop = ("batch_varying", "batch_size")
    columns, logs = _state_logs(logs_csv, drop)
    logs = [{k: v for k, v in log.items() if k not in drop}
            for log in logs if not log["batch_varying"] and log["batch_size"] == sweep_batch]
    on = ["partition (MB)", "data (GB)", "run"]
    _adjust(results / "result_stats.csv", columns, logs, on, on[:2], results / "result_stats_adjusted.csv")


def adjust_throughput_batch_varying(results: Path, logs_csv: Path, batch_data_gb: float = 1) -> None:
    drop = ("batch_varying", "partition (MB)", "data (GB)")
    columns, logs = _state_logs(logs_csv, drop)
    logs = [{k: v for k, v in log.items() if k not in drop}
            for log in logs if log["batch_varying"] and log["data (GB)"] == batch_data_gb]
    _adjust(results / "batch_varying_results.csv", columns, logs, ["batch_size", "run"], ["batch_size"],
            results / "batch_varying_adjusted.csv")


def authors_stats(root: Path, results: Path, logs_csv: Path, data_sizes, runs: int, batch_sizes,
                  partitions=(25, 50, 75, 100), batch_partition=25, batch_data: str = "1GB",
                  sweep_batch: int = 512) -> None:
    """Their ``__main__``: the batch sweep, its adjustment, the data-size sweep, its adjustment."""
    average_varying_batch_size(root, results, batch_sizes, runs, batch_data, batch_partition)
    adjust_throughput_batch_varying(results, logs_csv, _data_gb(batch_data))
    average_varying_data_size(root, results, data_sizes, runs, partitions)
    adjust_throughput_stats(results, logs_csv, sweep_batch)


def _rows(path: Path) -> list[list[str]]:
    with open(path, newline="") as fh:
        return list(csv.reader(fh))


# --- on a cai bench tree -------------------------------------------------------------------------------------

SIZES, PARTITION, BATCHES, RUNS = ["0.01GB", "0.02GB"], 0.5, [32, 512], 2


@pytest.fixture(scope="module")
def bench_tree(tiny_dataset, tmp_path_factory) -> Path:
    # Sizes named in GB with at most 2 decimals, as their parsing and their round(2) of every column need;
    # neither is a whole number of bytes (0.01 GB is 10737418.24 B), so the log's sizes must come from the
    # folder names to join. The model is the test plug-in without inference cost (tests/faultproxy.py): the
    # tables only read the per-rank records, and the 0.02 GB runs have 42 ranks each.
    root = tmp_path_factory.mktemp("bench_authors")
    assert main(["bench", "--data", tiny_dataset, "--out", str(root), "--sizes", ",".join(SIZES),
                 "--partitions", f"{PARTITION}MB", "--batch-sizes", ",".join(map(str, BATCHES)),
                 "--runs", str(RUNS), "--model", "faultproxy:instant_model", "--workers", "1",
                 "--threads", "1"]) == 0
    return root


def test_the_authors_stats_on_a_bench_tree(bench_tree, tmp_path):
    results = tmp_path / "results"
    results.mkdir()
    logs_csv = bench_tree / "results" / "state_machine_logs.csv"  # where their script reads it, run from ROOT
    header, *log_rows = _rows(logs_csv)
    ranks = {(r["size"], r["batch_size"], r["batch_varying"], str(r["run"])): r["ranks"]
             for r in json.loads((bench_tree / "bench.json").read_text())["runs"]}

    authors_stats(bench_tree, results, logs_csv, SIZES, RUNS, BATCHES, partitions=[PARTITION],
                  batch_partition=PARTITION, batch_data=SIZES[0], sweep_batch=max(BATCHES))

    tables = {name: _rows(results / f"{name}.csv") for name in
              ("batch_varying_results", "batch_varying_adjusted", "result_stats", "result_stats_adjusted")}
    # every table has its rows: per group RUNS runs and a mean
    assert {name: len(rows) - 1 for name, rows in tables.items()} == {
        "batch_varying_results": 6, "batch_varying_adjusted": 6, "result_stats": 6, "result_stats_adjusted": 6}
    # the log's sizes are the folders' (0.01, not 0.009999999776482582), so they join result_stats.csv's
    assert {(r[0], r[1]) for r in log_rows} == {("0.5", "0.01"), ("0.5", "0.02")}
    stats_rows = tables["result_stats"]
    assert [r[:3] for r in stats_rows[1:]] == [["0.5", "0.01", "1"], ["0.5", "0.01", "2"], ["0.5", "0.01", "mean"],
                                              ["0.5", "0.02", "1"], ["0.5", "0.02", "2"], ["0.5", "0.02", "mean"]]

    # the merged values: each adjusted row is its result_stats row with its own log row's durations, and
    # throughput = total_bits / inference_duration
    stats_by_key = {tuple(r[:3]): dict(zip(stats_rows[0], r)) for r in stats_rows[1:]}
    logs = {tuple(r[:5]): dict(zip(header, r)) for r in log_rows}  # partition, data, batch, varying, run
    adjusted = tables["result_stats_adjusted"]
    assert adjusted[0] == stats_rows[0] + DURATIONS
    for row in adjusted[1:]:
        got = dict(zip(adjusted[0], row))
        if got["run"] == "mean":
            continue
        log = logs[(got["partition (MB)"], got["data (GB)"], "512", "False", got["run"])]
        base = stats_by_key[tuple(row[:3])]
        assert float(got["num_worlds"]) == int(log["num_worlds"]) == ranks[(got["data (GB)"] + "GB", 512, False,
                                                                              got["run"])]
        assert float(got["inference_duration (s)"]) == float(log["inference_duration (s)"]) > 0
        assert float(got["total_duration (s)"]) == float(log["total_duration (s)"])
        for col in (CPU_TIME, CPU_MEMORY, TOTAL_BITS):
            assert got[col] == base[col]
        assert float(got[THROUGHPUT]) == round(float(base[TOTAL_BITS]) / float(log["inference_duration (s)"]), 2)
    assert {int(log["num_worlds"]) for log in logs.values()} == {21, 42}
    for size in ("0.01", "0.02"):
        runs = [dict(zip(adjusted[0], r)) for r in adjusted[1:] if r[1] == size]
        mean = runs.pop()
        assert mean["run"] == "mean" and [r["run"] for r in runs] == ["1", "2"]
        for col in (THROUGHPUT, "inference_duration (s)"):
            assert float(mean[col]) == pytest.approx(np.mean([float(r[col]) for r in runs]), abs=0.011)

    # the batch sweep (at the smallest size) joins its own logs the same way
    batch_adj, batch_base = tables["batch_varying_adjusted"], tables["batch_varying_results"]
    assert [r[:2] for r in batch_adj[1:]] == [r[:2] for r in batch_base[1:]] == [
        ["32", "1"], ["32", "2"], ["32", "mean"], ["512", "1"], ["512", "2"], ["512", "mean"]]
    for row, base in zip(batch_adj[1:], batch_base[1:]):
        got = dict(zip(batch_adj[0], row))
        if got["run"] == "mean":
            continue
        log = logs[("0.5", "0.01", got["batch_size"], "True", got["run"])]
        assert float(got["inference_duration (s)"]) == float(log["inference_duration (s)"]) > 0
        assert row[5] == base[5]  # total_bits
        assert float(got[THROUGHPUT]) == round(float(base[5]) / float(log["inference_duration (s)"]), 2)

    # and they agree with `cai stats` on the same tree
    ours = tmp_path / "ours"
    assert main(["stats", str(bench_tree), "--out", str(ours)]) == 0
    assert _rows(ours / "result_stats.csv") == stats_rows
    assert _rows(ours / "batch_varying_results.csv") == tables["batch_varying_results"]
    for name in ("result_stats_adjusted", "batch_varying_adjusted"):
        mine = _rows(ours / f"{name}.csv")
        assert mine[0] == tables[name][0] and len(mine) == len(tables[name])
        # Theirs re-reads result_stats.csv, so it adjusts (and averages) the values rounded to the cent; ours
        # the exact ones. And pandas writes num_worlds as 3.0, ours as 3.
        keys = 3 if name == "result_stats_adjusted" else 2  # (partition, data, run) or (batch, run)
        for a, b in zip(mine[1:], tables[name][1:]):
            assert a[:keys] == b[:keys]
            assert [float(x) for x in a if x != "mean"] == pytest.approx([float(x) for x in b if x != "mean"],
                                                                       rel=1e-6, abs=0.011)


# --- the rewrite against their published tables --------------------------------------------------------------

# The partition-100 rows of their published results/result_stats_adjusted.csv (commit 100bcdc); their
# published result_stats.csv in the reference folder is the 25 and 100 MB one, so the 50 MB rows have no base.
PUBLISHED_ADJUSTED_100MB = """\
100,100.0,1,22.63,69701545.4,15517087096.29,818681515200.0,1024.0,59.69,52.76
100,100.0,2,24.66,69701563.39,15971157143.97,818681515200.0,1024.0,58.09,51.26
100,100.0,3,21.13,69701537.23,12925189693.72,818681515200.0,1024.0,73.53,63.34
100,100.0,mean,22.81,69701548.67,14804477977.99,818681515200.0,1024.0,63.77,55.79
100,1000.0,1,21.98,70984495.7,4314585066.45,833750418240.0,10240.0,246.87,193.24
100,1000.0,2,22.88,70984521.62,4517258591.54,833750418240.0,10240.0,242.6,184.57
100,1000.0,3,23.68,70984507.46,5087256197.69,833750418240.0,10240.0,220.97,163.89
100,1000.0,mean,22.85,70984508.26,4639699951.89,833750418240.0,10240.0,236.81,180.57
"""


@pytest.mark.skipif(not (REF / "results" / "result_stats.csv").exists(),
                    reason="the original CAI results (../shared/reference/cai or $CAI_REFERENCE_DIR) are not on "
                           "this machine")
def test_the_rewrite_reproduces_the_published_tables(tmp_path):
    # their __main__'s constants, on their own published tree
    authors_stats(REF, tmp_path, REF / "results" / "state_machine_logs.csv",
                  ["1GB", "2GB", "4GB", "6GB", "8GB", "10GB", "total", "total100GB", "total1000GB"], 3,
                  [32, 64, 128, 256, 512])
    for name in ("result_stats", "batch_varying_results", "batch_varying_adjusted"):
        assert _rows(tmp_path / f"{name}.csv") == _rows(REF / "results" / f"{name}.csv"), name
    adjusted = _rows(tmp_path / "result_stats_adjusted.csv")
    assert [r for r in adjusted[1:] if r[0] == "100"] == [line.split(",")
                                                          for line in PUBLISHED_ADJUSTED_100MB.splitlines()]
