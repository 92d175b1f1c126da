"""``cai plan``: predict time and cost of a Distributed Map fan-out and recommend a configuration."""

from __future__ import annotations

import argparse
import json
import sys
from typing import Any

from ..lambda_limits import LAMBDA_ACCOUNT_CONCURRENCY


def register(subparsers: argparse._SubParsersAction) -> None:
    """Add the ``plan`` subcommand."""
    p = subparsers.add_parser(
        "plan", help="recommend partition size, Lambda memory and concurrency by simulation",
        description="Simulate a Step Functions Distributed Map over Lambda for every option and recommend "
                    "one; prints predicted time and cost beside the original CAI's published figures. "
                    "Sizes use binary units (1 GB = 1024 MB), as the original did.")
    p.add_argument("--data-size", help="dataset size, e.g. 12.6GB or 1TB")
    p.add_argument("--samples", type=int, help="dataset size as a number of galaxies (20,524 bytes each)")
    p.add_argument("--goal", choices=("time", "cost"), default="time",
                   help="recommend the fastest option (time, default) or the cheapest (cost)")
    p.add_argument("--max-time", type=float, help="with --goal cost: only options finishing within this many s")
    speed = p.add_argument_group(
        "cold start and speed",
        "By default the plan simulates our worker: cold start = --platform-cold-start + the process cold start "
        "(--cold-start, else the worker profile's cold_start_s); speed = --samples-per-sec, else --per-galaxy-ms, "
        "else the profile's per_galaxy_s, moved from the vCPUs it was measured on to a 10,240 MB Lambda's 6. "
        "--original uses the constants fitted on the original CAI's runs instead (the behaviour before worker "
        "profiles). Everything else is the fitted model either way.")
    speed.add_argument("--worker-profile", metavar="FILE",
                       help="our worker's measured numbers, JSON (schema cosmicai.worker-profile/1, written by "
                            "benchmarks/cold_start.py --profile-out; default: the profile shipped with cosmicai)")
    speed.add_argument("--cold-start", type=float, metavar="S",
                       help="our process's cold start in seconds (process start -> first prediction), "
                            "instead of the profile's cold_start_s")
    speed.add_argument("--per-galaxy-ms", type=float, metavar="MS",
                       help="our worker's steady-state milliseconds per galaxy, instead of the profile's "
                            "per_galaxy_s; on the profile's threads unless --measured-vcpus is given")
    speed.add_argument("--platform-cold-start", type=float, metavar="S",
                       help="seconds a new Lambda environment takes before our code runs (sandbox, image, "
                            "runtime), added to our process cold start (default 0.5, an assumption)")
    speed.add_argument("--original", action="store_true",
                       help="use only the constants fitted on the original's published runs (cold start 2.0 s, "
                            "2.1 ms/sample at 10,240 MB); --samples-per-sec/--speedup still apply")
    speed.add_argument("--compare-original", action="store_true",
                       help="instead of a plan: predicted time and cost with the original's constants and with "
                            "our worker's, side by side, for 5, 10 and 25 MB partitions (or --partition-sizes) "
                            "at 10,240 MB without a MaxConcurrency (or --memory-options/--concurrency)")
    speed.add_argument("--samples-per-sec", type=float,
                       help="measured inference speed of one worker, galaxies/s; overrides the profile's and "
                            "--per-galaxy-ms's speed (with --original: replaces the fitted speed)")
    speed.add_argument("--measured-vcpus", type=float, default=None,
                       help="cores the --samples-per-sec or --per-galaxy-ms figure was measured on (default: 6 "
                            "= a 10,240 MB Lambda for --samples-per-sec, the profile's threads for "
                            "--per-galaxy-ms)")
    speed.add_argument("--speedup", type=float, default=1.0,
                       help="divide the per-sample time by this (e.g. our code's measured speedup)")
    p.add_argument("--memory-options", nargs="+", type=int, metavar="MB", help="Lambda memory sizes to try")
    p.add_argument("--concurrency", nargs="+", type=int, metavar="N", help="Map MaxConcurrency values to try")
    p.add_argument("--partition-sizes", nargs="+", metavar="SIZE", help="partition sizes to try, e.g. 25MB 100MB")
    p.add_argument("--account-concurrency", type=int, default=None,
                   help=f"the account's Lambda concurrency limit (default {LAMBDA_ACCOUNT_CONCURRENCY})")
    p.add_argument("--arch", choices=("x86_64", "arm64"), default="x86_64",
                   help="Lambda architecture priced (default x86_64)")
    p.add_argument("--seeds", type=int, default=1, help="simulations averaged per option")
    p.add_argument("--top", type=int, default=10, help="options listed")
    p.add_argument("--json", metavar="PATH", help="also write the full plan as JSON")
    p.add_argument("--calibrate", action="store_true",
                   help="print the simulator's predicted vs published table instead of a plan")
    p.add_argument("--fit", action="store_true", help="with --calibrate: refit the parameters first (minutes)")
    p.add_argument("--reference", help="the published CAI results folder (default $CAI_REFERENCE_DIR)")
    p.set_defaults(func=cmd_plan)


def _bases(args: argparse.Namespace, params: Any) -> tuple[tuple[Any, Any], tuple[Any, Any] | None]:
    """The plan's ((params, basis), original) from the flags: ``(params, basis)`` is our worker's numbers,
    or the original's constants with ``--original``; ``original`` is the original's constants for
    ``--compare-original``, else None."""
    from ..simulator import planner
    from ..errors import ConfigError

    worker_flags = [name for name, value in (("--worker-profile", args.worker_profile),
                                             ("--cold-start", args.cold_start),
                                             ("--per-galaxy-ms", args.per_galaxy_ms),
                                             ("--platform-cold-start", args.platform_cold_start))
                    if value is not None]
    if args.original:
        if args.compare_original:
            raise ConfigError("--original and --compare-original: --compare-original already shows both")
        if worker_flags:
            raise ConfigError(f"--original: uses only the original's fitted constants; "
                              f"drop {', '.join(worker_flags)}")
        return planner.original_basis(params, args.samples_per_sec, args.measured_vcpus, args.speedup), None
    # the profile is read when it is named, or when one of its numbers is still needed
    speed_given = args.samples_per_sec is not None or (args.per_galaxy_ms is not None
                                                       and args.measured_vcpus is not None)
    needs_profile = args.worker_profile is not None or args.cold_start is None or not speed_given
    profile = planner.load_worker_profile(args.worker_profile) if needs_profile else None
    worker = planner.worker_basis(
        params, profile, cold_start_s=args.cold_start,
        per_galaxy_s=None if args.per_galaxy_ms is None else args.per_galaxy_ms / 1e3,
        measured_vcpus=args.measured_vcpus, samples_per_sec=args.samples_per_sec, speedup=args.speedup,
        platform_cold_s=args.platform_cold_start)
    original = planner.original_basis(params) if args.compare_original else None
    return worker, original


def cmd_plan(args: argparse.Namespace) -> int:
    """Run ``cai plan``."""
    from ..errors import ConfigError
    from ..simulator import calibrate, planner
    from ..simulator.simulate import DEFAULT_PARAMS
    from ..data.formats import LEGACY_SAMPLE_BYTES
    from ..sizes import parse_size

    if args.calibrate:
        return calibrate.run_calibration(args.reference, do_fit=args.fit)
    if (args.data_size is None) == (args.samples is None):
        raise ConfigError("plan: give exactly one of --data-size or --samples")
    if args.samples is not None:
        if args.samples <= 0:
            raise ConfigError(f"--samples: must be positive, got {args.samples}")
        data_bytes = args.samples * LEGACY_SAMPLE_BYTES
    else:
        data_bytes = parse_size(args.data_size, "gb", what="--data-size")
    if args.seeds < 1:
        raise ConfigError(f"--seeds: must be at least 1, got {args.seeds}")
    params = DEFAULT_PARAMS
    if args.account_concurrency is not None:
        if args.account_concurrency < 1:
            raise ConfigError(f"--account-concurrency: must be positive, got {args.account_concurrency}")
        params = params.with_(account_concurrency=args.account_concurrency)
    (params, basis), original = _bases(args, params)
    kwargs = {}
    if args.memory_options:
        kwargs["memory_mb"] = args.memory_options
    if args.concurrency:
        kwargs["concurrency"] = args.concurrency
    if args.partition_sizes:
        kwargs["partitions_mb"] = [parse_size(s, "mb", what="--partition-sizes") / 1024**2
                                   for s in args.partition_sizes]
    seeds = tuple(range(args.seeds))
    if original is not None:
        comparison = planner.compare(data_bytes, original, (params, basis), seeds=seeds, arch=args.arch, **kwargs)
        print(planner.format_comparison(comparison))
        out = comparison.to_dict()
    else:
        result = planner.plan(data_bytes, goal=args.goal, params=params, max_time_s=args.max_time,
                              seeds=seeds, arch=args.arch, basis=basis, **kwargs)
        print(planner.format_plan(result, top=args.top))
        published = calibrate.published_figures(data_bytes, args.reference, arch=args.arch)
        if published:
            print(calibrate.format_published(published))
        elif calibrate.reference_dir(args.reference) is None:
            print("published: only the paper's 12.6 GB run is built in; for the other published runs (1-12.6 GB, "
                  "100 GB, 983 GB, 1000 GB) set $CAI_REFERENCE_DIR or --reference to the published CAI results "
                  "folder")
        else:
            print("published: no published run of this size (published sizes: 1-12.6 GB, 100 GB, 983 GB, 1000 GB)")
        out = result.to_dict()
        out["published"] = published
    if args.json:
        with open(args.json, "w") as fh:
            json.dump(out, fh, indent=1)
        print(f"plan written to {args.json}", file=sys.stderr)
    return 0
