"""`cai aws run|status|logs|deploy` without a region, credentials or stack, or with an endpoint that is not there:
exit 2 and one line naming the flag or variable to set, in an environment without AWS variables and with HOME
pointed at an empty folder (no ~/.aws)."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest

from cosmicai.cli import main

ROOT = Path(__file__).resolve().parents[1]
ARN = "arn:aws:states:us-east-1:123456789012:execution:cai-pipeline:run-1"
DEPLOY = ["aws", "deploy", "--data-bucket", "d", "--data-prefix", "p", "--result-bucket", "r"]
NO_REGION = "no AWS region: give --region REGION, or set AWS_REGION (or AWS_DEFAULT_REGION)"
NO_CREDENTIALS = "no AWS credentials: set AWS_ACCESS_KEY_ID and AWS_SECRET_ACCESS_KEY"


@pytest.fixture
def bare(monkeypatch, tmp_path):
    """No AWS_* variable, HOME an empty folder, the instance metadata service off (no 1 s probe per call)."""
    for key in list(os.environ):
        if key.startswith("AWS_") or key == "CAI_S3_ENDPOINT":
            monkeypatch.delenv(key)
    home = tmp_path / "home"
    home.mkdir()
    monkeypatch.setenv("HOME", str(home))
    monkeypatch.setenv("AWS_EC2_METADATA_DISABLED", "true")
    return tmp_path


def _one_line(capsys, argv: list[str]) -> str:
    rc = main(argv)
    out = capsys.readouterr()
    lines = out.err.splitlines()
    assert rc == 2 and len(lines) == 1 and out.out == "", (rc, out.out, out.err)
    assert lines[0].startswith("cai: error: ")
    return lines[0]


@pytest.mark.parametrize("argv, expected", [
    (["aws", "run", "--data", "s3://b/d"], "no state machine to run on: give --stack NAME"),
    (["aws", "run", "--data", "s3://b/d", "--stack", "cai"], NO_REGION),
    (["aws", "run", "--data", "s3://b/d", "--stack", "cai", "--region", "us-east-1"], NO_CREDENTIALS),
    (["aws", "status", ARN], NO_REGION),
    (["aws", "status", ARN, "--region", "eu-west-1"], NO_CREDENTIALS),
    (["aws", "logs", "--function", "cai-infer"], NO_REGION),
    (["aws", "logs", "--function", "cai-infer", "--region", "eu-west-1"], NO_CREDENTIALS),
    (DEPLOY, "cai aws deploy needs --stack NAME"),
    (DEPLOY + ["--stack", "cai", "--print"], NO_REGION),
])
def test_missing_stack_region_or_credentials_is_one_line(bare, capsys, argv, expected):
    line = _one_line(capsys, argv)
    assert expected in line and "stack=NAME" not in line


def test_partial_credentials_and_a_region_from_the_environment(bare, capsys, monkeypatch):
    monkeypatch.setenv("AWS_DEFAULT_REGION", "eu-west-1")
    monkeypatch.setenv("AWS_ACCESS_KEY_ID", "AKIAEXAMPLE")
    line = _one_line(capsys, ["aws", "status", ARN])
    assert "incomplete AWS credentials" in line and "AWS_SECRET_ACCESS_KEY" in line


def test_deploy_checks_credentials_before_running_any_tool(bare, capsys, monkeypatch):
    tools = bare / "bin"
    tools.mkdir()
    ran = bare / "ran"
    for tool in ("aws", "docker", "sam"):
        (tools / tool).write_text(f"#!/bin/sh\necho {tool} >> {ran}\n")
        (tools / tool).chmod(0o755)
    monkeypatch.setenv("PATH", str(tools))
    context = bare / "ctx"
    line = _one_line(capsys, DEPLOY + ["--stack", "cai", "--region", "us-east-1", "--context", str(context)])
    assert NO_CREDENTIALS in line
    assert not ran.exists() and not context.exists()


def test_unreachable_endpoint_is_one_line(bare, capsys, monkeypatch):
    import socket

    with socket.socket() as sock:  # a port nothing listens on
        sock.bind(("127.0.0.1", 0))
        port = sock.getsockname()[1]
    monkeypatch.setenv("AWS_ACCESS_KEY_ID", "testing")
    monkeypatch.setenv("AWS_SECRET_ACCESS_KEY", "testing")
    monkeypatch.setenv("AWS_MAX_ATTEMPTS", "1")
    line = _one_line(capsys, ["aws", "status", ARN, "--region", "us-east-1", "--endpoint",
                              f"http://127.0.0.1:{port}"])
    assert f"cannot reach AWS: Could not connect to the endpoint URL: \"http://127.0.0.1:{port}/\"" in line
    assert "--endpoint / AWS_ENDPOINT_URL" in line


def test_aws_refusals_are_one_line(bare, capsys, monkeypatch, _moto_server):
    monkeypatch.setenv("AWS_ACCESS_KEY_ID", "testing")
    monkeypatch.setenv("AWS_SECRET_ACCESS_KEY", "testing")
    endpoint = ["--region", "us-east-1", "--endpoint", _moto_server.endpoint]
    line = _one_line(capsys, ["aws", "run", "--data", "s3://b/d", "--stack", "no-such-stack", *endpoint])
    assert line == "cai: error: --stack no-such-stack: Stack with id no-such-stack does not exist"
    line = _one_line(capsys, ["aws", "status", ARN, *endpoint])
    assert line.startswith(f"cai: error: {ARN}: ") and "does not exist" in line.lower()


def test_the_installed_cai_command_says_it_in_one_line(bare):
    cai = Path(sys.executable).with_name("cai")
    if not cai.exists():
        pytest.skip(f"no cai entry point beside {sys.executable}")
    env = dict(os.environ)
    proc = subprocess.run([str(cai), "aws", "run", "--data", "s3://b/d", "--stack", "cai"], env=env,
                          capture_output=True, text=True, timeout=60, cwd=bare)
    assert proc.returncode == 2 and proc.stdout == ""
    assert proc.stderr.splitlines() == [f"cai: error: {NO_REGION}, or a region in the AWS profile's config"]
