"""The Lambda cost model: arithmetic, billing granularity, REPORT lines, and the original README's table."""

from __future__ import annotations

import csv
import json
import math
from pathlib import Path

import pytest

from cosmicai import sizes
from cosmicai.analysis import cost
from cosmicai.cli import main
from cosmicai.simulator.calibrate import reference_dir
from cosmicai.errors import ConfigError, DataError

REF = reference_dir() or Path("../shared/reference/cai")  # skipped below when absent
needs_ref = pytest.mark.skipif(not (REF / "results" / "total_execution_time.csv").exists(),
                               reason="the original CAI results (../shared/reference/cai or $CAI_REFERENCE_DIR) are not on this machine")

# The original README's cost table: partition MB -> (duration s, memory GB, published cost $). Its request
# counts are not inputs here: they are derived as ceil(12.6 GB / partition) and checked against the
# num_worlds of the whole-dataset runs in total_execution_time.csv.
README = {25: (6.55, 2.8, 0.16), 50: (11.8, 4.0, 0.20), 75: (17.6, 5.9, 0.30), 100: (25.0, 7.0, 0.38)}


def test_lambda_cost_by_hand():
    out = cost.lambda_cost(1000, 2.0, 2048)
    assert out["gb_seconds"] == pytest.approx(4000.0)
    assert out["compute"] == pytest.approx(4000 * 0.0000166667)
    assert out["requests"] == pytest.approx(1000 * 0.20 / 1e6)
    assert out["storage"] == 0.0
    assert out["total"] == pytest.approx(out["compute"] + out["requests"])
    arm = cost.lambda_cost(1000, 2.0, 2048, arch="arm64", ephemeral_mb=1536)
    assert arm["compute"] == pytest.approx(4000 * 0.0000133334)
    assert arm["storage"] == pytest.approx(2000 * 1.0 * 0.0000000309)  # 1 GB above the free 512 MB
    per = cost.lambda_cost(3, [1.0, 2.0, 3.5], 1024)
    assert per["billed_seconds"] == 6.5 and per["gb_seconds"] == 6.5
    custom = cost.lambda_cost(10, 1.0, 1024, prices={"gb_second": 1.0, "request": 0.5})
    assert custom["total"] == pytest.approx(10 + 5)


def test_billed_duration_rounds_up_to_the_millisecond():
    assert cost.billed_seconds(0.0011) == 0.002
    assert cost.billed_seconds(0.001) == 0.001
    assert cost.billed_seconds(6.5500001) == 6.551
    with pytest.raises(DataError):
        cost.billed_seconds(-1)


def test_bad_inputs_raise_clear_errors():
    with pytest.raises(ConfigError, match="arch"):
        cost.lambda_cost(1, 1.0, 128, arch="mips")
    with pytest.raises(ConfigError, match="memory_mb"):
        cost.lambda_cost(1, 1.0, 0)
    with pytest.raises(ConfigError, match="ephemeral_mb"):
        cost.lambda_cost(1, 1.0, 128, ephemeral_mb=100)
    with pytest.raises(ConfigError, match="unknown price 'gbs'"):
        cost.lambda_cost(1, 1.0, 128, prices={"gbs": 1})
    with pytest.raises(ConfigError, match="unknown unit"):
        sizes.parse_size("3 parsecs", "mb")


def test_request_counts_match_the_original_runs():
    counts = {p: cost.what_if("12.6GB", f"{p}MB", 1024, 1.0)["num_requests"] for p in README}
    assert counts == {25: 517, 50: 259, 75: 173, 100: 130}
    assert cost.what_if("1GB", "25MB", 1024, 1.0)["num_requests"] == 41


@needs_ref
def test_request_counts_equal_num_worlds_of_whole_dataset_runs():
    with open(REF / "results" / "total_execution_time.csv", newline="") as fh:
        worlds = {int(float(r["partition(MB)"])): int(float(r["num_worlds"])) for r in csv.DictReader(fh)
                  if r["data(GB)"] == "12.6"}
    assert worlds == {p: cost.what_if("12.6GB", f"{p}MB", 1024, 1.0)["num_requests"] for p in README}


def test_readme_cost_table_reproduced():
    for p, (seconds, mem_gb, published) in README.items():
        r = cost.what_if("12.6GB", f"{p}MB", mem_gb * 1024, seconds)
        assert round(r["total"], 2) == published, p
        at_max = cost.what_if("12.6GB", f"{p}MB", 10240, seconds)
        assert at_max["compute"] == pytest.approx(r["num_requests"] * seconds * 10 * 0.0000166667)
    assert round(cost.what_if("12.6GB", "25MB", 10240, 6.55)["total"], 2) == 0.56


@needs_ref
def test_cost_from_published_25mb_records_matches_readme():
    # Billing each published per-rank wall time at the README's 2.8 GB: $0.1586, $0.1554, $0.1543 (README: 0.16).
    totals = []
    for run in (1, 2, 3):
        records = json.loads((REF / "result-partition-25MB" / "total" / str(run) / "combined_data.json").read_text())
        r = cost.cost_from_records(records, 2.8 * 1024)
        assert r["num_requests"] == 517
        totals.append(r["total"])
    assert [round(t, 4) for t in totals] == [0.1586, 0.1554, 0.1543]
    assert round(totals[0], 2) == 0.16


def test_report_lines():
    text = ("START RequestId: a Version: $LATEST\n"
            "REPORT RequestId: a\tDuration: 173.98 ms\tBilled Duration: 174 ms\tMemory Size: 2048 MB\tMax Memory Used: 63 MB\n"
            "REPORT RequestId: b\tDuration: 999.10 ms\tBilled Duration: 1000 ms\tMemory Size: 1024 MB\tMax Memory Used: 9 MB\n")
    assert cost.parse_report_lines(text) == [(0.174, 2048.0), (1.0, 1024.0)]
    r = cost.cost_from_reports(text)
    assert r["num_requests"] == 2
    assert r["gb_seconds"] == pytest.approx(0.174 * 2 + 1.0)
    with pytest.raises(DataError, match="no Lambda 'REPORT"):
        cost.cost_from_reports("nothing here", source="x.log")


def test_cli_what_if_prints_configured_and_max_memory(capsys):
    assert main(["cost", "--data-size", "12.6GB", "--partition-size", "25MB", "--memory", "2.8GB",
                 "--seconds-per-partition", "6.55"]) == 0
    out = capsys.readouterr().out
    assert "at 2867.2 MB" in out and "at 10240 MB" in out and "0.1581" in out and "0.5645" in out
    assert main(["cost", "--data-size", "1GB", "--partition-size", "25MB", "--memory", "1024",
                 "--samples-per-sec", "639", "--json"]) == 0
    res = json.loads(capsys.readouterr().out)
    assert res[0]["num_requests"] == 41 and res[0]["seconds_per_request"] == pytest.approx(1278 / 639)
    assert main(["cost", "--data-size", "1GB"]) == 2
    assert "--partition-size" in capsys.readouterr().err


def test_cli_cost_of_a_run_and_price_override(tmp_path, capsys):
    recs = [{"total_cpu_time (seconds)": 1.0004}, {"total_cpu_time (seconds)": 2.0}]
    (tmp_path / "combined_data.json").write_text(json.dumps(recs))
    assert main(["cost", str(tmp_path), "--memory", "1GB", "--price-gbs", "1", "--price-requests", "0",
                 "--json"]) == 0
    res = json.loads(capsys.readouterr().out)
    assert res[0]["billed_seconds"] == pytest.approx(3.001)
    assert res[0]["total"] == pytest.approx(3.001)
    assert math.isclose(res[1]["memory_mb"], 10240)
    (tmp_path / "combined_data.json").write_text(json.dumps([{"rows": 3}]))
    assert main(["cost", str(tmp_path)]) == 2
    assert "no duration field" in capsys.readouterr().err
