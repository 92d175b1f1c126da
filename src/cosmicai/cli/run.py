"""``cai run`` (plan -> infer -> summarize on any runner of the registry: local, dask, lithops, aws, plug-ins) and
``cai demo``."""

from __future__ import annotations

import argparse
import os
import sys
import time
from typing import Any

DEMO_SEED = 2024


def register(subparsers: Any) -> None:
    """Add ``run`` and ``demo``."""
    p = subparsers.add_parser("run", help="run inference over a dataset: plan -> infer -> summarize",
                              description="Run a model over a dataset on this machine (local process pool), a "
                              "Dask cluster, Lithops functions or the deployed AWS state machine (--backend). CONFIG "
                              "may be a native JSON/YAML run config or the original CAI payload (demo input.json); "
                              "options override it. A rerun with the same config resumes: only ranks without a "
                              "record run again.")
    add_run_args(p)
    p.set_defaults(func=cmd_run)

    d = subparsers.add_parser("demo", help="synthesise ~10,000 galaxies and run the demo model on them",
                              description="Synthesise SDSS-like galaxies, split them into native partitions "
                              "with a manifest, run the demo model over them locally and print the report.")
    d.add_argument("--galaxies", type=int, default=10_000, help="galaxies to synthesise (default 10,000)")
    d.add_argument("--out", default="cai-demo", help="output folder (default ./cai-demo)")
    d.add_argument("--partition-size", default="25MB", dest="partition_size", help="e.g. 25MB, 500KB")
    d.add_argument("--workers", type=int, help="local worker processes (default: the cores)")
    d.add_argument("--threads", type=int, help="compute threads per worker process (default: cores // workers)")
    d.add_argument("--model", default="astromae-demo", help="model name (default astromae-demo)")
    d.add_argument("--batch-size", type=int, default=256, dest="batch_size",
                   help="images per model call (default 256)")
    d.add_argument("--seed", type=int, default=DEMO_SEED,
                   help=f"random seed of the synthetic galaxies (default {DEMO_SEED})")
    d.add_argument("--quiet", action="store_true", help="no progress bar")
    d.set_defaults(func=cmd_demo)


def add_run_args(p: Any) -> None:
    """``cai run``'s arguments (``cai aws run`` takes the same, with the backend ``aws``)."""
    p.add_argument("config", nargs="?", help="run config file or URL (native or original CAI payload)")
    p.add_argument("--data", help="dataset URL (folder of partitions, local path or s3://)")
    p.add_argument("--result", help="result URL for plan.json, ranks/, predictions/ and the summary")
    p.add_argument("--model", help="model name (default astromae-demo)")
    p.add_argument("--weights", help="weights URL (safetensors) for the model")
    p.add_argument("--batch-size", type=int, dest="batch_size",
                   help="images per model call (default 256); lower it when a worker runs out of memory")
    p.add_argument("--file-limit", type=int, dest="file_limit", help="use only the first N partitions")
    p.add_argument("--world-size", type=int, dest="world_size", help="number of ranks (default: one per partition)")
    p.add_argument("--mode", choices=("exact", "fast"),
                   help="exact (default): fp32; fast: the ViT blocks in int8, checked against exact first "
                        "(see --fast-guard)")
    p.add_argument("--fast-guard", choices=("fallback", "strict", "off"), dest="fast_guard",
                   help="fast mode only: compare fast and exact on 256 rows first; over |dz| 2e-3 'fallback' "
                        "(default) predicts in exact mode, 'strict' refuses, 'off' skips the check")
    p.add_argument("--device", help="cpu, cuda, cuda:N (default cpu)")
    p.add_argument("--workers", type=int, help="local worker processes (default: the cores)")
    p.add_argument("--threads", type=int, help="compute threads per worker process, for ONNX Runtime or torch "
                                               "(default: cores // workers)")
    p.add_argument("--backend", help="where it runs: local (default), dask, lithops, aws, or a plug-in's "
                                      "(entry point groups cosmicai.backends, cosmicai.runners; docs/architecture.md)")
    p.add_argument("--scheduler", help="Dask scheduler address (with --backend dask)")
    p.add_argument("--endpoint", help="S3 endpoint URL (sets CAI_S3_ENDPOINT); with --backend aws, the endpoint of "
                                       "every AWS service")
    p.add_argument("--bucket-root", dest="bucket_root",
                   help="map a CAI payload's s3://BUCKET/... onto DIR/BUCKET/... (testing without S3)")
    p.add_argument("--allow-failures", action="store_true", default=None, dest="allow_failures",
                   help="exit 0 and summarize what finished even when ranks failed")
    p.add_argument("--overwrite", action="store_true", default=None,
                   help="replace the outputs of a different run under --result (only files that run wrote)")
    p.add_argument("--break-lease", action="store_true", default=None, dest="break_lease",
                   help="take over the result path from a run whose lease is stale (no heartbeat for 2 minutes)")
    p.add_argument("--allow-unsafe-lease", action="store_true", default=None, dest="allow_unsafe_lease",
                   help="accept running on an S3 server that ignores conditional writes, where two runs on one "
                        "result path are not excluded")
    p.add_argument("--task-timeout", dest="task_timeout", metavar="SECONDS",
                   help="fail a rank that runs longer than SECONDS and kill its worker; 'auto' (default) derives "
                        "it from the measured time per row with a wide margin; 0 or 'none': no timeout")
    p.add_argument("--drop-nonfinite", action="store_true", default=None, dest="drop_nonfinite",
                   help="keep rows with NaN/inf inputs as flagged rows with a NaN prediction instead of failing")
    p.add_argument("--no-prefetch", action="store_false", default=None, dest="prefetch",
                   help="fetch partitions one after another instead of overlapping fetch and compute")
    p.add_argument("--quiet", action="store_true", help="no progress bar")
    aws = p.add_argument_group("--backend aws (the deployed Step Functions state machine, docs/aws.md)")
    _add_aws_args(aws)


def _add_aws_args(p: Any) -> None:
    """Where the AWS runner finds its state machine, and how it starts and follows one execution."""
    p.add_argument("--stack", help="deployed stack name (its outputs give the state machine and result location)")
    p.add_argument("--state-machine-arn", dest="state_machine_arn",
                   help="the state machine to start, instead of --stack")
    p.add_argument("--region", help="AWS region (default AWS_REGION, AWS_DEFAULT_REGION or the profile's)")
    p.add_argument("--max-concurrency", type=int, dest="max_concurrency",
                   help="ranks running at once (default: the stack's Distributed Map MaxConcurrency)")
    p.add_argument("--tolerated-failure-percentage", type=float, dest="tolerated_failure_percentage",
                   help="override the stack's Distributed Map ToleratedFailurePercentage (0-100)")
    p.add_argument("--name", help="execution name (default cai-<time>-<random>); also the result folder")
    p.add_argument("--upload", metavar="DIR", help="first copy this local dataset folder to --data")
    p.add_argument("--poll", type=float, default=5.0, help="seconds between progress polls")
    p.add_argument("--timeout", type=float, help="stop following after this many seconds (the execution goes on)")
    p.add_argument("--no-wait", action="store_true", dest="no_wait", help="start it and print its ARN")


#: ``cai run`` options that are run config keys.
CONFIG_KEYS = ("data", "result", "model", "weights", "batch_size", "file_limit", "world_size", "mode", "fast_guard",
               "device", "workers", "threads", "backend", "scheduler", "endpoint", "allow_failures", "overwrite",
               "break_lease", "allow_unsafe_lease", "task_timeout", "drop_nonfinite", "prefetch", "bucket_root")


def run_and_report(runner: Any, config: Any, quiet: bool = False) -> int:
    """Run ``config`` on ``runner`` with a progress bar and the report; exit status 1 for an incomplete run."""
    from ..pipeline.summarize import IncompleteRunError

    try:
        runner.run(config, progress=not quiet, report=True)
    except IncompleteRunError as exc:
        print(f"cai: error: {exc}", file=sys.stderr)
        return 1
    finally:
        runner.close()
    return 0


def _run_and_report(config: Any, quiet: bool) -> int:
    from ..runners import get_runner

    return run_and_report(get_runner(config.backend), config, quiet)


def cmd_run(args: argparse.Namespace) -> int:
    """``cai run``."""
    from ..runners.registry import entry

    if args.backend and entry(args.backend).kind == "runner":
        return run_whole(args)
    if args.endpoint:
        os.environ["CAI_S3_ENDPOINT"] = args.endpoint
    if args.config and not args.config.lower().endswith((".json", ".yaml", ".yml")):
        from ..data.partition import convert_hint
        from ..errors import DataError

        hint = convert_hint(args.config)  # data given where the run config goes: name the command that fits
        if hint:
            raise DataError(f"{hint} (a run config is a .json or .yaml file; give data with --data)")
    return _run_and_report(config_from_args(args), args.quiet)


def config_from_args(args: argparse.Namespace) -> Any:
    """The RunConfig of ``cai run``'s arguments (the config file, then the options over it)."""
    from ..config import load_config

    config, unused = load_config(args.config, **{k: getattr(args, k) for k in CONFIG_KEYS})
    if unused:
        print(f"cai: note: {args.config}: not used by cosmicai: {', '.join(unused)}", file=sys.stderr)
    return config


def parse_run_args(argv: list[str]) -> argparse.Namespace:
    """``cai run ARGV`` parsed as ``cai run`` parses it (``cai cluster`` hands its RUN_ARGS over this way)."""
    from .parser import CaiArgumentParser

    parser = CaiArgumentParser(prog="cai")
    register(parser.add_subparsers(dest="command", parser_class=CaiArgumentParser))
    return parser.parse_args(["run", *argv])


def run_whole(args: argparse.Namespace) -> int:
    """``cai run --backend aws`` (and ``cai aws run``): a runner that runs whole runs in the cloud. The run config
    (file plus options) goes as it is; the runner validates it once, before anything starts."""
    from .. import storage
    from ..errors import ConfigError
    from ..pipeline.summarize import IncompleteRunError
    from ..runners import get_runner
    from ..runners.registry import runner_options

    if not args.config and not args.data:
        raise ConfigError("give a run config file or --data s3://bucket/prefix")
    raw: dict[str, Any] = {}
    if args.config:
        raw = storage.read_json(args.config)
        if not isinstance(raw, dict):
            raise ConfigError(f"{args.config}: a run config must be a JSON object")
    for key in CONFIG_KEYS:
        value = getattr(args, key, None)
        if value is not None and key not in ("backend", "endpoint"):
            raw[key] = value
    cli = {"poll_s": args.poll, "timeout_s": args.timeout, "wait": not args.no_wait}
    options = {k: cli[k] if k in cli else getattr(args, k, None) for k in runner_options(args.backend)
               if not k.startswith("on_")}
    if "stack" in options and not (options.get("stack") or options.get("state_machine_arn")):
        raise ConfigError("no state machine to run on: give --stack NAME (the stack `cai aws deploy` made) or "
                          "--state-machine-arn ARN")
    runner = get_runner(args.backend, **options)
    try:
        runner.run(raw, progress=not args.quiet, report=True)
    except TimeoutError as exc:  # --timeout passed: the execution goes on
        print(f"cai: {exc}", file=sys.stderr)
        return 1
    except IncompleteRunError as exc:
        execution_ended(_last_status(runner))
        print(f"cai: error: {exc}", file=sys.stderr)
        return 1
    if args.no_wait:
        return 0
    return execution_ended(_last_status(runner))


def _last_status(runner: Any) -> dict[str, Any]:
    return getattr(getattr(runner, "last", None), "status", None) or {}


def execution_ended(status: dict[str, Any]) -> int:
    """Print how an execution ended when it did not succeed (its error and cause); its exit status."""
    if status.get("error"):
        print(f"execution {status['status']}: {status['error']}: {_short_cause(status.get('cause'))}",
              file=sys.stderr)
    return 0 if status.get("status", "SUCCEEDED") == "SUCCEEDED" else 1


def _short_cause(cause: Any, limit: int = 2000) -> str:
    import json

    if not isinstance(cause, str):
        return str(cause)
    try:
        payload = json.loads(cause)
        if isinstance(payload, dict) and "errorMessage" in payload:
            return f"{payload.get('errorType')}: {payload['errorMessage']}"
    except json.JSONDecodeError:
        pass
    return cause[:limit]


def cmd_demo(args: argparse.Namespace) -> int:
    """``cai demo``: synthesise, split, run, report."""
    from ..config import RunConfig
    from ..data.formats import read_manifest
    from ..data.split import rows_per_partition
    from ..errors import ConfigError

    if args.galaxies < 1:
        raise ConfigError(f"--galaxies must be >= 1, got {args.galaxies}")
    rows_per_part = rows_per_partition(args.partition_size)
    out = os.path.abspath(args.out)
    data_url, result_url = os.path.join(out, "data"), os.path.join(out, "results")
    desc = f"cai demo: {args.galaxies} galaxies, seed {args.seed}, {rows_per_part} rows/partition"
    manifest = read_manifest(data_url) if os.path.exists(os.path.join(data_url, "manifest.json")) else None
    if manifest is not None and manifest.description == desc:
        print(f"cai demo: reusing {manifest.total_rows} galaxies in {data_url}", file=sys.stderr)
    else:
        from ..data.sources import Chunk
        from ..data.split import write_dataset
        from ..data.synth import iter_synthesize

        if manifest is not None:
            import shutil

            shutil.rmtree(data_url)
        print(f"cai demo: synthesising {args.galaxies} galaxies ...", file=sys.stderr)
        t0 = time.perf_counter()
        chunks = (Chunk("synth", int(p.object_id[0]), p, True)
                  for p in iter_synthesize(args.galaxies, seed=args.seed, chunk=rows_per_part, workers=args.workers))
        manifest = write_dataset(chunks, data_url, rows_per_part, progress=not args.quiet,
                                 total_rows=args.galaxies, description=desc).manifest
        print(f"cai demo: wrote {len(manifest.partitions)} partitions ({manifest.total_bytes / 1e6:.1f} MB) to "
              f"{data_url} in {time.perf_counter() - t0:.1f} s", file=sys.stderr)
    config = RunConfig(data=data_url, result=result_url, model=args.model, batch_size=args.batch_size,
                       workers=args.workers, threads=args.threads, overwrite=True)
    rc = _run_and_report(config, args.quiet)
    print(f"cai demo: dataset {data_url}\ncai demo: results {result_url} (predictions.parquet, summary.json, "
          f"combined_data.json, ranks/)")
    return rc
