"""``cai cluster slurm`` end to end against a real single-node Slurm started by the test (tests/slurm_cluster.py).

The run: 2 batch jobs of 1 core / 2 GB, each a Dask worker (dask-jobqueue's SLURMCluster, scheduler in the ``cai``
process), over 200 random galaxies in 4 partitions with ``astromae-random``. It checks that

* the run completes: exit 0, ``summary.json`` complete, rows in == rows out == 200, 4 ranks done;
* the work really went through Slurm: while the run goes, ``squeue`` shows its 2 jobs RUNNING on this node; the
  worker processes that wrote the rank records (``ranks/*.json`` ``cpu.pid``) carried ``SLURM_JOB_ID`` of one of
  those jobs and are not the ``cai`` process; each job's stderr (``--log-directory``) shows its worker
  registering with the run's scheduler; slurm's job-completion log lists both jobs, ended (cancelled by
  dask-jobqueue at the end of the run);
* nothing is left: no job of the run in ``squeue`` and no process of the jobs alive afterwards.

It skips, naming what is missing, when slurm-wlm/munge are not installed or not root (.ci/run installs them).
Also here, without Slurm: ``--gpus-per-job`` in the ``--dry-run`` job script.
"""

from __future__ import annotations

import json
import subprocess
import sys
import threading
import time
import uuid

import pytest

from cosmicai import cli
from conftest import make_random_dataset
from slurm_cluster import SlurmCluster, missing_reason

PARTITIONS, ROWS = 4, 50
RUN_TIMEOUT_S = 150       # the run itself takes ~9-19 s on 2 cores; generous for a loaded CI machine
GONE_WITHIN_S = 20.0      # KillWait=5 in the test cluster, plus the nanny's own shutdown


@pytest.fixture
def slurm(monkeypatch):
    """A running single-node Slurm; SLURM_CONF points at it for the test. Stopped (nothing left) at the end."""
    reason = missing_reason()
    if reason:
        pytest.skip(reason)
    with SlurmCluster() as cluster:
        monkeypatch.setenv("SLURM_CONF", cluster.conf)
        yield cluster


@pytest.fixture
def dataset(tmp_path) -> str:
    root = tmp_path / "data"
    root.mkdir()
    return make_random_dataset(root, PARTITIONS, ROWS, seed=700, description="tests: slurm e2e")


class Watcher(threading.Thread):
    """Polls ``squeue`` and the jobs' processes while the run goes (the evidence is gone once it ends)."""

    def __init__(self, cluster: SlurmCluster, job_name: str):
        super().__init__(daemon=True)
        self.cluster, self.job_name = cluster, job_name
        self.jobs: dict[str, set[tuple[str, str]]] = {}   # job id -> {(state, nodes)}
        self.pid_job: dict[int, str] = {}                  # process -> its SLURM_JOB_ID
        self.errors: list[str] = []
        self.done = threading.Event()

    def run(self) -> None:
        while not self.done.is_set():
            try:
                for job in self.cluster.queue(self.job_name):
                    self.jobs.setdefault(job["id"], set()).add((job["state"], job["nodes"]))
                for proc in self.cluster.processes():
                    try:
                        job_id = proc.environ().get("SLURM_JOB_ID")
                    except Exception:  # noqa: BLE001 - it ended meanwhile
                        continue
                    if job_id:
                        self.pid_job.setdefault(proc.pid, job_id)
            except Exception as exc:  # noqa: BLE001 - reported by the test
                self.errors.append(repr(exc))
            self.done.wait(0.25)


# not `slow`: ~10 s on 2 idle cores (up to ~20 s when the machine is busy); most of it is the two worker jobs
# importing torch and loading the model at the same time
def test_cluster_slurm_end_to_end(slurm, dataset, tmp_path):
    job_name = f"cai-e2e-{uuid.uuid4().hex[:6]}"
    result, logs, scratch = tmp_path / "out", tmp_path / "logs", tmp_path / "scratch"
    argv = [sys.executable, "-m", "cosmicai.cli", "cluster", "slurm", "--jobs", "2", "--cores", "1",
            "--memory", "2GB", "--walltime", "00:10:00", "--queue", "cai", "--job-name", job_name,
            "--log-directory", str(logs), "--local-directory", str(scratch), "--dashboard-address", ":0",
            "--", "--data", dataset, "--result", str(result), "--model", "astromae-random",
            "--batch-size", str(ROWS), "--quiet"]
    watcher = Watcher(slurm, job_name)
    watcher.start()
    t0 = time.monotonic()
    proc = subprocess.Popen(argv, env=slurm.env(), stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                            cwd=tmp_path)
    try:
        _, stderr = proc.communicate(timeout=RUN_TIMEOUT_S)
    except subprocess.TimeoutExpired:
        proc.kill()
        _, stderr = proc.communicate(timeout=30)
        stderr += f"\n(killed: still running after {RUN_TIMEOUT_S} s)"
    finally:
        watcher.done.set()
        watcher.join(timeout=10)
    wall = time.monotonic() - t0
    report = f"rc {proc.returncode} after {wall:.1f} s\n--- stderr ---\n{stderr[-4000:]}\n{slurm.logs()}"
    print(f"cai cluster slurm: {wall:.1f} s")
    assert proc.returncode == 0, report
    assert not watcher.errors, watcher.errors

    # the run completed: every row in came out
    summary = json.loads((result / "summary.json").read_text())
    done = summary["completeness"]
    assert done["complete"], done
    assert done["rows_in"] == done["rows_out"] == PARTITIONS * ROWS, done
    assert done["ranks_done"] == PARTITIONS and not done["failed_ranks"], done

    # both jobs ran on this node while the run went
    assert len(watcher.jobs) == 2, (watcher.jobs, report)
    job_ids = set(watcher.jobs)
    for job_id, seen in watcher.jobs.items():
        assert ("RUNNING", slurm.host) in seen, (job_id, seen)

    # the ranks ran in processes of those jobs, not in the cai process
    records = [json.loads(p.read_text()) for p in sorted((result / "ranks").glob("*.json"))]
    assert len(records) == PARTITIONS
    for record in records:
        pid = record["cpu"]["pid"]
        assert pid != proc.pid
        assert watcher.pid_job.get(pid) in job_ids, (record["rank"], pid, watcher.pid_job)

    # each job's worker registered with the run's scheduler (dask-jobqueue's -e log file)
    for job_id in job_ids:
        err = logs / f"{job_name}-{job_id}.err"
        assert err.exists(), sorted(p.name for p in logs.iterdir())
        assert "Registered to:" in err.read_text(errors="replace"), err.read_text(errors="replace")[-2000:]

    # nothing left: no job of the run in squeue, no process of its jobs alive
    assert slurm.wait_queue_empty(job_name, timeout=GONE_WITHIN_S) == []
    deadline = time.monotonic() + GONE_WITHIN_S
    while (left := slurm.processes()) and time.monotonic() < deadline:
        time.sleep(0.3)
    assert not left, [(p.pid, p.name(), " ".join(p.cmdline())[:200]) for p in left]
    # and slurm recorded both jobs as ended (cancelled by dask-jobqueue when the run closed its cluster)
    deadline = time.monotonic() + GONE_WITHIN_S
    while len(ended := [j for j in slurm.finished_jobs() if j.get("Name") == job_name]) < 2 \
            and time.monotonic() < deadline:
        time.sleep(0.3)
    assert {j["JobId"] for j in ended} == job_ids, ended
    assert all(j["NodeList"] == slurm.host and j["JobState"] in ("CANCELLED", "COMPLETED") for j in ended), ended


def test_missing_reason_names_the_binaries(monkeypatch):
    import slurm_cluster

    monkeypatch.setattr(slurm_cluster, "which", lambda name: None if name == "slurmd" else f"/usr/sbin/{name}")
    reason = slurm_cluster.missing_reason()
    assert reason is not None and "slurmd not found" in reason and "slurm-wlm munge" in reason


@pytest.mark.parametrize("flag", ["--gpus-per-job", "--gpus"])
def test_dry_run_gpus_per_job_slurm(flag, capsys):
    rc = cli.main(["cluster", "slurm", "--jobs", "2", "--cores", "8", "--memory", "32GB", flag, "1", "--dry-run",
                   "--", "--data", "d", "--result", "r"])
    out = capsys.readouterr().out
    assert rc == 0
    assert "#SBATCH --gres=gpu:1" in out.splitlines()
    worker = next(line for line in out.splitlines() if "distributed.cli.dask_worker" in line)
    assert "--resources GPU=1" in worker and "--nworkers" not in worker  # one GPU: one worker process
    assert "--backend dask --scheduler <scheduler> --threads 8 --device cuda" in out


def test_dry_run_gpus_per_job_pbs_and_config(tmp_path, capsys):
    assert cli.main(["cluster", "pbs", "--cores", "4", "--gpus-per-job", "2", "--dry-run", "--", "r.yaml"]) == 0
    out = capsys.readouterr().out
    assert any(line.startswith("#PBS -l select=1:ncpus=4:") and line.endswith(":ngpus=2")
               for line in out.splitlines()), out
    assert "--nworkers 2" in out and "--resources GPU=1" in out and "--device cuda" in out
    cfg = tmp_path / "cluster.yaml"
    cfg.write_text("kind: slurm\ncores: 8\ngpus_per_job: 4\n")
    assert cli.main(["cluster", "slurm", "--config", str(cfg), "--dry-run", "--", "r.yaml"]) == 0
    assert "#SBATCH --gres=gpu:4" in capsys.readouterr().out
    assert cli.main(["cluster", "slurm", "--config", str(cfg), "--gpus-per-job", "2", "--dry-run", "--",
                     "r.yaml"]) == 0  # the flag overrides the file
    assert "#SBATCH --gres=gpu:2" in capsys.readouterr().out
    cfg.write_text("kind: slurm\ncores: 8\ngpus_per_job: 4\ngpus: 2\n")
    assert cli.main(["cluster", "slurm", "--config", str(cfg), "--dry-run"]) == 2
    assert "gpus (2) and gpus_per_job (4) disagree" in capsys.readouterr().err
