"""``cai cluster slurm|pbs``: start Dask workers as batch jobs (dask-jobqueue) and run the pipeline on them.

Everything after ``--`` is read as ``cai run`` reads it (a config file and/or run options); the run goes to the
``dask`` runner connected to the jobs' scheduler, which lives in this process for the length of the run.
"""

from __future__ import annotations

import argparse
import sys
from typing import Any, Sequence

OPTIONS = ("jobs", "cores", "memory", "walltime", "gpus", "processes", "queue", "account", "python",
           "interface", "local_directory", "log_directory", "job_name", "job_extra", "prologue",
           "dashboard_address", "submit_timeout")
#: Seconds, beyond ``submit_timeout``, allowed for every submission of the run to be answered.
SUBMIT_MARGIN_S = 15.0


def register(subparsers: Any) -> None:
    """Add ``cai cluster slurm`` and ``cai cluster pbs``."""
    group = subparsers.add_parser("cluster", help="run on Slurm or PBS through dask-jobqueue",
                                  description="Start Dask workers as Slurm/PBS jobs and run the pipeline on them.")
    kinds = group.add_subparsers(dest="cluster_kind", metavar="KIND")
    for kind in ("slurm", "pbs"):
        p = kinds.add_parser(kind, help=f"Dask workers as {kind.upper()} jobs",
                             description=f"Submit --jobs {kind.upper()} jobs of Dask workers, run `cai run "
                                         f"RUN_ARGS` on them, then cancel the jobs. "
                                         f"Example: cai cluster {kind} --jobs 4 --cores 8 --memory 32GB "
                                         f"--walltime 02:00:00 -- --data s3://b/data --result s3://b/out")
        p.add_argument("--config", metavar="FILE",
                       help="YAML/JSON file with the options below (and optionally `run`: a list of run args "
                            "or a run config path); flags given here override it")
        p.add_argument("--jobs", type=int, help="batch jobs to submit (default 1)")
        p.add_argument("--cores", type=int, help="cores per job (default 1)")
        p.add_argument("--memory", help="memory per job, e.g. 32GB (default 4GB)")
        p.add_argument("--walltime", help="job time limit HH:MM:SS (default 01:00:00)")
        p.add_argument("--gpus-per-job", "--gpus", dest="gpus", type=int, metavar="N",
                       help=f"GPUs per job ({'#SBATCH --gres=gpu:N' if kind == 'slurm' else 'select ...:ngpus=N'}); "
                            "one worker process per GPU, each pinned to its own GPU and started with the "
                            "resource GPU=1; the run uses --device cuda")
        p.add_argument("--processes", type=int,
                       help="worker processes per job (default: one per GPU, else 1); each runs one task at a "
                            "time with cores/processes threads")
        p.add_argument("--queue", help="partition (Slurm) or queue (PBS)")
        p.add_argument("--account", help="account/project to charge")
        p.add_argument("--python", help="python executable on the compute nodes (default: this one)")
        p.add_argument("--interface", help="network interface the scheduler and workers use, e.g. ib0")
        p.add_argument("--local-directory", dest="local_directory", help="worker scratch folder on the nodes")
        p.add_argument("--log-directory", dest="log_directory", help="folder for the jobs' stdout/stderr")
        p.add_argument("--job-name", dest="job_name", help="batch job name (default cai-worker)")
        p.add_argument("--job-extra", dest="job_extra", action="append",
                       help=f"extra #{'SBATCH' if kind == 'slurm' else 'PBS'} directive, repeatable "
                            f"(e.g. {'--constraint=a100' if kind == 'slurm' else '-l place=scatter'})")
        p.add_argument("--prologue", action="append",
                       help="shell line run before the worker starts, repeatable (e.g. 'module load cuda')")
        p.add_argument("--dashboard-address", dest="dashboard_address", help="scheduler dashboard (default :8787)")
        p.add_argument("--submit-timeout", dest="submit_timeout", type=float, metavar="S",
                       help=f"seconds each {'sbatch' if kind == 'slurm' else 'qsub'} call may take before the "
                            "submission counts as failed (default 60)")
        p.add_argument("--dry-run", action="store_true", help="print the job script and exit; submit nothing")
        p.add_argument("run_args", nargs="*", metavar="RUN_ARGS",
                       help="after `--`: arguments for `cai run` (a config file and/or options)")
        p.set_defaults(func=cmd_cluster, cluster_kind=kind)
    group.set_defaults(func=lambda args: (group.print_help(), 2)[1])


def build_spec(args: argparse.Namespace) -> tuple[Any, list[str]]:
    """The JobSpec and run arguments from the command line and the optional config file."""
    from ..runners.batch_jobs import load_cluster_file, spec_from_mapping
    from ..errors import ConfigError

    data: dict[str, Any] = {}
    source = "cluster options"
    if args.config:
        data = load_cluster_file(args.config)
        source = args.config
        kind = data.get("kind", data.get("cluster"))
        if kind is not None and kind != args.cluster_kind:
            raise ConfigError(f"{args.config}: kind {kind!r} does not match `cai cluster {args.cluster_kind}`")
    data = {k.replace("-", "_"): v for k, v in data.items() if k not in ("kind", "cluster")}
    for name in OPTIONS:
        value = getattr(args, name, None)
        if value is not None:
            data[name] = value
            if name == "gpus":  # --gpus-per-job on the command line overrides the file's gpus_per_job too
                data.pop("gpus_per_job", None)
    run = data.pop("run", None)
    run_args = list(args.run_args)
    if not run_args and run is not None:
        if isinstance(run, str):
            run_args = [run]
        elif isinstance(run, list) and all(isinstance(a, (str, int, float)) for a in run):
            run_args = [str(a) for a in run]
        else:
            raise ConfigError(f"{source}: 'run' must be a run config path or a list of `cai run` arguments")
    return spec_from_mapping({"kind": args.cluster_kind, **data}, source), run_args


def run_args_for(run_args: Sequence[str], scheduler: str, threads: int, gpus: int) -> list[str]:
    """The ``cai run`` argument list that runs ``run_args`` on the Dask scheduler at ``scheduler``."""
    given = set(run_args)
    args = ["run", *run_args, "--backend", "dask", "--scheduler", scheduler]
    if "--threads" not in given:
        args += ["--threads", str(threads)]
    if gpus and "--device" not in given:
        args += ["--device", "cuda"]
    return args


def run_on_cluster(cluster: Any, run_args: Sequence[str], threads: int, gpus: int = 0, pin_gpus: int = 0) -> int:
    """Run ``RUN_ARGS`` (as ``cai run`` reads them) on the ``dask`` runner connected to ``cluster``; returns the
    exit status (1 for an incomplete run).

    ``pin_gpus`` > 1: each job runs that many worker processes, and each is pinned to its own GPU.
    """
    from distributed import Client

    from ..backends.dask import WorkerSetup
    from ..runners import get_runner
    from .run import config_from_args, parse_run_args, run_and_report

    args = parse_run_args(run_args_for(run_args, cluster.scheduler_address, threads, gpus)[1:])
    if args.endpoint:
        import os

        os.environ["CAI_S3_ENDPOINT"] = args.endpoint
    config = config_from_args(args)
    with Client(cluster) as client:
        if pin_gpus > 1:  # registered on the scheduler: applies to workers that join later too
            client.register_plugin(WorkerSetup(threads, pin_gpus))
        return run_and_report(get_runner("dask"), config, args.quiet)


def cmd_cluster(args: argparse.Namespace) -> int:
    """``cai cluster slurm|pbs``: print the job script (--dry-run) or submit the jobs and run."""
    from ..runners.batch_jobs import check_submit_command, job_script, make_cluster
    from ..errors import ConfigError

    spec, run_args = build_spec(args)
    if args.dry_run:
        print(f"# cai cluster {spec.kind}: {spec.jobs} job(s) of this script, {spec.worker_processes} Dask worker "
              f"process(es) each, {spec.threads_per_process} thread(s) per process; run: cai "
              + " ".join(run_args_for(run_args, "<scheduler>", spec.threads_per_process, spec.gpus)))
        print(job_script(spec))
        return 0
    if not run_args:
        raise ConfigError("cai cluster: nothing to run; give `cai run` arguments after `--` "
                          "(or `run:` in the --config file), or use --dry-run to see the job script")
    check_submit_command(spec)
    cluster = make_cluster(spec)
    try:
        cluster.scale(jobs=spec.jobs)
        ids = cluster.cai_submissions.wait(spec.submit_timeout + SUBMIT_MARGIN_S)
        print(f"cai: submitted {len(ids)} {spec.kind} job(s) ({', '.join(ids)}); scheduler "
              f"{cluster.scheduler_address}, dashboard {cluster.dashboard_link}", file=sys.stderr)
        pin = spec.gpus if spec.gpus > 1 and spec.worker_processes == spec.gpus else 0
        return run_on_cluster(cluster, run_args, spec.threads_per_process, spec.gpus, pin)
    finally:
        cluster.close()
