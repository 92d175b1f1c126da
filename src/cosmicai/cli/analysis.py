"""``cai bench``, ``cai stats``, ``cai cost`` and ``cai plot``: experiments, tables, cost and figures."""

from __future__ import annotations

import argparse
import os
from typing import Any

from ..errors import ConfigError
from ..lambda_limits import FREE_EPHEMERAL_MB, MAX_MEMORY_MB


def _csv_list(text: str) -> list[str]:
    items = [t.strip() for t in str(text).split(",") if t.strip()]
    if not items:
        raise argparse.ArgumentTypeError(f"expected a comma-separated list, got {text!r}")
    return items


def _int_list(text: str) -> list[int]:
    try:
        return [int(t) for t in _csv_list(text)]
    except ValueError as exc:
        raise argparse.ArgumentTypeError(f"expected comma-separated integers, got {text!r}") from exc


def register(subparsers: Any) -> None:
    """Add ``bench``, ``stats``, ``cost`` and ``plot``."""
    b = subparsers.add_parser("bench", help="run the original's experiment grid (data sizes x partitions x batches)",
                              description="Run every (partition size, data size) at the sweep batch size and, at "
                              "one data size, every batch size, RUNS times each; results are laid out like the "
                              "original CAI trees under OUT, with state_machine_logs.csv and bench.json. Data "
                              "sizes beyond the dataset are resampled from it (cycled or shuffled).")
    b.add_argument("--data", required=True, help="source dataset URL")
    b.add_argument("--out", required=True, help="root folder/URL of the result tree")
    b.add_argument("--sizes", type=_csv_list, default=["1GB"], help="data sizes, e.g. 1GB,2GB,4GB")
    b.add_argument("--partitions", type=_csv_list, default=["25MB"], help="partition sizes, e.g. 25MB,50MB")
    b.add_argument("--batch-sizes", type=_int_list, default=[32, 64, 128, 256, 512], dest="batch_sizes",
                   help="batch sizes of the batch-size sweep (default 32,64,128,256,512)")
    b.add_argument("--batch-size", type=int, dest="sweep_batch",
                   help="batch size of the data-size sweep (default the largest of --batch-sizes)")
    b.add_argument("--batch-data", dest="batch_data", help="data size of the batch-size sweep (default the smallest)")
    b.add_argument("--runs", type=int, default=3, help="repetitions of every grid point (default 3)")
    b.add_argument("--backend", choices=("local", "dask", "aws"), default="local",
                   help="where the runs go: local processes (default), a Dask cluster, or the deployed AWS stack")
    b.add_argument("--scheduler", help="Dask scheduler address (with --backend dask)")
    b.add_argument("--stack", help="deployed CloudFormation stack (with --backend aws)")
    b.add_argument("--state-machine-arn", dest="state_machine_arn", help="state machine (with --backend aws)")
    b.add_argument("--endpoint", help="AWS endpoint URL (with --backend aws; tests use a local server)")
    b.add_argument("--region", help="AWS region (with --backend aws; default from the AWS configuration)")
    b.add_argument("--model", default="astromae-demo", help="model name (default astromae-demo)")
    b.add_argument("--weights", help="weights URL (safetensors) for the model (default: the model's own)")
    b.add_argument("--mode", choices=("exact", "fast"), default="exact", dest="run_mode",
                   help="inference mode: exact (default) or fast (checked against exact first)")
    b.add_argument("--device", default="cpu", help="cpu (default), cuda or cuda:N")
    b.add_argument("--workers", type=int, help="local worker processes per run (default: the cores)")
    b.add_argument("--threads", type=int, help="inference threads per worker (default: cores // workers)")
    b.add_argument("--resample", choices=("cycle", "shuffle"), default="cycle",
                   help="how sizes beyond the data are drawn: cycle in order, or seeded shuffles (default cycle)")
    b.add_argument("--seed", type=int, default=0, help="seed of --resample shuffle (default 0)")
    b.set_defaults(func=cmd_bench)

    s = subparsers.add_parser("stats", help="CAI-compatible tables (result_stats.csv, batch_varying_results.csv) "
                              "and cai_runs.csv", description="Aggregate result trees (ours or the original's) "
                              "exactly as the original did: IQR-filtered mean per-rank time, summed memory and "
                              "throughput, total bits; plus adjusted tables from stage durations and cai_runs.csv "
                              "(honest throughput, phases, cost) for our runs.")
    s.add_argument("root", help="results root (holding result-partition-*/...) or one of our runs")
    s.add_argument("--out", help="output folder (default ROOT)")
    s.add_argument("--logs", help="state_machine_logs.csv with stage durations (default: found under ROOT)")
    s.add_argument("--batch-group", dest="batch_group",
                   help="partition/data of the batch sweep in batch_varying_results.csv, e.g. 25MB/1GB")
    s.add_argument("--memory", default=str(MAX_MEMORY_MB),
                   help="Lambda memory for cai_runs.csv cost, MB or e.g. 10GB")
    s.set_defaults(func=cmd_stats)

    c = subparsers.add_parser("cost", help="AWS Lambda cost of a finished run or a what-if",
                              description="Lambda cost = requests x billed seconds x memory (GB) x price per GB-s "
                              f"+ requests x $0.20/M + ephemeral storage above {FREE_EPHEMERAL_MB} MB. From a run's "
                              "combined_data.json (billed = wall time rounded up to 1 ms), from a text file of "
                              "Lambda REPORT lines, or a what-if from data size, partition size and seconds.")
    c.add_argument("source", nargs="?", help="run folder/URL, combined_data.json, or a log file with REPORT lines")
    c.add_argument("--data-size", dest="data_size", help="what-if: data size, e.g. 12.6GB")
    c.add_argument("--partition-size", dest="partition_size", help="what-if: partition size, e.g. 25MB")
    c.add_argument("--seconds-per-partition", type=float, dest="seconds", help="what-if: seconds per request")
    c.add_argument("--samples-per-sec", type=float, dest="samples_per_sec",
                   help="what-if: per-request speed instead of --seconds-per-partition")
    c.add_argument("--memory", default=str(MAX_MEMORY_MB),
                   help="configured Lambda memory: MB (2800) or with a unit (2.8GB)")
    c.add_argument("--arch", choices=("x86_64", "arm64"), default="x86_64",
                   help="Lambda architecture, which sets the price per GB-second (default x86_64)")
    c.add_argument("--ephemeral", type=float, default=FREE_EPHEMERAL_MB,
                   help=f"ephemeral storage MB (default {FREE_EPHEMERAL_MB}, free)")
    c.add_argument("--price-gbs", type=float, dest="price_gbs", help="override the price per GB-second")
    c.add_argument("--price-requests", type=float, dest="price_requests", help="override the price per 1M requests")
    c.add_argument("--json", action="store_true", help="print the result as JSON")
    c.set_defaults(func=cmd_cost)

    p = subparsers.add_parser("plot", help="figures (PNG + PDF) from a results tree or one run",
                              description="Tree: time and throughput vs data size per partition size, time and "
                              "throughput vs batch size. Run: predicted vs true redshift density with metrics, "
                              "per-worker phase timeline.")
    p.add_argument("target", help="results root or one run's result folder/URL")
    p.add_argument("--out", required=True, help="output folder")
    p.set_defaults(func=cmd_plot)


def cmd_bench(args: argparse.Namespace) -> int:
    from ..experiments.bench import BenchSpec, bench

    spec = BenchSpec(data=args.data, out=args.out, sizes=args.sizes, partitions=args.partitions,
                     batch_sizes=args.batch_sizes, runs=args.runs, backend=args.backend, model=args.model,
                     weights=args.weights, sweep_batch=args.sweep_batch, batch_data=args.batch_data,
                     mode=args.resample, seed=args.seed, workers=args.workers, threads=args.threads,
                     run_mode=args.run_mode, device=args.device, scheduler=args.scheduler,
                     extra={"stack": args.stack, "state_machine_arn": args.state_machine_arn,
                            "endpoint": args.endpoint, "region": args.region})
    report = bench(spec)
    print(f"{len(report['runs'])} run(s) in {report['wall_s']:.1f} s under {args.out}; "
          f"next: cai stats {args.out} ; cai plot {args.out} --out {args.out}/figures")
    return 0


def _memory_mb(text: str) -> float:
    from ..sizes import parse_size

    return parse_size(text, "mb", what="--memory") / 1024**2


def cmd_stats(args: argparse.Namespace) -> int:
    from .. import storage
    from ..results import COMBINED_NAME
    from ..analysis import stats
    from ..sizes import parse_size

    out = args.out or args.root
    group = None
    if args.batch_group:
        p, _, d = args.batch_group.partition("/")
        if not d:
            raise ConfigError(f"--batch-group {args.batch_group!r}: expected PARTITION/DATA such as 25MB/1GB")
        group = (parse_size(p, "mb", what="--batch-group") / 1024**2,
                 parse_size(d, "gb", what="--batch-group") / 1024**3)
    written: list[str] = []
    tree = storage.list_files(args.root, suffixes=COMBINED_NAME, recursive=True)
    if any(stats.classify_url(u) for u in tree):
        info = stats.write_tables(args.root, out, batch_group=group, logs_url=args.logs)
        written += info["files"]
        print(f"{info['runs']} run(s) aggregated" + (f"; batch sweep {info['batch_group'][0]:g} MB / "
              f"{info['batch_group'][1]:g} GB" if info.get("batch_group") else "")
              + f"; {info['logs']} stage-duration row(s)")
    ours = stats.write_cai_runs(args.root, out, _memory_mb(args.memory))
    if ours:
        written.append(ours)
    if not written:
        raise ConfigError(f"{args.root}: no result trees (result-partition-*/<size>/<run>/combined_data.json) "
                          f"and no runs of ours (summary.json) found")
    for url in written:
        print(f"\n{stats.table_text(url, args.root)}")
    print()
    for url in written:
        print(f"wrote {url}")
    return 0


def _prices(args: argparse.Namespace) -> dict[str, float]:
    prices: dict[str, float] = {}
    if args.price_gbs is not None:
        prices["gb_second"] = args.price_gbs
    if args.price_requests is not None:
        prices["request"] = args.price_requests / 1e6
    return prices


def cmd_cost(args: argparse.Namespace) -> int:
    import json

    from .. import sizes, storage
    from ..analysis import cost
    from ..data.formats import NATIVE_SAMPLE_BYTES
    from ..results import RunFolder

    memory = _memory_mb(args.memory)
    prices = _prices(args)
    common = dict(arch=args.arch, ephemeral_mb=args.ephemeral, prices=prices)
    results: list[tuple[str, dict[str, Any]]] = []
    if args.source:
        if args.data_size or args.partition_size:
            raise ConfigError("give either a run/log SOURCE or the what-if options (--data-size ...), not both")
        src = args.source
        if not src.endswith(".json") and storage.exists(RunFolder(src).combined):
            src = RunFolder(src).combined
        if src.endswith(".json"):
            records = storage.read_json(src)
            if not isinstance(records, list):
                raise ConfigError(f"{src}: expected a list of per-rank records (combined_data.json)")
            results.append((f"at {memory:g} MB", cost.cost_from_records(records, memory, source=src, **common)))
            if memory != MAX_MEMORY_MB:
                results.append((f"at {MAX_MEMORY_MB} MB", cost.cost_from_records(
                    records, MAX_MEMORY_MB, source=src, **common)))
        else:
            results.append(("from REPORT lines", cost.cost_from_reports(storage.read_bytes(src).decode(errors="replace"),
                                                                         source=src, **common)))
    else:
        if not (args.data_size and args.partition_size):
            raise ConfigError("what-if needs --data-size and --partition-size (or give a run folder / log file)")
        seconds = args.seconds
        if seconds is None:
            if not args.samples_per_sec:
                raise ConfigError("what-if needs --seconds-per-partition or --samples-per-sec")
            rows = sizes.parse_size(args.partition_size, "mb", what="--partition-size") // NATIVE_SAMPLE_BYTES
            seconds = rows / args.samples_per_sec
        for mem in dict.fromkeys([memory, float(MAX_MEMORY_MB)]):
            results.append((f"at {mem:g} MB", cost.what_if(args.data_size, args.partition_size, mem, seconds, **common)))
    if args.json:
        print(json.dumps([{"label": label, **r} for label, r in results], indent=1))
        return 0
    print(f"{'':22s} {'requests':>9s} {'billed s':>11s} {'GB-s':>11s} {'compute $':>10s} {'requests $':>10s} "
          f"{'storage $':>10s} {'total $':>10s}")
    for label, r in results:
        print(f"{label:22s} {r['num_requests']:>9d} {r['billed_seconds']:>11.3f} {r['gb_seconds']:>11.2f} "
              f"{r['compute']:>10.4f} {r['requests']:>10.6f} {r['storage']:>10.6f} {r['total']:>10.4f}")
    return 0


def cmd_plot(args: argparse.Namespace) -> int:
    from ..analysis.plots import plot

    os.environ.setdefault("MPLBACKEND", "Agg")
    files = plot(args.target, args.out)
    for url in files:
        print(f"wrote {url}")
    return 0
