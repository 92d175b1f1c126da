"""``cai plan``: predict time and cost of a Distributed Map fan-out and recommend a configuration."""

from __future__ import annotations

import argparse
import json
import sys


def register(subparsers: argparse._SubParsersAction) -> None:
    """Add the ``plan`` subcommand."""
    p = subparsers.add_parser(
        "plan", help="recommend partition size, Lambda memory and concurrency by simulation",
        description="Simulate a Step Functions Distributed Map over Lambda for every option and recommend "
                    "one; prints predicted time and cost beside the original CAI's published figures. "
                    "Sizes use binary units (1 GB = 1024 MB), as the original did.")
    p.add_argument("--data-size", help="dataset size, e.g. 12.6GB or 1TB")
    p.add_argument("--samples", type=int, help="dataset size as a number of galaxies (20,524 bytes each)")
    p.add_argument("--goal", choices=("time", "cost"), default="time")
    p.add_argument("--max-time", type=float, help="with --goal cost: only options finishing within this many s")
    p.add_argument("--samples-per-sec", type=float,
                   help="measured inference speed of one worker (default: the speed calibrated on the "
                        "published runs, i.e. the original code on a 10,240 MB Lambda)")
    p.add_argument("--measured-vcpus", type=float, default=6.0,
                   help="cores the --samples-per-sec figure was measured on (default 6 = a 10,240 MB Lambda)")
    p.add_argument("--speedup", type=float, default=1.0,
                   help="divide the per-sample time by this (e.g. our code's measured speedup)")
    p.add_argument("--memory-options", nargs="+", type=int, metavar="MB", help="Lambda memory sizes to try")
    p.add_argument("--concurrency", nargs="+", type=int, metavar="N", help="Map MaxConcurrency values to try")
    p.add_argument("--partition-sizes", nargs="+", metavar="SIZE", help="partition sizes to try, e.g. 25MB 100MB")
    p.add_argument("--account-concurrency", type=int, default=None,
                   help="the account's Lambda concurrency limit (default 1000)")
    p.add_argument("--arch", choices=("x86_64", "arm64"), default="x86_64")
    p.add_argument("--seeds", type=int, default=1, help="simulations averaged per option")
    p.add_argument("--top", type=int, default=10, help="options listed")
    p.add_argument("--json", metavar="PATH", help="also write the full plan as JSON")
    p.add_argument("--calibrate", action="store_true",
                   help="print the simulator's predicted vs published table instead of a plan")
    p.add_argument("--fit", action="store_true", help="with --calibrate: refit the parameters first (minutes)")
    p.add_argument("--reference", help="published CAI results folder (default $CAI_REFERENCE_DIR or "
                                       "../shared/reference/cai)")
    p.set_defaults(func=cmd_plan)


def cmd_plan(args: argparse.Namespace) -> int:
    """Run ``cai plan``."""
    from ..errors import ConfigError
    from ..analysis import calibrate, planner
    from ..analysis.cost import parse_size
    from ..analysis.simulate import DEFAULT_PARAMS
    from ..data.formats import LEGACY_SAMPLE_BYTES

    if args.calibrate:
        return calibrate.run_calibration(args.reference, do_fit=args.fit)
    if (args.data_size is None) == (args.samples is None):
        raise ConfigError("plan: give exactly one of --data-size or --samples")
    if args.samples is not None:
        if args.samples <= 0:
            raise ConfigError(f"--samples: must be positive, got {args.samples}")
        data_bytes = args.samples * LEGACY_SAMPLE_BYTES
    else:
        data_bytes = parse_size(args.data_size, "gb")
    if args.seeds < 1:
        raise ConfigError(f"--seeds: must be at least 1, got {args.seeds}")
    params = DEFAULT_PARAMS
    if args.account_concurrency is not None:
        if args.account_concurrency < 1:
            raise ConfigError(f"--account-concurrency: must be positive, got {args.account_concurrency}")
        params = params.with_(account_concurrency=args.account_concurrency)
    params = planner.speed_params(params, args.samples_per_sec, args.measured_vcpus, args.speedup)
    kwargs = {}
    if args.memory_options:
        kwargs["memory_mb"] = args.memory_options
    if args.concurrency:
        kwargs["concurrency"] = args.concurrency
    if args.partition_sizes:
        kwargs["partitions_mb"] = [parse_size(s, "mb") / 1024**2 for s in args.partition_sizes]
    result = planner.plan(data_bytes, goal=args.goal, params=params, max_time_s=args.max_time,
                          seeds=tuple(range(args.seeds)), arch=args.arch, **kwargs)
    print(planner.format_plan(result, top=args.top))
    published = calibrate.published_figures(data_bytes, args.reference, arch=args.arch)
    if published:
        print(calibrate.format_published(published))
    else:
        print("published: no published run of this size (published sizes: 1-12.6 GB, 100 GB, 983 GB, 1000 GB)")
    if args.json:
        out = result.to_dict()
        out["published"] = published
        with open(args.json, "w") as fh:
            json.dump(out, fh, indent=1)
        print(f"plan written to {args.json}", file=sys.stderr)
    return 0
