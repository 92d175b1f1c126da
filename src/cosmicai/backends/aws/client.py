"""boto3 side of ``cai aws``: find the state machine, start a named execution, follow its Distributed Map,
and read the result. Every client honours an explicit endpoint or ``AWS_ENDPOINT_URL`` (boto3 reads it
natively), so the same code runs against moto's server in the tests.
"""

from __future__ import annotations

import json
import time
import uuid
from contextlib import contextmanager
from typing import Any, Callable, Iterator

from ...errors import ConfigError, StorageError
from .trust import EXECUTION_NAME_RE

TERMINAL = ("SUCCEEDED", "FAILED", "TIMED_OUT", "ABORTED")
NO_REGION = ("no AWS region: give --region REGION, or set AWS_REGION (or AWS_DEFAULT_REGION), or a region in the "
             "AWS profile's config")
NO_CREDENTIALS = ("no AWS credentials: set AWS_ACCESS_KEY_ID and AWS_SECRET_ACCESS_KEY (and AWS_SESSION_TOKEN for "
                  "temporary ones), or AWS_PROFILE naming a profile in ~/.aws/credentials, or run where an IAM role "
                  "provides them")
#: AWS error codes that mean the credentials themselves were refused.
_CREDENTIAL_CODES = ("ExpiredToken", "ExpiredTokenException", "InvalidClientTokenId", "UnrecognizedClientException",
                     "SignatureDoesNotMatch", "InvalidSignatureException", "AuthFailure")


def session(region: str | None = None) -> Any:
    """A boto3 session with a region and credentials; ConfigError naming the flag or variable to set otherwise."""
    import boto3

    with aws_errors():
        sess = boto3.session.Session(region_name=region or None)
        if not sess.region_name:
            raise ConfigError(NO_REGION)
        if sess.get_credentials() is None:
            raise ConfigError(NO_CREDENTIALS)
    return sess


def region_of(region: str | None = None) -> str:
    """The region a command uses: ``region``, else AWS_REGION / AWS_DEFAULT_REGION / the profile's; ConfigError
    naming them when there is none (needs no credentials)."""
    import boto3

    with aws_errors():
        found = boto3.session.Session(region_name=region or None).region_name
    if not found:
        raise ConfigError(NO_REGION)
    return found


def client(service: str, endpoint: str | None = None, region: str | None = None) -> Any:
    """A boto3 client; ``endpoint`` overrides AWS_ENDPOINT_URL (which boto3 already honours). A missing region or
    credentials is a one-line ConfigError here, before any call; calls time out (10 s to connect, 60 s to read)."""
    from botocore.config import Config

    with aws_errors():
        return session(region).client(service, endpoint_url=endpoint or None,
                                      config=Config(connect_timeout=10, read_timeout=60))


@contextmanager
def aws_errors() -> Iterator[None]:
    """Turn botocore's exceptions into one-line CaiErrors naming what to set or check."""
    from botocore.exceptions import (BotoCoreError, ClientError, ConnectTimeoutError, EndpointConnectionError,
                                     NoCredentialsError, NoRegionError, PartialCredentialsError, ProfileNotFound,
                                     ReadTimeoutError)

    try:
        yield
    except NoRegionError as exc:
        raise ConfigError(NO_REGION) from exc
    except NoCredentialsError as exc:
        raise ConfigError(NO_CREDENTIALS) from exc
    except PartialCredentialsError as exc:
        raise ConfigError(f"incomplete AWS credentials ({exc}): set both AWS_ACCESS_KEY_ID and "
                          "AWS_SECRET_ACCESS_KEY, or AWS_PROFILE") from exc
    except ProfileNotFound as exc:
        raise ConfigError(f"{exc}: set AWS_PROFILE to a profile in ~/.aws/config, or unset it") from exc
    except (EndpointConnectionError, ConnectTimeoutError, ReadTimeoutError) as exc:
        raise StorageError(f"cannot reach AWS: {exc} (check --endpoint / AWS_ENDPOINT_URL, --region and the "
                           "network)") from exc
    except ClientError as exc:
        error = exc.response.get("Error", {})
        code, message = error.get("Code", "Error"), " ".join(str(error.get("Message", exc)).split())
        hint = (" (check the AWS credentials: AWS_ACCESS_KEY_ID / AWS_SECRET_ACCESS_KEY / AWS_SESSION_TOKEN or "
                "AWS_PROFILE)") if code in _CREDENTIAL_CODES else ""
        raise ConfigError(f"AWS refused {exc.operation_name}: {code}: {message}{hint}") from exc
    except BotoCoreError as exc:
        raise StorageError(f"AWS: {' '.join(str(exc).split())}") from exc


def stack_outputs(cfn: Any, stack: str) -> dict[str, str]:
    """The Outputs of a deployed stack as a dict; ConfigError when the stack does not exist."""
    from botocore.exceptions import ClientError

    try:
        stacks = cfn.describe_stacks(StackName=stack)["Stacks"]
    except ClientError as exc:
        if exc.response.get("Error", {}).get("Code") != "ValidationError":
            raise
        raise ConfigError(f"--stack {stack}: {exc.response['Error'].get('Message', exc)}") from exc
    return {o["OutputKey"]: o["OutputValue"] for o in stacks[0].get("Outputs", [])}


def run_name(prefix: str = "cai") -> str:
    """A unique execution name (also the run's result folder): ``cai-YYYYmmdd-HHMMSS-xxxxxx``."""
    return f"{prefix}-{time.strftime('%Y%m%d-%H%M%S', time.gmtime())}-{uuid.uuid4().hex[:6]}"


def check_name(name: str) -> str:
    if not EXECUTION_NAME_RE.match(name):
        raise ConfigError(f"--name {name!r}: execution names are 1-80 characters of letters, digits, '-' and '_'")
    return name


def start_run(sfn: Any, state_machine_arn: str, run_input: dict[str, Any], name: str) -> str:
    """Start a NAMED execution with the run config as input; returns the execution ARN."""
    from botocore.exceptions import ClientError

    try:
        resp = sfn.start_execution(stateMachineArn=state_machine_arn, name=check_name(name),
                                   input=json.dumps(run_input))
    except ClientError as exc:
        if exc.response.get("Error", {}).get("Code") in _CREDENTIAL_CODES:
            raise
        raise ConfigError(f"cannot start execution {name} on {state_machine_arn}: "
                          f"{exc.response['Error'].get('Message', exc)}") from exc
    return resp["executionArn"]


def map_progress(sfn: Any, execution_arn: str) -> dict[str, Any] | None:
    """ItemCounts of the execution's Distributed Map run (ListMapRuns + DescribeMapRun), or None before it starts."""
    runs = sfn.list_map_runs(executionArn=execution_arn).get("mapRuns", [])
    if not runs:
        return None
    desc = sfn.describe_map_run(mapRunArn=runs[-1]["mapRunArn"])
    return {"map_run_arn": desc["mapRunArn"], "status": desc.get("status"), "items": desc.get("itemCounts", {}),
            "executions": desc.get("executionCounts", {}), "max_concurrency": desc.get("maxConcurrency")}


def status(sfn: Any, execution_arn: str) -> dict[str, Any]:
    """Execution status, Map progress, output (parsed) and error/cause of a run."""
    from botocore.exceptions import ClientError

    try:
        desc = sfn.describe_execution(executionArn=execution_arn)
    except ClientError as exc:
        if exc.response.get("Error", {}).get("Code") not in ("ExecutionDoesNotExist", "InvalidArn"):
            raise
        raise ConfigError(f"{execution_arn}: {exc.response['Error'].get('Message', exc)}") from exc
    out: dict[str, Any] = {"execution_arn": execution_arn, "name": desc.get("name"), "status": desc["status"],
                           "start": str(desc.get("startDate")), "stop": str(desc.get("stopDate") or "") or None}
    if desc.get("input"):
        out["input"] = json.loads(desc["input"])
    if desc.get("output"):
        out["output"] = json.loads(desc["output"])
    for key in ("error", "cause"):
        if desc.get(key):
            out[key] = desc[key]
    out["map"] = map_progress(sfn, execution_arn)
    return out


def wait(sfn: Any, execution_arn: str, poll_s: float = 2.0, timeout_s: float | None = None,
         on_update: Callable[[dict[str, Any]], None] | None = None) -> dict[str, Any]:
    """Poll until the execution ends, calling ``on_update(status)`` each time; returns the final status."""
    t0 = time.monotonic()
    while True:
        st = status(sfn, execution_arn)
        if on_update is not None:
            on_update(st)
        if st["status"] in TERMINAL:
            return st
        if timeout_s is not None and time.monotonic() - t0 > timeout_s:
            raise TimeoutError(f"{execution_arn} still {st['status']} after {timeout_s:.0f} s "
                               f"(it keeps running; follow it with `cai aws status {execution_arn}`)")
        time.sleep(poll_s)


def progress_line(st: dict[str, Any]) -> str:
    """One human line: execution status and the Map's item counts."""
    line = f"{st['status']:<9}"
    m = st.get("map")
    if m:
        c = m["items"]
        line += (f" ranks: {c.get('succeeded', 0)}/{c.get('total', 0)} succeeded, {c.get('running', 0)} running, "
                 f"{c.get('pending', 0)} pending, {c.get('failed', 0) + c.get('timedOut', 0) + c.get('aborted', 0)} failed")
    else:
        line += " (planning)" if st["status"] == "RUNNING" else ""
    return line


def upload_dataset(local_dir: str, data_url: str) -> int:
    """Copy the files of a local dataset folder to ``data_url`` (s3://); returns the number of files."""
    import os

    from ... import storage

    if not os.path.isdir(local_dir):
        raise ConfigError(f"--upload {local_dir}: not a folder")
    if not data_url.startswith("s3://"):
        raise ConfigError(f"--upload needs an s3:// data URL, got {data_url!r}")
    names = sorted(n for n in os.listdir(local_dir) if os.path.isfile(os.path.join(local_dir, n)))
    if not names:
        raise ConfigError(f"--upload {local_dir}: the folder holds no files")
    for name in names:
        with open(os.path.join(local_dir, name), "rb") as fh:
            storage.write_bytes(storage.join(data_url, name), fh.read())
    return len(names)


def read_summary(result_url: str) -> dict[str, Any] | None:
    """The run's summary.json, or None when Summarize did not write one."""
    from ... import storage
    from ...results import RunFolder

    try:
        return storage.read_json(RunFolder(result_url).summary)
    except StorageError:
        return None
