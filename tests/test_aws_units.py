"""AWS pieces that need no server: REPORT-line parsing and pricing, the Catch's failure record, Initialize checks."""

from __future__ import annotations

import json
import os

import pytest

from cosmicai.backends.aws import handlers
from cosmicai.analysis.cost import cost_table, invocation_cost
from cosmicai.analysis.lambda_reports import parse_report_line, parse_reports
from cosmicai.config import load_config
from cosmicai.errors import ConfigError
from cosmicai.pipeline.plan import make_plan
from cosmicai.pipeline.summarize import summarize

COLD = ("REPORT RequestId: 3f5c1e2a-0b7d-4c1e-9a57-2f3c4d5e6f70\tDuration: 10234.56 ms\tBilled Duration: 12385 ms\t"
        "Memory Size: 3008 MB\tMax Memory Used: 1874 MB\tInit Duration: 2150.03 ms\t")
WARM = ("REPORT RequestId: 9a0b1c2d-3e4f-5a6b-7c8d-9e0f1a2b3c4d\tDuration: 812.00 ms\tBilled Duration: 812 ms\t"
        "Memory Size: 10240 MB\tMax Memory Used: 2210 MB\t")


def test_report_lines_parse_into_durations_memory_and_init():
    cold = parse_report_line(COLD)
    assert (cold.request_id, cold.duration_ms, cold.billed_ms) == ("3f5c1e2a-0b7d-4c1e-9a57-2f3c4d5e6f70", 10234.56, 12385)
    assert (cold.memory_mb, cold.max_memory_mb, cold.init_ms, cold.cold) == (3008, 1874, 2150.03, True)
    warm = parse_report_line(WARM)
    assert warm.init_ms is None and not warm.cold and warm.memory_mb == 10240
    lines = ["START RequestId: x Version: $LATEST", COLD, "some handler output Duration: 5 ms", WARM,
             "END RequestId: x"]
    assert [r.request_id[:4] for r in parse_reports(lines)] == ["3f5c", "9a0b"]
    assert parse_report_line("REPORT RequestId: abc Duration: 5 ms") is None   # no billed duration / memory


def test_invocation_cost_per_architecture():
    cold, warm = parse_report_line(COLD), parse_report_line(WARM)
    assert invocation_cost(cold, "x86_64") == pytest.approx(12.385 * 3008 / 1024 * 0.0000166667 + 0.2e-6, rel=1e-12)
    assert invocation_cost(warm, "arm64") == pytest.approx(0.812 * 10 * 0.0000133334 + 0.2e-6, rel=1e-12)
    assert invocation_cost(warm, "x86_64", memory_mb=1024) == pytest.approx(0.812 * 0.0000166667 + 0.2e-6, rel=1e-12)
    table = cost_table([cold, warm], "x86_64")
    t = table["total"]
    assert t["invocations"] == 2 and t["cold_starts"] == 1 and t["billed_seconds"] == pytest.approx(13.197)
    assert t["max_memory_used_mb"] == 2210 and t["mean_init_ms"] == pytest.approx(2150.03)
    assert t["cost_usd"] == pytest.approx(sum(r["cost_usd"] for r in table["invocations"]))


def _plan(tiny_dataset, result):
    config = load_config({"data": tiny_dataset, "result": result, "model": "astromae-random", "world_size": 2})[0]
    return make_plan(config)


def test_record_failure_writes_the_error_when_the_task_left_none(tiny_dataset, tmp_path):
    result = str(tmp_path / "res")
    _plan(tiny_dataset, result)
    cause = json.dumps({"errorType": "Sandbox.Timedout", "errorMessage": "Task timed out after 900.00 seconds"})
    out = handlers.infer({"action": "record_failure", "result_url": result, "rank": 1,
                          "error": {"Error": "Sandbox.Timedout", "Cause": cause}})
    assert out["status"] == "failed" and out["recorded_by"] == "catch"
    error = json.load(open(os.path.join(result, "errors", "1.json")))
    assert error["error_type"] == "Sandbox.Timedout" and error["message"] == "Task timed out after 900.00 seconds"
    assert error["partitions"] == ["part-000003.safetensors", "part-000004.safetensors"]
    summary = summarize(result, allow_failures=True)
    assert summary["completeness"]["failed_ranks"] == [1] and summary["completeness"]["missing_ranks"] == [0]
    assert summary["failures"][0]["message"] == "Task timed out after 900.00 seconds"


def test_record_failure_keeps_the_pipelines_own_error(tiny_dataset, tmp_path):
    result = str(tmp_path / "res")
    plan = _plan(tiny_dataset, result)
    own = {"rank": 0, "partitions": ["part-000001.safetensors"], "error_type": "DataError", "message": "corrupt",
           "traceback": "Traceback ...", "plan_hash": plan.plan_hash}
    os.makedirs(os.path.join(result, "errors"))
    with open(os.path.join(result, "errors", "0.json"), "w") as fh:
        json.dump(own, fh)
    out = handlers.record_failure({"result_url": result, "rank": 0,
                                   "error": {"Error": "States.TaskFailed", "Cause": "x"}})
    assert out["recorded_by"] == "pipeline" and out["error_type"] == "DataError"
    assert json.load(open(os.path.join(result, "errors", "0.json"))) == own


def test_initialize_refuses_locations_outside_the_stack(monkeypatch, tmp_path):
    monkeypatch.setenv("CAI_RESULT_BUCKET", "cai-results")
    monkeypatch.setenv("CAI_RESULT_PREFIX", "runs")
    monkeypatch.setenv("CAI_DATA_BUCKET", "cai-data")
    monkeypatch.setenv("CAI_DATA_PREFIX", "datasets")
    with pytest.raises(ConfigError, match=r"result: s3://elsewhere/x is outside this stack's result location "
                                          r"s3://cai-results/runs/"):
        handlers.initialize({"config": {"data": "s3://cai-data/datasets/a", "result": "s3://elsewhere/x"}})
    with pytest.raises(ConfigError, match=r"data: s3://cai-data/other is outside this stack's data location "
                                          r"s3://cai-data/datasets/"):
        handlers.initialize({"config": {"data": "s3://cai-data/other", "result": "s3://cai-results/runs/r1"}})
    # "runs-old" is not under "runs/".
    with pytest.raises(ConfigError, match="outside this stack's result location"):
        handlers.initialize({"config": {"data": "s3://cai-data/datasets/a", "result": "s3://cai-results/runs-old/r"}})
    with pytest.raises(ConfigError, match="'aws' must be an object with keys"):
        handlers.initialize({"config": {"data": "s3://cai-data/datasets/a", "aws": {"max_concurency": 3}}})
    monkeypatch.delenv("CAI_RESULT_BUCKET")
    with pytest.raises(ConfigError, match="needs an s3:// result URL"):
        handlers.initialize({"data": str(tmp_path), "result": str(tmp_path / "r")})


def test_infer_event_must_be_a_task_item():
    with pytest.raises(ConfigError, match=r"infer event must be a task item of tasks.json \{'result_url': URL, "
                                          r"'rank': int, 'plan_hash': str, 'task': object\}; missing result_url"):
        handlers.infer({"rank": 1})
