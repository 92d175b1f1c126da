"""The Step Functions runner: start a named execution of the deployed state machine, follow it to the end and
fetch the run's summary. ``cosmicai.run(..., backend="aws")`` calls it; it prints nothing."""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

from ..backends.aws import client as aws
from ..errors import ConfigError


@dataclass
class Execution:
    """A finished (or abandoned) execution: its ARN and name, the final status, the run's result URL and the
    summary Summarize wrote (None when it wrote none)."""

    arn: str
    name: str
    status: dict[str, Any]
    result_url: str
    summary: dict[str, Any] | None


def run_on_stepfunctions(run_input: dict[str, Any], *, state_machine_arn: str | None = None,
                         stack: str | None = None, endpoint: str | None = None, region: str | None = None,
                         name: str | None = None, upload: str | None = None, poll_s: float = 2.0,
                         timeout_s: float | None = None, wait: bool = True,
                         on_update: Callable[[dict[str, Any]], None] | None = None,
                         on_start: Callable[[str, str, str, int | None], None] | None = None) -> Execution:
    """Run ``run_input`` (a run config: data, result, model, ...) on the state machine named by
    ``state_machine_arn`` or by the outputs of ``stack``. Without a result URL the stack's ``ResultLocation``
    plus the execution name is used. ``upload``: a local dataset folder copied to the config's data URL first.
    ``on_start(execution_arn, name, result_url, files_uploaded or None)`` and ``on_update(status)`` report
    progress (the CLI prints them; nothing is printed otherwise). A missing region or credentials, an unreachable
    endpoint or an AWS refusal is a one-line CaiError."""
    from ..config import load_config

    run_input = dict(run_input)
    if not state_machine_arn and not stack:
        raise ConfigError(NO_TARGET)
    with aws.aws_errors():
        sfn = aws.client("stepfunctions", endpoint, region)
        outputs: dict[str, str] = {}
        if stack:
            outputs = aws.stack_outputs(aws.client("cloudformation", endpoint, region), stack)
            state_machine_arn = state_machine_arn or outputs.get("StateMachineArn")
        if not state_machine_arn:
            raise ConfigError(f"stack {stack} has no StateMachineArn output (is it a `cai aws deploy` stack?)")
        name = aws.check_name(name) if name else aws.run_name()
        if "result" not in run_input and "result_path" not in run_input:
            if not outputs.get("ResultLocation"):
                raise ConfigError("no result URL: give result='s3://...' (or a stack, whose outputs name the result "
                                  "location)")
            run_input["result"] = outputs["ResultLocation"].rstrip("/") + "/" + name
        config, _ = load_config({k: v for k, v in run_input.items() if k != "aws"})
        uploaded = aws.upload_dataset(upload, config.data) if upload else None
        arn = aws.start_run(sfn, state_machine_arn, run_input, name)
        if on_start is not None:
            on_start(arn, name, config.result, uploaded)
        if not wait:
            return Execution(arn, name, {"status": "RUNNING"}, config.result, None)
        final = aws.wait(sfn, arn, poll_s=poll_s, timeout_s=timeout_s, on_update=on_update)
        return Execution(arn, name, final, config.result, aws.read_summary(config.result))


#: Without a state machine (``cai aws run`` checks its --stack / --state-machine-arn flags first).
NO_TARGET = ("no state machine to run on: give stack=NAME (a stack `cai aws deploy` made) or state_machine_arn=ARN "
             "(on the command line: --stack NAME or --state-machine-arn ARN)")
