"""End to end on a local AWS stand-in: moto's server runs the DEPLOYED state machine definition
(Step Functions with execute_state_machine, S3 for data, tasks.json and results, CloudWatch Logs), and its
Lambda Invoke calls run our real handlers in warm worker processes (tests/lambda_runner.py).

Initialize -> Distributed Map (ItemReader on tasks.json) -> infer Lambda -> Summarize; `cai aws run` starts
and follows the executions, `cai aws status` and `cai aws logs` read them back.
"""

from __future__ import annotations

import io
import json
import os

import pyarrow.parquet as pq
import pytest

from conftest import corrupt_copy
from lambda_runner import LambdaEmulator, function_arn

from cosmicai import storage
from cosmicai.backends.aws import definition
from cosmicai.backends.local import LocalBackend
from cosmicai.cli import main
from cosmicai.config import load_config
from cosmicai.runners.pipeline import run

pytestmark = pytest.mark.s3

DATA_BUCKET, DATA_PREFIX = "cai-data", "datasets"
RESULT_BUCKET, RESULT_PREFIX = "cai-results", "runs"
FUNCTIONS = {f"cai-{n}": f"cosmicai.backends.aws.handlers.{n}" for n in ("initialize", "infer", "summarize")}
MODEL = "astromae-random"


@pytest.fixture(scope="module")
def stack():
    """moto + Lambda front door with the state machine created from statemachine.asl.json."""
    emu = LambdaEmulator(FUNCTIONS, max_workers=2)
    emu.worker_env.update(emu.client_env())
    emu.worker_env.update(CAI_MODEL=MODEL, CAI_THREADS="1", OMP_NUM_THREADS="1", CAI_MAX_CONCURRENCY="2",
                          CAI_DATA_BUCKET=DATA_BUCKET, CAI_DATA_PREFIX=DATA_PREFIX,
                          CAI_RESULT_BUCKET=RESULT_BUCKET, CAI_RESULT_PREFIX=RESULT_PREFIX)
    with pytest.MonkeyPatch.context() as mp, emu:
        for key, value in emu.client_env().items():
            mp.setenv(key, value)
        for key in ("AWS_PROFILE", "AWS_SESSION_TOKEN", "AWS_ENDPOINT_URL_S3"):
            mp.delenv(key, raising=False)
        _clear_s3fs()
        s3 = emu.client("s3")
        s3.create_bucket(Bucket=DATA_BUCKET)
        s3.create_bucket(Bucket=RESULT_BUCKET)
        asl = definition.render({"InitializeFunctionArn": function_arn("cai-initialize"),
                                 "InferFunctionArn": function_arn("cai-infer"),
                                 "SummarizeFunctionArn": function_arn("cai-summarize"),
                                 "ResultBucket": RESULT_BUCKET, "MapResultsPrefix": f"{RESULT_PREFIX}/_map-runs"})
        emu.definition = asl
        yield emu
    _clear_s3fs()


def _state_machine(stack, region):
    """The deployed definition as a state machine in ``region``. One region per run: moto 5.2.1's StartExecution
    deep-copies the state machine, which reaches (through its backend) every earlier execution of that region,
    and a finished Distributed Map execution holds locks that cannot be copied."""
    import boto3

    sfn = boto3.client("stepfunctions", region_name=region, endpoint_url=stack.endpoint)
    return sfn.create_state_machine(name="cai-pipeline", definition=stack.definition,
                                    roleArn="arn:aws:iam::123456789012:role/cai-pipeline")["stateMachineArn"]


def _clear_s3fs():
    import s3fs

    s3fs.S3FileSystem.clear_instance_cache()


def _cai(capsys, *argv):
    rc = main(list(argv))
    out = capsys.readouterr()
    return rc, out.out, out.err


def _read_parquet(url):
    return pq.read_table(io.BytesIO(storage.read_bytes(url)))


def test_run_matches_local_run_and_logs_price_every_invocation(stack, tiny_dataset, tmp_path, capsys):
    name = "tiny-ok"
    data, result = f"s3://{DATA_BUCKET}/{DATA_PREFIX}/tiny", f"s3://{RESULT_BUCKET}/{RESULT_PREFIX}/{name}"
    before = len(stack.invocations)
    arn = _state_machine(stack, "us-east-2")
    rc, out, err = _cai(capsys, "aws", "run", "--region", "us-east-2", "--data", data, "--upload", tiny_dataset, "--state-machine-arn", arn, "--result", result, "--name", name, "--model", MODEL,
                        "--batch-size", "5", "--world-size", "4", "--poll", "0.5", "--timeout", "120")
    assert rc == 0, out + err
    assert "uploaded 5 file(s)" in out and "SUCCEEDED" in out and "ranks: 4/4 succeeded" in out
    assert "complete: True" in out and "rows in 48 / out 48" in out

    summary = storage.read_json(f"{result}/summary.json")
    assert summary["completeness"]["complete"] and summary["completeness"]["rows_out"] == 48
    combined = storage.read_json(f"{result}/combined_data.json")
    assert [r["rank"] for r in combined] == [0, 1, 2, 3] and sum(r["rows"] for r in combined) == 48
    aws_table = _read_parquet(f"{result}/predictions.parquet")

    local = str(tmp_path / "local")
    run(load_config({"data": tiny_dataset, "result": local, "model": MODEL, "batch_size": 5, "world_size": 4,
                     "threads": 1})[0], backend=LocalBackend(1, 1, in_process=True), progress=False)
    local_table = pq.read_table(os.path.join(local, "predictions.parquet"))
    assert aws_table.num_rows == local_table.num_rows == 48
    for col in ("object_id", "partition", "row", "z_true", "flag"):
        assert aws_table.column(col).to_pylist() == local_table.column(col).to_pylist(), col
    assert aws_table.column("z_pred").to_numpy() == pytest.approx(local_table.column("z_pred").to_numpy(), abs=1e-6)
    assert summary["metrics"] == pytest.approx(json.load(open(os.path.join(local, "summary.json")))["metrics"])

    calls = stack.invocations[before:]
    infer = [c for c in calls if c["function"] == "cai-infer"]
    assert sorted(c["event"]["rank"] for c in infer) == [0, 1, 2, 3] and all(c["ok"] for c in infer)
    assert [c["function"] for c in calls if c["function"] != "cai-infer"] == ["cai-initialize", "cai-summarize"]
    assert calls[0]["response_bytes"] < 1024   # far below the 256 KiB state limit, whatever the dataset size
    # The Initialize state is small: the Map read its items from tasks.json in S3.
    tasks = storage.read_json(f"{result}/tasks.json")
    assert [{k: t[k] for k in ("result_url", "rank", "plan_hash")} for t in tasks] == [
        {"result_url": result, "rank": r, "plan_hash": summary["plan_hash"]} for r in range(4)]

    execution = f"{arn.replace(':stateMachine:', ':execution:')}:{name}"
    rc, out, _ = _cai(capsys, "aws", "status", execution, "--json", "--region", "us-east-2")
    st = json.loads(out)
    assert rc == 0 and st["status"] == "SUCCEEDED" and st["map"]["items"]["succeeded"] == 4
    assert st["output"]["complete"] is True and st["output"]["rows_out"] == 48

    rc, out, _ = _cai(capsys, "aws", "logs", "--function", "cai-infer", "--since", "1h", "--json", "--arch", "x86_64")
    table = json.loads(out)
    rows = {r["request_id"]: r for r in table["invocations"]}
    for call in infer:
        row = rows[call["request_id"]]
        assert row["duration_ms"] == pytest.approx(call["duration_ms"], abs=0.01)
        gb_s = row["billed_ms"] / 1000 * row["memory_mb"] / 1024
        assert row["cost_usd"] == pytest.approx(gb_s * 0.0000166667 + 0.2e-6, rel=1e-9)
    assert table["total"]["cost_usd"] == pytest.approx(sum(r["cost_usd"] for r in table["invocations"]))


def test_failing_partition_is_retried_then_caught_and_named(stack, tiny_dataset, tmp_path, capsys):
    data_dir = corrupt_copy(tiny_dataset, tmp_path / "data")
    name = "tiny-corrupt"
    data, result = f"s3://{DATA_BUCKET}/{DATA_PREFIX}/corrupt", f"s3://{RESULT_BUCKET}/{RESULT_PREFIX}/{name}"
    before = len(stack.invocations)
    arn = _state_machine(stack, "us-west-2")
    rc, out, err = _cai(capsys, "aws", "run", "--region", "us-west-2", "--data", data, "--upload", str(data_dir), "--state-machine-arn", arn, "--result", result, "--name", name, "--model", MODEL,
                        "--batch-size", "5", "--poll", "0.5", "--timeout", "120")
    assert rc == 1, out + err
    assert "execution FAILED: IncompleteRunError" in err and "rank 2 failed (DataError" in err
    assert "FAILED rank 2 ['part-000003.safetensors']: DataError" in out

    calls = [c for c in stack.invocations[before:] if c["function"] == "cai-infer"]
    rank2 = [c for c in calls if c["event"].get("rank") == 2]
    # 1 attempt + 2 retries (States.TaskFailed, MaxAttempts 2), then the Catch's record_failure call.
    assert [(c["event"].get("action"), c["ok"], c["error"]) for c in rank2] == \
        [(None, False, "DamagedPartitionError")] * 3 + [("record_failure", True, None)]
    assert all(c["ok"] for c in calls if c["event"].get("rank") != 2)

    summary = storage.read_json(f"{result}/summary.json")
    comp = summary["completeness"]
    assert comp["failed_ranks"] == [2] and comp["rows_out"] == 36 and not comp["complete"]
    assert summary["failures"][0]["rank"] == 2 and summary["failures"][0]["error_type"] == "DataError"
    error = storage.read_json(f"{result}/errors/2.json")
    assert "sha256" in error["message"] and error["partitions"] == ["part-000003.safetensors"]
    assert _read_parquet(f"{result}/predictions.parquet").num_rows == 36


def test_python_api_runs_on_step_functions_like_cai_aws_run(stack, tiny_dataset):
    import cosmicai

    name = "tiny-api"
    data, result = f"s3://{DATA_BUCKET}/{DATA_PREFIX}/tiny-api", f"s3://{RESULT_BUCKET}/{RESULT_PREFIX}/{name}"
    arn = _state_machine(stack, "eu-west-1")
    out = cosmicai.run(data, result, backend="aws", state_machine_arn=arn, region="eu-west-1", name=name,
                       upload=tiny_dataset, model=MODEL, batch_size=5, world_size=4, poll_s=0.5, timeout_s=120)
    assert out.complete and out.failures == [] and out.summary["completeness"]["rows_out"] == 48
    assert out.execution_arn == f"{arn.replace(':stateMachine:', ':execution:')}:{name}"
    assert sorted(out.predictions(["object_id"]).column("object_id").to_pylist()) == list(range(48))
    assert out.metrics == storage.read_json(f"{result}/summary.json")["metrics"]


def test_crafted_events_get_a_one_line_lambda_error_and_write_nothing(stack, tiny_dataset):
    """Invoked through the Lambda API (the runtime's error shape: FunctionError, errorType, errorMessage)."""
    name = "tiny-crafted"
    data, result = f"s3://{DATA_BUCKET}/{DATA_PREFIX}/crafted", f"s3://{RESULT_BUCKET}/{RESULT_PREFIX}/{name}"
    for file in sorted(os.listdir(tiny_dataset)):
        storage.write_bytes(f"{data}/{file}", open(os.path.join(tiny_dataset, file), "rb").read())
    lam = stack.client("lambda")

    def invoke(function, event):
        resp = lam.invoke(FunctionName=function, Payload=json.dumps(event).encode())
        return resp.get("FunctionError"), json.loads(resp["Payload"].read())

    error, state = invoke("cai-initialize", {"config": {"data": data, "model": MODEL, "world_size": 2},
                                             "execution_name": name})
    assert error is None and state["result_url"] == result and state["num_tasks"] == 2
    items = storage.read_json(f"{result}/tasks.json")
    files = sorted(storage.list_files(result, recursive=True))
    crafted = [dict(items[0], rank=7), None, "rank 0", dict(items[1], rank=1.0),
               dict(items[0], task=dict(items[0]["task"], config=dict(items[0]["task"]["config"], model="os:system")))]
    expected = ["rank 7 is not in the plan", "infer event must be a JSON object, got NoneType",
                "infer event must be a JSON object, got str", "rank must be an integer >= 0, got 1.0",
                "task.config.model: 'os:system' is not a model of this stack"]
    for event, message in zip(crafted, expected):
        error, payload = invoke("cai-infer", event)
        assert error == "Unhandled" and payload["errorType"] == "ConfigError", payload
        assert message in payload["errorMessage"] and "\n" not in payload["errorMessage"]
    error, payload = invoke("cai-initialize", [data])
    assert payload["errorType"] == "ConfigError" and "Initialize event must be a JSON object" in payload["errorMessage"]
    assert sorted(storage.list_files(result, recursive=True)) == files
