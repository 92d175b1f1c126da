"""Slurm/PBS job scripts from dask-jobqueue (no batch system is installed: the script text is checked)."""

from __future__ import annotations

import json

import pytest

from cosmicai import cli
from cosmicai.backends.dask import pick_gpu, worker_index
from cosmicai.runners.batch_jobs import JobSpec, job_script, spec_from_mapping
from cosmicai.cli.cluster import run_args_for
from cosmicai.errors import ConfigError


def _lines(script: str, prefix: str) -> list[str]:
    return [line for line in script.splitlines() if line.startswith(prefix)]


def _worker_command(script: str) -> str:
    commands = [line for line in script.splitlines() if "distributed.cli.dask_worker" in line]
    assert len(commands) == 1, script
    return commands[0]


def test_slurm_script_cpu():
    script = job_script(JobSpec(kind="slurm", cores=8, memory="32GB", walltime="02:30:00", queue="short",
                                account="astro", prologue=["module load python/3.11"]))
    directives = _lines(script, "#SBATCH")
    assert "#SBATCH --cpus-per-task=8" in directives
    assert "#SBATCH --mem=30G" in directives  # 32 GB = 29.8 GiB, rounded down by dask-jobqueue
    assert "#SBATCH -t 02:30:00" in directives
    assert "#SBATCH -p short" in directives and "#SBATCH -A astro" in directives
    assert not any("gres" in d for d in directives)
    assert "export OMP_NUM_THREADS=8" in script and "module load python/3.11" in script
    assert script.index("module load python/3.11") < script.index("dask_worker")
    cmd = _worker_command(script)
    assert "tcp://SCHEDULER-ADDRESS:8786" in cmd
    assert "--nthreads 1 " in cmd  # one task at a time per worker process
    assert "--nworkers" not in cmd and "--resources" not in cmd


def test_slurm_script_gpus_one_worker_per_gpu():
    script = job_script(JobSpec(kind="slurm", cores=16, memory="64GB", walltime="1-00:00:00", gpus=4,
                                job_extra=["--constraint=a100"]))
    directives = _lines(script, "#SBATCH")
    assert "#SBATCH --gres=gpu:4" in directives and "#SBATCH --constraint=a100" in directives
    assert "#SBATCH --cpus-per-task=16" in directives and "#SBATCH -t 1-00:00:00" in directives
    assert "export OMP_NUM_THREADS=4" in script  # 16 cores over 4 worker processes
    cmd = _worker_command(script)
    assert "--nworkers 4" in cmd and "--resources GPU=1" in cmd and "--nthreads 1 " in cmd


def test_pbs_script():
    script = job_script(JobSpec(kind="pbs", cores=4, memory="16GB", walltime="00:45:00", gpus=1, queue="gpuq"))
    directives = _lines(script, "#PBS")
    assert "#PBS -q gpuq" in directives
    assert "#PBS -l walltime=00:45:00" in directives
    assert any(d.startswith("#PBS -l select=1:ncpus=4:mem=") and d.endswith(":ngpus=1") for d in directives)
    cmd = _worker_command(script)
    assert "--resources GPU=1" in cmd and "--nthreads 1 " in cmd


@pytest.mark.parametrize("options, message", [
    ({"walltime": "two hours"}, "walltime"),
    ({"memory": "lots"}, "memory"),
    ({"cores": 0}, "cores must be a positive integer"),
    ({"cores": 2, "processes": 3}, "processes \\(3\\) cannot exceed cores \\(2\\)"),
    ({"gpus": -1}, "gpus"),
    ({"kind": "lsf"}, "kind must be one of slurm, pbs"),
])
def test_bad_spec_is_refused(options, message):
    with pytest.raises(ConfigError, match=message):
        JobSpec(**options)


def test_unknown_config_key_is_named():
    with pytest.raises(ConfigError, match="clusterfile.yaml: unknown cluster option\\(s\\) walltme"):
        spec_from_mapping({"cores": 2, "walltme": "01:00:00"}, "clusterfile.yaml")


def test_cli_dry_run_from_yaml_with_overrides(tmp_path, capsys):
    cfg = tmp_path / "cluster.yaml"
    cfg.write_text("kind: slurm\njobs: 3\ncores: 6\nmemory: 12GB\nwalltime: '00:20:00'\naccount: proj1\n"
                   "run: [run.yaml, --batch-size, 64]\n")
    rc = cli.main(["cluster", "slurm", "--config", str(cfg), "--cores", "4", "--dry-run"])
    out = capsys.readouterr().out
    assert rc == 0
    assert "#SBATCH --cpus-per-task=4" in out  # the flag overrides the file
    assert "#SBATCH -A proj1" in out and "#SBATCH -t 00:20:00" in out
    assert "3 job(s)" in out
    assert "cai run run.yaml --batch-size 64 --backend dask --scheduler <scheduler> --threads 4" in out


def test_cli_json_config_kind_mismatch(tmp_path, capsys):
    cfg = tmp_path / "cluster.json"
    cfg.write_text(json.dumps({"kind": "pbs", "cores": 2}))
    assert cli.main(["cluster", "slurm", "--config", str(cfg), "--dry-run"]) == 2
    assert "kind 'pbs' does not match `cai cluster slurm`" in capsys.readouterr().err


def test_cli_without_run_args_is_refused(capsys):
    assert cli.main(["cluster", "pbs", "--cores", "2"]) == 2
    assert "nothing to run" in capsys.readouterr().err


def test_run_args_for():
    assert run_args_for(["cfg.yaml"], "tcp://h:1", 4, 0) == [
        "run", "cfg.yaml", "--backend", "dask", "--scheduler", "tcp://h:1", "--threads", "4"]
    args = run_args_for(["--data", "d", "--threads", "2"], "tcp://h:1", 4, 2)
    assert args.count("--threads") == 1 and args[-2:] == ["--device", "cuda"]
    assert run_args_for(["--device", "cuda:1"], "tcp://h:1", 4, 2).count("--device") == 1


def test_gpu_pinning_per_worker_process():
    assert worker_index("SLURMCluster-3-1") == 1 and worker_index(0) == 0 and worker_index("abc") is None
    assert pick_gpu("SLURMCluster-0-1", 2, "4,5") == "5"
    assert pick_gpu("SLURMCluster-0-0", 2, "4,5") == "4"
    assert pick_gpu(3, 2, None) == "1"
    assert pick_gpu("solo", 2, "0,1") is None


def test_worker_setup_pins_gpu_before_tasks(monkeypatch):
    from types import SimpleNamespace

    from cosmicai.backends.dask import WorkerSetup

    monkeypatch.setenv("CUDA_VISIBLE_DEVICES", "4,5")
    WorkerSetup(threads=None, gpus_per_node=2).setup(SimpleNamespace(name="SLURMCluster-7-1"))
    assert __import__("os").environ["CUDA_VISIBLE_DEVICES"] == "5"
    assert WorkerSetup(2, 0).name != WorkerSetup(2, 4).name  # both can be registered side by side
