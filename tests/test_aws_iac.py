"""The AWS infrastructure as code: the ASL definition (asl-validator), template.yaml (cfn-lint, IAM scope),
the Dockerfile, and the commands `cai aws deploy` prints."""

from __future__ import annotations

import json
import shutil
import subprocess
from pathlib import Path

import pytest

from cosmicai.backends.aws import definition, handlers
from cosmicai.cli import main

AWS_DIR = Path(definition.ASL_PATH).parent
ROOT = Path(__file__).resolve().parents[1]
VALIDATOR = ROOT / "node_modules" / ".bin" / "asl-validator"
SAMPLE = {"InitializeFunctionArn": "arn:aws:lambda:us-east-1:123456789012:function:cai-initialize",
          "InferFunctionArn": "arn:aws:lambda:us-east-1:123456789012:function:cai-infer",
          "SummarizeFunctionArn": "arn:aws:lambda:us-east-1:123456789012:function:cai-summarize",
          "ResultBucket": "cai-results", "MapResultsPrefix": "cai-results/_map-runs"}
LAMBDA_ERRORS = {"Lambda.ServiceException", "Lambda.AWSLambdaException", "Lambda.SdkClientException",
                 "Lambda.TooManyRequestsException"}


def _template() -> dict:
    from cfnlint.decode import decode_str

    tpl, errors = decode_str((AWS_DIR / "template.yaml").read_text())
    assert not errors
    return tpl


def _asl_validator(path: Path) -> subprocess.CompletedProcess:
    if not VALIDATOR.exists() or shutil.which("node") is None:
        pytest.skip("asl-validator not installed: run `npm install` at the repository root (package.json)")
    return subprocess.run([str(VALIDATOR), "--json-path", str(path)], capture_output=True, text=True, timeout=60)


def test_asl_validator_accepts_the_definition_and_rejects_a_broken_one(tmp_path):
    good = tmp_path / "good.asl.json"
    good.write_text(definition.render(SAMPLE))
    res = _asl_validator(good)
    assert res.returncode == 0, res.stdout + res.stderr
    broken = definition.load(SAMPLE)
    broken["States"]["Initialize"]["Next"] = "NoSuchState"
    bad = tmp_path / "bad.asl.json"
    bad.write_text(json.dumps(broken))
    res = _asl_validator(bad)
    assert res.returncode != 0 and "NoSuchState" in res.stdout + res.stderr


def test_definition_shape_distributed_map_retry_and_catch():
    asl = definition.load(SAMPLE)
    assert asl["StartAt"] == "Initialize" and asl["States"]["Initialize"]["Next"] == "InferRanks"
    m = asl["States"]["InferRanks"]
    assert m["Type"] == "Map" and m["Next"] == "Summarize"
    assert m["ItemReader"]["Resource"] == "arn:aws:states:::s3:getObject"
    assert m["ItemReader"]["ReaderConfig"] == {"InputType": "JSON"}
    assert m["ItemProcessor"]["ProcessorConfig"] == {"Mode": "DISTRIBUTED", "ExecutionType": "STANDARD"}
    assert m["MaxConcurrencyPath"] == "$.max_concurrency"
    assert m["ToleratedFailurePercentagePath"] == "$.tolerated_failure_percentage"
    infer = m["ItemProcessor"]["States"]["Infer"]
    assert infer["Parameters"]["FunctionName"] == SAMPLE["InferFunctionArn"]
    retried = set().union(*(set(r["ErrorEquals"]) for r in infer["Retry"]))
    assert LAMBDA_ERRORS | {"States.TaskFailed"} <= retried
    assert all(r["BackoffRate"] >= 2 and r["MaxAttempts"] >= 2 for r in infer["Retry"])
    assert infer["Catch"] == [{"ErrorEquals": ["States.ALL"], "ResultPath": "$.error", "Next": "RecordFailure"}]
    record = m["ItemProcessor"]["States"]["RecordFailure"]["Parameters"]["Payload"]
    assert record["action"] == "record_failure" and record["error.$"] == "$.error"
    assert asl["States"]["Summarize"]["End"] is True
    for name in ("Initialize", "Summarize"):
        assert LAMBDA_ERRORS <= set(asl["States"][name]["Retry"][0]["ErrorEquals"])


def test_cfn_lint_reports_no_errors_on_the_template():
    from cfnlint.api import lint_file

    matches = lint_file(AWS_DIR / "template.yaml")
    assert [str(m) for m in matches] == []


def test_template_parameters_substitutions_and_log_retention():
    tpl = _template()
    params = set(tpl["Parameters"])
    assert {"MemorySize", "Timeout", "EphemeralStorage", "Architecture", "InferReservedConcurrency", "MaxConcurrency",
            "ToleratedFailurePercentage", "DataBucket", "DataPrefix", "ResultBucket", "ResultPrefix"} <= params
    assert tpl["Parameters"]["Architecture"]["AllowedValues"] == ["x86_64", "arm64"]
    res = tpl["Resources"]
    sm = res["PipelineStateMachine"]["Properties"]
    assert sm["DefinitionUri"] == "statemachine.asl.json"
    assert set(sm["DefinitionSubstitutions"]) == definition.placeholders()
    groups = [r for r in res.values() if r["Type"] == "AWS::Logs::LogGroup"]
    assert len(groups) == 4 and all(g["Properties"]["RetentionInDays"] == {"Ref": "LogRetentionDays"} for g in groups)
    for name, fn in (("InitializeFunction", "initialize"), ("InferFunction", "infer"),
                     ("SummarizeFunction", "summarize")):
        props = res[name]["Properties"]
        handler = props["ImageConfig"]["Command"][0]
        assert handler == f"cosmicai.backends.aws.handlers.{fn}" and callable(getattr(handlers, fn))
        assert props["PackageType"] == "Image" and "LoggingConfig" in props


def _statements(tpl: dict) -> list[dict]:
    out = []
    for res in tpl["Resources"].values():
        props = res.get("Properties", {})
        if res["Type"] == "AWS::IAM::ManagedPolicy":
            out += props["PolicyDocument"]["Statement"]
        for pol in props.get("Policies", []) if isinstance(props.get("Policies"), list) else []:
            if isinstance(pol, dict) and "Statement" in pol:
                out += pol["Statement"]
    return out


def _as_list(value):
    return value if isinstance(value, list) else [value]


def test_iam_is_least_privilege():
    tpl = _template()
    text = (AWS_DIR / "template.yaml").read_text()
    assert "FullAccess" not in text and "AdministratorAccess" not in text
    statements = _statements(tpl)
    assert len(statements) >= 8
    for st in statements:
        actions = _as_list(st["Action"])
        assert all(a != "*" and not a.endswith(":*") for a in actions), st
        if st["Resource"] == "*":
            # Only CloudWatch Logs delivery (which AWS requires on "*") may use a wildcard resource.
            assert st["Sid"] == "VendedLogDelivery" and all(a.startswith("logs:") for a in actions)
    by_sid = {st["Sid"]: st for st in statements}
    assert by_sid["ReadDataObjects"]["Action"] == "s3:GetObject"
    assert by_sid["ListDataPrefix"]["Condition"]["StringLike"]["s3:prefix"][1] == {"Fn::Sub": "${DataPrefix}/*"}
    assert set(by_sid["ReadWriteResultObjects"]["Action"]) == {"s3:GetObject", "s3:PutObject", "s3:DeleteObject"}
    assert "${ResultPrefix}/*" in by_sid["ReadWriteResultObjects"]["Resource"]["Fn::Sub"]
    assert by_sid["DistributedMapChildExecutions"]["Resource"]["Fn::Sub"].endswith(":stateMachine:${AWS::StackName}-pipeline")
    sm_policies = tpl["Resources"]["PipelineStateMachine"]["Properties"]["Policies"]
    invoked = [p["LambdaInvokePolicy"]["FunctionName"]["Ref"] for p in sm_policies if "LambdaInvokePolicy" in p]
    assert invoked == ["InitializeFunction", "InferFunction", "SummarizeFunction"]
    # The summarize function cannot read the datasets.
    assert tpl["Resources"]["SummarizeFunction"]["Properties"]["Policies"] == [{"Ref": "ResultReadWritePolicy"}]


def test_dockerfile_worker_image_handlers_and_no_secrets():
    text = (AWS_DIR / "Dockerfile").read_text()
    lines = [ln for ln in text.splitlines() if ln and not ln.startswith("#")]
    # 3.12, not 3.11: the python:3.11 image is Amazon Linux 2 (glibc 2.26), which cannot load onnxruntime's,
    # numpy's and pyarrow's manylinux_2_27/2_28 wheels. tests/test_lambda_image.py runs the steps themselves.
    assert lines[0] == "FROM public.ecr.aws/lambda/python:3.12"
    assert "pytorch.org" not in text and "TORCH" not in text and "CAI_ONNX_CACHE" not in text  # nothing exported
    for env in ("HOME=/tmp", "XDG_CACHE_HOME=/tmp/.cache", "CAI_MODEL=astromae-demo", "CAI_MODE=exact"):
        assert env in text
    installs = [ln for ln in lines if "pip install" in ln]
    assert len(installs) == 1 and "--require-hashes" in installs[0] and "--only-binary=:all:" in installs[0]
    assert "torch" not in installs[0] and "find_spec(m)]" in text  # and the build fails if torch is importable
    assert '-r "${LAMBDA_TASK_ROOT}/worker-requirements.txt" --target "${LAMBDA_TASK_ROOT}"' in text
    assert "COPY cosmicai ${LAMBDA_TASK_ROOT}/cosmicai" in lines
    cmd = [ln for ln in lines if ln.startswith("CMD")]
    assert cmd == ['CMD ["cosmicai.backends.aws.handlers.infer"]']
    assert "for m in ('exact', 'fast')]" in text and "load_model('astromae-demo', mode=m)" in text  # build check
    lowered = text.lower()
    assert not any(s in lowered for s in ("aws_secret", "aws_access_key", "password", "token"))
    ignored = (ROOT / ".dockerignore").read_text().split()
    assert {".git", "node_modules", "tests", ".aws", ".env"} <= set(ignored)


def test_deploy_prints_build_push_and_sam_commands(capsys, tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)  # any folder: the build context is assembled from the installed package
    context = tmp_path / "ctx"
    rc = main(["aws", "deploy", "--print", "--stack", "cai", "--region", "eu-west-1", "--data-bucket", "dbk",
               "--data-prefix", "sets/sdss", "--result-bucket", "rbk", "--arch", "arm64", "--memory", "10240",
               "--max-concurrency", "500", "--tolerated-failure-percentage", "5", "--reserved-concurrency", "50",
               "--context", str(context)])
    out = capsys.readouterr().out
    assert rc == 0
    assert out.splitlines()[0] == f"# build context (the installed cosmicai package): {context}"
    assert "aws ecr create-repository --repository-name cosmicai-lambda --region eu-west-1" in out
    assert "aws ecr get-login-password --region eu-west-1 | docker login --username AWS --password-stdin " \
           "${ACCOUNT}.dkr.ecr.eu-west-1.amazonaws.com" in out
    assert "docker buildx build --platform linux/arm64 --provenance=false" in out
    dockerfile = context / "cosmicai" / "backends" / "aws" / "Dockerfile"
    assert f"-f {dockerfile} --load {context}" in out and dockerfile.is_file()
    assert (context / "cosmicai" / "backends" / "aws" / "worker-requirements.txt").is_file()
    assert 'docker push "${ACCOUNT}.dkr.ecr.eu-west-1.amazonaws.com/cosmicai-lambda:latest-arm64"' in out
    sam = [ln for ln in out.splitlines() if ln.startswith("sam deploy")][0]
    template = context / "cosmicai" / "backends" / "aws" / "template.yaml"
    for part in (f"--template-file {template}", "--stack-name cai", "Architecture=arm64",
                 "MemorySize=10240", "MaxConcurrency=500", "ToleratedFailurePercentage=5", "DataBucket=dbk",
                 "DataPrefix=sets/sdss", "ResultBucket=rbk", "InferReservedConcurrency=50"):
        assert part in sam
    assert template.is_file()
    # Every override names a real template parameter.
    params = set(_template()["Parameters"])
    overrides = sam.split("--parameter-overrides ", 1)[1].split()
    assert {o.strip('"').split("=", 1)[0] for o in overrides} <= params


def test_deploy_rejects_out_of_range_settings(capsys):
    rc = main(["aws", "deploy", "--print", "--stack", "cai", "--data-bucket", "d", "--data-prefix", "p",
               "--result-bucket", "r", "--memory", "20000"])
    assert rc == 2 and "--memory must be within 128-10240, got 20000" in capsys.readouterr().err
    rc = main(["aws", "deploy", "--print", "--stack", "cai", "--data-bucket", "d", "--data-prefix", "/p/",
               "--result-bucket", "r"])
    assert rc == 2 and "--data-prefix must be a non-empty key prefix" in capsys.readouterr().err

