"""``cai aws deploy | run | status | logs``: the serverless backend (Step Functions + Lambda), see docs/aws.md."""

from __future__ import annotations

import argparse
import functools
import json
import sys
import tempfile
import time
from typing import Any, Callable

from .run import add_run_args, cmd_run as run_command, execution_ended
from ..lambda_limits import (LAMBDA_TIMEOUT_S, MAX_EPHEMERAL_MB, MAX_MEMORY_MB, MIN_EPHEMERAL_MB,
                                   MIN_MEMORY_MB)


def register(subparsers: Any) -> None:
    """Add the ``aws`` command group."""
    p = subparsers.add_parser("aws", help="run on AWS Step Functions + Lambda (deploy, run, status, logs)",
                              description="The serverless backend. Every AWS call honours --endpoint or "
                              "AWS_ENDPOINT_URL (e.g. a local moto server).")
    sub = p.add_subparsers(dest="aws_command", metavar="SUBCOMMAND")

    d = sub.add_parser("deploy", help="build and push the Lambda image, deploy the SAM stack",
                       description="Builds the container image (docker buildx) from the INSTALLED cosmicai "
                       "package (copied into a build context folder, so it works from any directory), pushes it "
                       "to ECR and deploys template.yaml with sam. Runs the steps when aws, docker and sam are "
                       "installed (and --print is not given); otherwise prints the exact commands, for the build "
                       "context it leaves in place.")
    d.add_argument("--stack", help="CloudFormation stack name (also the functions' name prefix); required")
    d.add_argument("--region", help="AWS region (default AWS_REGION, AWS_DEFAULT_REGION or the profile's)")
    d.add_argument("--data-bucket", dest="data_bucket", help="bucket of the datasets; required")
    d.add_argument("--data-prefix", dest="data_prefix", help="datasets live under this key prefix; required")
    d.add_argument("--result-bucket", dest="result_bucket", help="bucket for run results; required")
    d.add_argument("--result-prefix", default="cai-results", dest="result_prefix",
                   help="key prefix of run results in --result-bucket (default cai-results)")
    d.add_argument("--weights-bucket", dest="weights_bucket", help="a bucket of weights files runs may name "
                   "(default: weights only under the data location)")
    d.add_argument("--weights-prefix", default="", dest="weights_prefix", help="key prefix of --weights-bucket")
    d.add_argument("--allowed-models", default="", dest="allowed_models", metavar="NAMES",
                   help="comma-separated models runs may name besides the built-in ones and --model (plug-in "
                   "entry-point names or module:factory paths installed in the image)")
    d.add_argument("--arch", choices=("x86_64", "arm64"), default="x86_64",
                   help="Lambda CPU architecture of the image and functions (default x86_64)")
    d.add_argument("--memory", type=int, default=3008,
                   help=f"inference Lambda memory, MB ({MIN_MEMORY_MB}-{MAX_MEMORY_MB})")
    d.add_argument("--timeout", type=int, default=LAMBDA_TIMEOUT_S, help=f"Lambda timeout, s (max {LAMBDA_TIMEOUT_S})")
    d.add_argument("--ephemeral", type=int, default=MIN_EPHEMERAL_MB,
                   help=f"Lambda /tmp size, MB ({MIN_EPHEMERAL_MB}-{MAX_EPHEMERAL_MB})")
    d.add_argument("--reserved-concurrency", type=int, default=0, dest="reserved_concurrency",
                   help="reserved concurrency of the inference Lambda (default 0: none reserved, the "
                        "account's pool)")
    d.add_argument("--max-concurrency", type=int, default=100, dest="max_concurrency",
                   help="default Distributed Map MaxConcurrency: ranks running at once (default 100)")
    d.add_argument("--tolerated-failure-percentage", type=float, default=0.0, dest="tolerated_failure_percentage",
                   help="default Distributed Map ToleratedFailurePercentage, 0-100, for ranks that fail "
                        "outright (default 0)")
    d.add_argument("--allow-failures", action="store_true", dest="allow_failures",
                   help="runs with failed ranks succeed by default (summary.json names the failed ranks); "
                        "without it such a run fails")
    d.add_argument("--model", default="astromae-demo", help="default model of runs (default astromae-demo)")
    d.add_argument("--repository", default="cosmicai-lambda", help="ECR repository name")
    d.add_argument("--tag", default="latest", help="container image tag pushed to --repository (default latest)")
    d.add_argument("--account", help="AWS account id (default: looked up with aws sts)")
    d.add_argument("--print", action="store_true", dest="print_only", help="only print the commands")
    d.add_argument("--context", metavar="DIR", help="assemble the Docker build context in DIR (kept; it must not "
                   "hold cosmicai/ yet). Default: a temporary folder, removed after a deploy, kept when the "
                   "commands are only printed")
    d.set_defaults(func=_one_line(cmd_deploy))

    r = sub.add_parser("run", help="start a named execution, follow it, print the summary (= cai run --backend aws)",
                       description="Starts a NAMED execution of the deployed state machine with the run config "
                       "as input, shows live progress from the Distributed Map's item counts, then downloads "
                       "and prints summary.json. Exit 0 when the execution succeeded. The same as "
                       "`cai run --backend aws`.")
    add_run_args(r)
    r.set_defaults(func=_one_line(cmd_run), backend="aws")

    s = sub.add_parser("status", help="status, Map progress and result of an execution")
    s.add_argument("execution_arn", help="ARN of the execution (printed by `cai aws run`)")
    s.add_argument("--json", action="store_true", help="print the status as JSON")
    _common_args(s)
    s.set_defaults(func=_one_line(cmd_status))

    lg = sub.add_parser("logs", help="Lambda REPORT lines -> duration, memory, init time and cost per invocation",
                        description="Reads the REPORT lines of a function's CloudWatch log group and prices every "
                        "invocation (one invocation = one rank for the infer function).")
    lg.add_argument("--function", required=True, help="function name (e.g. STACK-infer) or log group (/aws/lambda/...)")
    lg.add_argument("--since", default="1h", help="how far back: 30m, 2h, 1d, or an ISO time (default 1h)")
    lg.add_argument("--arch", choices=("x86_64", "arm64"), help="price table (default: the function's architecture)")
    lg.add_argument("--memory", type=int, help="price at this memory (MB) instead of each REPORT's Memory Size")
    lg.add_argument("--json", action="store_true", help="print the cost table as JSON")
    _common_args(lg)
    lg.set_defaults(func=_one_line(cmd_logs))
    p.set_defaults(func=lambda a: (p.print_help(), 2)[1])


def _one_line(command: Callable[[argparse.Namespace], int]) -> Callable[[argparse.Namespace], int]:
    """``command`` with botocore's errors (no region, no credentials, endpoint unreachable, AWS refusals) turned
    into one-line CaiErrors (the CLI prints ``cai: error: ...`` and exits 2)."""
    @functools.wraps(command)
    def run(args: argparse.Namespace) -> int:
        from ..backends.aws.client import aws_errors

        with aws_errors():
            return command(args)

    return run


def _common_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("--endpoint", help="AWS endpoint URL for every service (default AWS_ENDPOINT_URL or AWS)")
    p.add_argument("--region", help="AWS region (default AWS_REGION, AWS_DEFAULT_REGION or the profile's)")


def cmd_deploy(args: argparse.Namespace) -> int:
    """``cai aws deploy``."""
    from ..backends.aws import client as aws
    from ..backends.aws import deploy
    from ..errors import ConfigError

    needed = [flag for flag, value in (("--stack NAME", args.stack), ("--data-bucket BUCKET", args.data_bucket),
                                       ("--data-prefix PREFIX", args.data_prefix),
                                       ("--result-bucket BUCKET", args.result_bucket)) if not value]
    if needed:
        raise ConfigError(f"cai aws deploy needs {', '.join(needed)}")
    settings = deploy.DeploySettings(
        stack=args.stack, region=args.region or "", data_bucket=args.data_bucket, data_prefix=args.data_prefix,
        result_bucket=args.result_bucket, result_prefix=args.result_prefix, arch=args.arch, memory_mb=args.memory,
        timeout_s=args.timeout, ephemeral_mb=args.ephemeral, reserved_concurrency=args.reserved_concurrency,
        max_concurrency=args.max_concurrency, tolerated_failure_percentage=args.tolerated_failure_percentage,
        allow_failures=args.allow_failures, model=args.model, repository=args.repository, tag=args.tag,
        account=args.account, weights_bucket=args.weights_bucket or "", weights_prefix=args.weights_prefix,
        allowed_models=args.allowed_models).validate()
    settings.region = aws.region_of(args.region)
    missing = deploy.missing_tools()
    if not (args.print_only or missing):
        aws.session(settings.region)  # credentials, before anything is built or pushed
    if args.print_only or missing:
        context = deploy.build_context(args.context)
        if missing and not args.print_only:
            print(f"# {', '.join(missing)} not installed: run these commands where they are, with the build "
                  f"context {context} (elsewhere: copy it to the same path first):", file=sys.stderr)
        print(deploy.script(settings, context))
        return 0
    if args.context:
        deploy.execute(settings, deploy.build_context(args.context))
    else:
        with tempfile.TemporaryDirectory(prefix="cai-lambda-context-") as tmp:
            deploy.execute(settings, deploy.build_context(tmp))
    print(f"deployed stack {args.stack}; start a run with: cai aws run CONFIG --stack {args.stack}")
    return 0


def cmd_run(args: argparse.Namespace) -> int:
    """``cai aws run``: ``cai run`` with ``--backend aws`` by default."""
    return run_command(args)


def _report(st: dict[str, Any], result_url: str | None, summary: dict[str, Any] | None) -> int:
    rc = execution_ended(st)
    if summary is not None:
        from ..pipeline.report import format_report

        print(format_report(summary))
    elif result_url:
        print(f"no summary.json under {result_url}", file=sys.stderr)
    return rc


def cmd_status(args: argparse.Namespace) -> int:
    """``cai aws status``."""
    from ..backends.aws import client as aws

    sfn = aws.client("stepfunctions", args.endpoint, args.region)
    st = aws.status(sfn, args.execution_arn)
    if args.json:
        print(json.dumps(st, indent=1, default=str))
        return 0
    print(f"{st['name']}: {aws.progress_line(st)}")
    print(f"  started {st['start']}" + (f", stopped {st['stop']}" if st.get("stop") else ""))
    result_url = (st.get("output") or {}).get("result_url") or (st.get("input") or {}).get("result")
    if st["status"] in aws.TERMINAL:
        return _report(st, result_url, aws.read_summary(result_url) if result_url else None)
    return 0


def _since_ms(text: str) -> int:
    from datetime import datetime, timezone

    from ..errors import ConfigError

    units = {"s": 1, "m": 60, "h": 3600, "d": 86400}
    if text and text[-1] in units and text[:-1].replace(".", "", 1).isdigit():
        return int((time.time() - float(text[:-1]) * units[text[-1]]) * 1000)
    try:
        when = datetime.fromisoformat(text)
    except ValueError as exc:
        raise ConfigError(f"--since {text!r}: expected e.g. 30m, 2h, 1d or an ISO time") from exc
    if when.tzinfo is None:
        when = when.replace(tzinfo=timezone.utc)
    return int(when.timestamp() * 1000)


def cmd_logs(args: argparse.Namespace) -> int:
    """``cai aws logs``."""
    from ..backends.aws import client as aws
    from ..analysis.cost import cost_table
    from ..analysis.lambda_reports import parse_reports
    from ..backends.aws.logs import fetch_report_events
    from ..errors import ConfigError

    group = args.function if args.function.startswith("/") else f"/aws/lambda/{args.function}"
    arch = args.arch or _function_arch(args) or "x86_64"
    logs = aws.client("logs", args.endpoint, args.region)
    try:
        reports = parse_reports(fetch_report_events(logs, group, _since_ms(args.since)))
    except logs.exceptions.ResourceNotFoundException as exc:
        raise ConfigError(f"--function {args.function}: log group {group} not found") from exc
    table = cost_table(reports, arch, args.memory)
    if args.json:
        print(json.dumps(table, indent=1))
        return 0
    if not reports:
        print(f"no REPORT lines in {group} since {args.since}")
        return 0
    print(f"{'request id':<38} {'duration ms':>12} {'billed ms':>10} {'memory MB':>9} {'max used MB':>11} "
          f"{'init ms':>9} {'cost USD':>12}")
    for row in table["invocations"]:
        init = f"{row['init_ms']:.1f}" if row["init_ms"] is not None else "-"
        print(f"{row['request_id']:<38} {row['duration_ms']:>12.1f} {row['billed_ms']:>10.0f} {row['memory_mb']:>9} "
              f"{row['max_memory_mb']:>11} {init:>9} {row['cost_usd']:>12.8f}")
    t = table["total"]
    print(f"{t['invocations']} invocation(s), {t['cold_starts']} cold start(s), {t['billed_seconds']:.3f} billed s, "
          f"peak {t['max_memory_used_mb']} MB used, total ${t['cost_usd']:.6f} ({arch})")
    return 0


def _function_arch(args: argparse.Namespace) -> str | None:
    """The function's architecture from Lambda, or None when it cannot be read (e.g. no such function)."""
    if args.function.startswith("/"):
        return None
    from ..backends.aws import client as aws

    try:
        conf = aws.client("lambda", args.endpoint, args.region).get_function_configuration(FunctionName=args.function)
        return (conf.get("Architectures") or [None])[0]
    except Exception:  # noqa: BLE001 - the price table then defaults to x86_64 (or --arch)
        return None
