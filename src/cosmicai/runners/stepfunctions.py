"""The Step Functions runner (``aws`` in the runner registry): start a named execution of the deployed state
machine, follow it to the end and fetch the run's summary. Plan, the Map of ranks and summarize all run in the
cloud. It prints only when asked (``progress=True``: the start and the Map's item counts)."""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

from ..backends.aws import client as aws
from ..backends.aws.trust import run_result_url
from ..config import RunConfig, canonical_url, load_config
from ..errors import ConfigError
from ..results import RunResult


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
    run_input = dict(run_input)
    if not state_machine_arn and not stack:
        raise ConfigError(NO_TARGET)
    # Validated once, here, before anything starts (the Initialize Lambda checks it again, in the cloud).
    given = "result" in run_input or "result_path" in run_input
    config, _ = load_config({k: v for k, v in run_input.items() if k != "aws"},
                            **({} if given else {"result": "s3://cai-result-location/unnamed"}))
    with aws.aws_errors():
        sfn = aws.client("stepfunctions", endpoint, region)
        outputs: dict[str, str] = {}
        if stack:
            outputs = aws.stack_outputs(aws.client("cloudformation", endpoint, region), stack)
            state_machine_arn = state_machine_arn or outputs.get("StateMachineArn")
        if not state_machine_arn:
            raise ConfigError(f"stack {stack} has no StateMachineArn output (is it a `cai aws deploy` stack?)")
        name = aws.check_name(name) if name else aws.run_name()
        result_url = config.result
        if not given:  # the one default of an AWS run's result: the stack's location plus the execution name
            if not outputs.get("ResultLocation"):
                raise ConfigError("no result URL: give result='s3://...' (or a stack, whose outputs name the result "
                                  "location)")
            result_url = canonical_url(run_result_url(outputs["ResultLocation"], name), "result")
            run_input["result"] = result_url
        uploaded = aws.upload_dataset(upload, config.data) if upload else None
        arn = aws.start_run(sfn, state_machine_arn, run_input, name)
        if on_start is not None:
            on_start(arn, name, result_url, uploaded)
        if not wait:
            return Execution(arn, name, {"status": "RUNNING"}, result_url, None)
        final = aws.wait(sfn, arn, poll_s=poll_s, timeout_s=timeout_s, on_update=on_update)
        return Execution(arn, name, final, result_url, aws.read_summary(result_url))


#: Without a state machine.
NO_TARGET = "no state machine to run on: give stack=NAME (a stack `cai aws deploy` made) or state_machine_arn=ARN"


class StepFunctionsRunner:
    """The ``aws`` runner: each :meth:`run` is one named execution of the deployed state machine (``stack=`` or
    ``state_machine_arn=``), followed to its end. ``upload=``: a local dataset folder copied to the data URL first.
    ``max_concurrency=`` and ``tolerated_failure_percentage=`` override the stack's Map settings for its runs."""

    name = "aws"

    def __init__(self, *, stack: str | None = None, state_machine_arn: str | None = None,
                 endpoint: str | None = None, region: str | None = None, name: str | None = None,
                 upload: str | None = None, poll_s: float = 2.0, timeout_s: float | None = None, wait: bool = True,
                 max_concurrency: int | None = None, tolerated_failure_percentage: float | None = None,
                 on_start: Callable[[str, str, str, int | None], None] | None = None,
                 on_update: Callable[[dict[str, Any]], None] | None = None):
        if not state_machine_arn and not stack:
            raise ConfigError(NO_TARGET)
        self.target = {"stack": stack, "state_machine_arn": state_machine_arn, "endpoint": endpoint,
                       "region": region}
        self.name_, self.upload, self.poll_s, self.timeout_s, self.wait = name, upload, poll_s, timeout_s, wait
        self.map_options = {k: v for k, v in (("max_concurrency", max_concurrency),
                                              ("tolerated_failure_percentage", tolerated_failure_percentage))
                            if v is not None}
        self.on_start, self.on_update = on_start, on_update
        self.last: Execution | None = None

    def run(self, config: RunConfig | dict[str, Any], *, progress: bool = False, report: bool = False) -> RunResult:
        """Run ``config`` (a RunConfig or a run config mapping; without a result, the stack's result location
        plus the execution name) as one execution; returns its result. An execution that wrote no summary, or
        failed ranks without ``allow_failures``, raise IncompleteRunError."""
        from ..pipeline.summarize import IncompleteRunError, incomplete_message

        run_input = ({k: v for k, v in config.plan_dict().items() if v is not None}
                     if isinstance(config, RunConfig) else dict(config))
        run_input.pop("backend", None)
        if self.map_options:
            run_input["aws"] = {**(run_input.get("aws") or {}), **self.map_options}
        on_start, on_update = self.on_start, self.on_update
        if progress:
            on_start, on_update = on_start or self._print_start(run_input.get("data")), on_update or _print_update()
        execution = run_on_stepfunctions(run_input, **self.target, name=self.name_ or None, upload=self.upload,
                                         poll_s=self.poll_s, timeout_s=self.timeout_s, wait=self.wait,
                                         on_update=on_update, on_start=on_start)
        self.last = execution
        if not self.wait:
            return RunResult(execution.result_url, {}, execution.arn)
        if execution.summary is None:
            raise IncompleteRunError(f"execution {execution.name} ended {execution.status.get('status')} "
                                     f"({execution.status.get('error')}) and wrote no summary under "
                                     f"{execution.result_url}")
        if report:
            from ..pipeline.report import format_report

            print(format_report(execution.summary))
        complete = (execution.summary.get("completeness") or {}).get("complete")
        if not complete and not run_input.get("allow_failures"):
            raise IncompleteRunError(incomplete_message(execution.summary))
        return RunResult(execution.result_url, execution.summary, execution.arn)

    def _print_start(self, data: Any) -> Callable[[str, str, str, int | None], None]:
        def started(execution: str, name: str, result: str, uploaded: int | None) -> None:
            if uploaded is not None:
                print(f"uploaded {uploaded} file(s) from {self.upload} to {data}")
            print(f"started execution {name}\n  {execution}\n  results: {result}", flush=True)

        return started

    def close(self) -> None:
        """Nothing to stop: the executions run in the cloud (one still running goes on)."""


def _print_update() -> Callable[[dict[str, Any]], None]:
    """Prints the Map's progress line when it changes."""
    import time

    last = [""]

    def show(status: dict[str, Any]) -> None:
        line = aws.progress_line(status)
        if line != last[0]:
            print(f"  [{time.strftime('%H:%M:%S')}] {line}", flush=True)
            last[0] = line

    return show
