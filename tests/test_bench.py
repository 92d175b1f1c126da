"""cai bench on a tiny grid: the original's layout, state_machine_logs.csv, distinct samples, then stats."""

from __future__ import annotations

import csv
import json
from pathlib import Path

import pytest

from cosmicai.experiments.bench import size_label, size_text
from cosmicai.analysis.stats import LOG_COLUMNS
from cosmicai.cli import main
from cosmicai.data.formats import INPUT_BITS_PER_SAMPLE


def _rows(path: Path) -> list[list[str]]:
    with open(path, newline="") as fh:
        return list(csv.reader(fh))


@pytest.fixture(scope="module")
def bench_root(tiny_dataset, tmp_path_factory) -> Path:
    root = tmp_path_factory.mktemp("bench")
    rc = main(["bench", "--data", tiny_dataset, "--out", str(root), "--sizes", "0.5MB,1MB", "--partitions", "0.25MB",
               "--batch-sizes", "32,64", "--runs", "1", "--model", "astromae-random", "--workers", "1",
               "--threads", "1"])
    assert rc == 0
    return root


def test_layout_like_the_original(bench_root):
    base = bench_root / "result-partition-0.25MB"
    for run in ("0.5MB/1", "1MB/1", "0.5MB/Batches/32/1", "0.5MB/Batches/64/1"):
        records = json.loads((base / run / "combined_data.json").read_text())
        assert records and list(records[0])[:3] == ["total_cpu_time (seconds)", "total_cpu_memory (MB)",
                                                    "execution_time (seconds/batch)"]
    assert not (base / "1MB" / "Batches").exists()  # the batch sweep runs at the smallest size only
    batch = {r["batch_size"] for r in json.loads((base / "0.5MB/Batches/32/1/combined_data.json").read_text())}
    assert batch == {32}
    sweep = {r["batch_size"] for r in json.loads((base / "1MB/1/combined_data.json").read_text())}
    assert sweep == {64}  # the data-size sweep uses the largest batch size
    assert sum(r["rows"] for r in json.loads((base / "1MB/1/combined_data.json").read_text())) == 52


def test_state_machine_logs_and_distinct_samples(bench_root):
    logs = _rows(bench_root / "results" / "state_machine_logs.csv")
    assert logs[0] == LOG_COLUMNS
    assert [(r[0], r[2], r[3], r[4], r[5]) for r in logs[1:]] == [
        ("0.25", "64", "False", "1", "3"), ("0.25", "32", "True", "1", "3"), ("0.25", "64", "True", "1", "3"),
        ("0.25", "64", "False", "1", "5")]
    # sizes in GB as the folders name them (0.5MB, 1MB), the values result_stats.csv has for those folders
    assert [r[1] for r in logs[1:]] == ["0.00048828125"] * 3 + ["0.0009765625"]
    assert all(float(r[6]) >= float(r[7]) > 0 for r in logs[1:])
    report = json.loads((bench_root / "bench.json").read_text())
    assert [(r["size"], r["rows"], r["distinct_samples"]) for r in report["runs"]] == [
        ("0.5MB", 26, 26), ("0.5MB", 26, 26), ("0.5MB", 26, 26), ("1MB", 52, 48)]
    assert all(r["complete"] for r in report["runs"])
    # each distinct configuration runs once: the batch sweep's 64 at 0.5MB is the data-size sweep's run
    base = str(bench_root / "result-partition-0.25MB")
    assert [r["same_as"] for r in report["runs"]] == [None, None, f"{base}/0.5MB/1", None]
    assert logs[3][6:] == logs[1][6:]  # its log row repeats that run's measured durations


def test_stats_on_our_tree(bench_root):
    out = bench_root / "stats"
    assert main(["stats", str(bench_root), "--out", str(out)]) == 0
    stats_rows = _rows(out / "result_stats.csv")
    assert [r[:3] for r in stats_rows[1:]] == [["0.25", "0.00048828125", "1"], ["0.25", "0.00048828125", "mean"],
                                              ["0.25", "0.0009765625", "1"], ["0.25", "0.0009765625", "mean"]]
    assert float(stats_rows[3][6]) == pytest.approx(52 * INPUT_BITS_PER_SAMPLE, rel=1e-6)  # total_bits
    assert [r[0] for r in _rows(out / "batch_varying_results.csv")[1:]] == ["32", "32", "64", "64"]
    adjusted = _rows(out / "result_stats_adjusted.csv")
    assert len(adjusted) == 5 and adjusted[0][-1] == "inference_duration (s)"
    runs = {r[0].split("result-partition-0.25MB/")[1]: r for r in _rows(out / "cai_runs.csv")[1:]}
    assert set(runs) == {"0.5MB/1", "1MB/1", "0.5MB/Batches/32/1", "0.5MB/Batches/64/1"}
    header = _rows(out / "cai_runs.csv")[0]
    row = dict(zip(header, runs["1MB/1"]))
    assert row["rows"] == "52" and row["distinct_samples"] == "48" and row["complete"] == "True"
    honest = 52 * INPUT_BITS_PER_SAMPLE / float(row["map_wall_s"])
    assert float(row["throughput_bps"]) == pytest.approx(honest, rel=1e-3)
    assert float(row["lambda_cost_usd"]) > 0 and float(row["inference_s"]) > 0


def test_log_sizes_are_the_folders_numbers():
    # 0.1 GB is 107374182.4 bytes: the byte count divided back would be 0.09999999962747097, which the
    # original's tables (0.1, from the folder name) do not join
    assert [size_text(label, "GB") for label in ("0.1GB", "12.6GB", "1GB", "1000GB", "512MB", "0.5MB")] == [
        "0.1", "12.6", "1.0", "1000.0", "0.5", "0.00048828125"]
    assert [size_text(label, "MB") for label in ("25MB", "0.25MB", "0.1MB", "1GB")] == ["25", "0.25", "0.1", "1024"]
    assert size_text(size_label("0.1 gb"), "GB") == "0.1"


def test_bench_rejects_bad_grids(tiny_dataset, tmp_path, capsys):
    assert main(["bench", "--data", tiny_dataset, "--out", str(tmp_path), "--sizes", "1MB", "--partitions", "1MB",
                 "--batch-data", "2MB"]) == 2
    assert "--batch-data 2MB is not one of --sizes" in capsys.readouterr().err
    assert main(["bench", "--data", tiny_dataset, "--out", str(tmp_path), "--sizes", "1 lightyear",
                 "--partitions", "1MB"]) == 2
    assert "unknown unit" in capsys.readouterr().err
