"""cai stats: the original's aggregation reproduced on its published trees, plus conventions and errors."""

from __future__ import annotations

import csv
import json
from pathlib import Path

import pytest

from cosmicai.analysis import stats
from cosmicai.cli import main
from cosmicai.simulator.calibrate import reference_dir
from cosmicai.errors import DataError

REF = reference_dir() or Path("../shared/reference/cai")  # skipped below when absent
needs_ref = pytest.mark.skipif(not (REF / "results" / "result_stats.csv").exists(),
                               reason="the original CAI results (../shared/reference/cai or $CAI_REFERENCE_DIR) are not on this machine")


def _rows(path: Path) -> list[list[str]]:
    with open(path, newline="") as fh:
        return list(csv.reader(fh))


@pytest.fixture(scope="module")
def ref_tables(tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("ref_stats")
    assert main(["stats", str(REF), "--out", str(out)]) == 0
    return out


@needs_ref
def test_result_stats_match_published_row_for_row(ref_tables):
    ours, published = _rows(ref_tables / "result_stats.csv"), _rows(REF / "results" / "result_stats.csv")
    assert ours[0] == published[0]
    assert len(ours) == len(published) == 65
    mismatched = [(a, b) for a, b in zip(ours, published) if a != b]
    assert mismatched == []


@needs_ref
def test_batch_varying_match_published_row_for_row(ref_tables):
    ours, published = _rows(ref_tables / "batch_varying_results.csv"), _rows(REF / "results" / "batch_varying_results.csv")
    assert ours == published
    assert len(ours) == 21


@needs_ref
def test_every_batch_sweep_and_adjusted_tables(ref_tables):
    rows = _rows(ref_tables / "batch_varying_all.csv")
    groups = {(r[0], r[1]) for r in rows[1:]}
    assert groups == {("25", "1.0"), ("100", "1.0"), ("100", "2.0"), ("100", "8.0")}
    adj = {(r[0], r[1], r[2]): r for r in _rows(ref_tables / "result_stats_adjusted.csv")[1:]}
    run1 = adj[("100", "100.0", "1")]
    # throughput re-based on the state machine's inference duration: total_bits / 52.76 s
    assert float(run1[5]) == round(818681515200.0 / 52.76, 2)
    assert run1[7:] == ["1024", "59.69", "52.76"]
    assert ("100", "1000.0", "mean") in adj and ("25", "1.0", "1") not in adj
    # the original's batch_varying_adjusted.csv is empty (header only): no batch rows have durations
    assert _rows(ref_tables / "batch_varying_adjusted.csv") == _rows(REF / "results" / "batch_varying_adjusted.csv")


@needs_ref
def test_total_folder_size_is_derived_from_the_bits():
    runs = stats.find_runs(str(REF / "result-partition-25MB"))
    total = {r.data_gb for r in runs if r.size_label == "total"}
    assert total == {12.6}


def test_iqr_mask_linear_quartiles_inclusive():
    values = [1.0, 2.0, 3.0, 4.0, 100.0]
    # Q1 = 2, Q3 = 4 (linear interpolation): keep [-1, 7]
    assert stats.iqr_mask(values).tolist() == [True, True, True, True, False]
    # a value exactly on the upper fence is kept
    assert stats.iqr_mask([0.0, 0.0, 1.0, 1.0, 2.5]).tolist() == [True, True, True, True, True]
    assert stats.iqr_mask([0.0, 0.0, 1.0, 1.0, 2.51]).tolist() == [True, True, True, True, False]


def _rec(t: float, mem: float = 10.0, thr: float = 100.0) -> dict:
    return {"total_cpu_time (seconds)": t, "total_cpu_memory (MB)": mem, "execution_time (seconds/batch)": 0.1,
            "num_batches": 1, "batch_size": 8, "device": "cpu", "throughput_bps": thr, "sample_persec": 1.0,
            "result_path": "r", "data_path": "d"}


def test_aggregate_records_by_hand():
    recs = [_rec(1.0, 5, 10), _rec(2.0, 6, 20), _rec(3.0, 7, 30), _rec(4.0, 8, 40), _rec(100.0, 9, 50)]
    agg = stats.aggregate_records(recs)
    assert agg["total_cpu_time (seconds)"] == pytest.approx(2.5)  # 100 s dropped
    assert agg["total_cpu_memory (MB)"] == 35.0  # all ranks summed
    assert agg["throughput_bps"] == 150.0
    assert agg["total_bits"] == pytest.approx(10 + 40 + 90 + 160 + 5000)
    assert agg["kept_ranks"] == 4 and agg["ranks"] == 5


def test_bad_records_name_the_file_and_field(tmp_path):
    run = tmp_path / "result-partition-25MB" / "1GB" / "1"
    run.mkdir(parents=True)
    bad = _rec(1.0)
    bad["throughput_bps"] = "fast"
    (run / "combined_data.json").write_text(json.dumps([_rec(1.0), bad]))
    with pytest.raises(DataError, match=r"combined_data.json\[1\]: 'throughput_bps' is 'fast'"):
        stats.find_runs(str(tmp_path))
    (run / "combined_data.json").write_text("[]")
    with pytest.raises(DataError, match="non-empty list"):
        stats.find_runs(str(tmp_path))


def test_tree_layout_run_folders_and_means(tmp_path, capsys):
    base = tmp_path / "result-partition-50MB"
    for size, run, t in [("2GB", "run 1", 2.0), ("2GB", "run 2", 4.0), ("total20GB", "1", 1.0)]:
        d = base / size / run
        d.mkdir(parents=True)
        (d / "combined_data.json").write_text(json.dumps([_rec(t, 1.0, 8.0)] * 3))
    for b in (32, 64):
        d = base / "2GB" / "Batches" / str(b) / "1"
        d.mkdir(parents=True)
        (d / "combined_data.json").write_text(json.dumps([_rec(b / 32, 1.0, 8.0)]))
    assert main(["stats", str(tmp_path), "--out", str(tmp_path / "out")]) == 0
    rows = _rows(tmp_path / "out" / "result_stats.csv")
    assert rows[1:] == [["50", "2.0", "1", "2.0", "3.0", "24.0", "48.0"],
                        ["50", "2.0", "2", "4.0", "3.0", "24.0", "96.0"],
                        ["50", "2.0", "mean", "3.0", "3.0", "24.0", "72.0"],
                        ["50", "20.0", "1", "1.0", "3.0", "24.0", "24.0"],
                        ["50", "20.0", "mean", "1.0", "3.0", "24.0", "24.0"]]
    batch = _rows(tmp_path / "out" / "batch_varying_results.csv")
    assert [r[:3] for r in batch[1:]] == [["32", "1", "1.0"], ["32", "mean", "1.0"], ["64", "1", "2.0"],
                                          ["64", "mean", "2.0"]]
    assert "no result trees" not in capsys.readouterr().err


def test_stats_on_empty_folder_is_a_clear_error(tmp_path, capsys):
    assert main(["stats", str(tmp_path)]) == 2
    assert "no result trees" in capsys.readouterr().err


def test_stats_prints_its_tables(tmp_path, tiny_dataset, capsys):
    import cosmicai

    base = tmp_path / "result-partition-50MB"
    for size, run, t in [("2GB", "1", 2.0), ("2GB", "2", 4.0)]:
        d = base / size / run
        d.mkdir(parents=True)
        (d / "combined_data.json").write_text(json.dumps([_rec(t, 100.0, 8e6)] * 3))
    for b in (32, 64):
        d = base / "2GB" / "Batches" / str(b) / "1"
        d.mkdir(parents=True)
        (d / "combined_data.json").write_text(json.dumps([_rec(b / 16, 10.0, 4e6)]))
    ours = cosmicai.run(tiny_dataset, str(tmp_path / "result-partition-1MB" / "1GB" / "1"), model="astromae-random",
                        workers=1, threads=1, world_size=2, batch_size=16)
    assert main(["stats", str(tmp_path), "--out", str(tmp_path / "out")]) == 0
    out = capsys.readouterr().out
    # one table per CSV written, each under its file name, with the values the CSV holds
    assert "result_stats.csv: data-size sweep, mean over runs (original aggregation)\n" \
           "partition MB  data GB  rank time s  memory MB  throughput Mbit/s  data GiB\n" in out
    assert "50                2.0         3.00        300               24.0     0.008\n" in out  # (2 s + 4 s) / 2
    assert "batch_varying_results.csv: batch-size sweep, mean over runs\n" \
           "batch  rank time s  memory MB  throughput Mbit/s  data GiB\n" \
           "32            2.00         10                4.0     0.001\n" \
           "64            4.00         10                4.0     0.002\n" in out
    table = out.split("cai_runs.csv: our runs\n", 1)[1].split("\n\n", 1)[0].splitlines()
    assert table[0].split() == ["run", "rows", "ranks", "map", "s", "total", "s", "samples/s", "Mbit/s",
                                "inference", "s", "peak", "MB", "Lambda", "$", "complete"]
    row = table[1].split()
    assert row[:3] == ["result-partition-1MB/1GB/1", "48", "2"] and row[-1] == "True"
    assert float(row[3]) == pytest.approx(ours.summary["map_wall_s"], abs=0.006)
    assert float(row[5]) == pytest.approx(ours.summary["samples_per_s"], abs=0.06)
    assert out.rstrip().endswith(f"wrote {tmp_path / 'out' / 'cai_runs.csv'}")
