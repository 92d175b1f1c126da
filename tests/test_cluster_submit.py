"""``cai cluster slurm|pbs`` when the batch system refuses or ignores the submission, as a user meets it on a login
node: a real ``cai`` process, with fake ``sbatch``/``qsub`` and ``scancel``/``qdel`` scripts first on PATH.

Each case must end within seconds, exit 2 with ONE line carrying the scheduler's own message, never claim jobs
were submitted, and cancel (with the right ids, once) every job that was accepted before another was refused.
"""

from __future__ import annotations

import json
import os
import re
import subprocess
import sys
import time
from pathlib import Path

import pytest

from conftest import make_random_dataset

REJECT = "sbatch: error: Batch job submission failed: Invalid account or account/partition combination specified"
QSUB_REJECT = "qsub: Unknown queue"
FAST_S = 20.0  # a refused submission must end well within this (measured: ~1.5 s on 2 loaded cores)

FAKE_SUBMIT = """\
#!{python}
# Fake {name}: accepts the first {accept} call(s) (job ids 1001, 1002, ...), then refuses or hangs.
import fcntl, os, sys, time
log = {log!r}
with open(log + ".lock", "a") as lock:
    fcntl.flock(lock, fcntl.LOCK_EX)
    n = sum(1 for _ in open(log)) if os.path.exists(log) else 0
    with open(log, "a") as fh:
        fh.write(" ".join(sys.argv[1:]) + "\\n")
if n < {accept}:
    print({accepted!r}.format(1001 + n))
    sys.exit(0)
if {hang}:
    open({pidfile!r}, "w").write(str(os.getpid()))
    time.sleep(120)
print({message!r}, file=sys.stderr)
sys.exit(1)
"""

FAKE_CANCEL = """\
#!{python}
import sys
with open({log!r}, "a") as fh:
    fh.write(" ".join(sys.argv[1:]) + "\\n")
"""


def _script(path: Path, text: str) -> None:
    path.write_text(text)
    path.chmod(0o755)


def _fake_batch(tmp_path: Path, kind: str, accept: int = 0, hang: bool = False) -> tuple[Path, Path, Path]:
    """A bin folder with the fake submit and cancel commands; returns (bin, submit log, cancel log)."""
    bin_dir = tmp_path / "bin"
    bin_dir.mkdir()
    submit, cancel = ("sbatch", "scancel") if kind == "slurm" else ("qsub", "qdel")
    submit_log, cancel_log = tmp_path / f"{submit}.log", tmp_path / f"{cancel}.log"
    accepted = "Submitted batch job {}" if kind == "slurm" else "{}.pbs-server"
    _script(bin_dir / submit, FAKE_SUBMIT.format(
        python=sys.executable, name=submit, accept=accept, log=str(submit_log), accepted=accepted, hang=hang,
        pidfile=str(tmp_path / "hung.pid"), message=REJECT if kind == "slurm" else QSUB_REJECT))
    _script(bin_dir / cancel, FAKE_CANCEL.format(python=sys.executable, log=str(cancel_log)))
    return bin_dir, submit_log, cancel_log


def _cai(tmp_path: Path, path: str, *args: str, timeout: float = 90) -> tuple[subprocess.CompletedProcess, float]:
    """``cai cluster ARGS -- --data ... --result ...`` as a process (scheduler on the loopback interface)."""
    env = {**os.environ, "PATH": path}
    cmd = [sys.executable, "-m", "cosmicai.cli", "cluster", *args, "--interface", "lo",
           "--dashboard-address", "127.0.0.1:0", "--", "--data", str(tmp_path / "data"),
           "--result", str(tmp_path / "res"), "--model", "astromae-random"]
    t0 = time.monotonic()
    proc = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=timeout, cwd=tmp_path)
    return proc, time.monotonic() - t0


def _only_line(stderr: str) -> str:
    lines = [line for line in stderr.splitlines() if line.strip()]
    assert len(lines) == 1, stderr
    assert "Traceback" not in stderr and "cai: submitted" not in stderr, stderr
    return lines[0]


def _lines(path: Path) -> list[str]:
    return path.read_text().splitlines() if path.exists() else []


@pytest.mark.parametrize("kind", ["slurm", "pbs"])
def test_refused_submission_is_one_line_and_nothing_is_left(kind, tmp_path):
    bin_dir, submit_log, cancel_log = _fake_batch(tmp_path, kind)
    proc, seconds = _cai(tmp_path, f"{bin_dir}:{os.environ['PATH']}", kind, "--jobs", "2", "--account", "nope")
    line = _only_line(proc.stderr)
    assert proc.returncode == 2 and seconds < FAST_S, (proc.returncode, seconds)
    submit = "sbatch" if kind == "slurm" else "qsub"
    assert line == (f"cai: error: cai cluster {kind}: {submit} refused the job (exit status 1): "
                    f"{REJECT if kind == 'slurm' else QSUB_REJECT} (2 of 2 job(s) refused); no job was submitted; "
                    "check the job options (--account, --queue, --memory, --walltime; --dry-run prints the script)")
    assert len(_lines(submit_log)) == 2          # both jobs were really tried
    assert _lines(cancel_log) == []              # nothing was accepted, so nothing is cancelled
    assert not (tmp_path / "res").exists()       # the run never started


@pytest.mark.parametrize("kind", ["slurm", "pbs"])
def test_jobs_accepted_before_a_refusal_are_cancelled(kind, tmp_path):
    bin_dir, submit_log, cancel_log = _fake_batch(tmp_path, kind, accept=2)
    proc, seconds = _cai(tmp_path, f"{bin_dir}:{os.environ['PATH']}", kind, "--jobs", "3")
    line = _only_line(proc.stderr)
    assert proc.returncode == 2 and seconds < FAST_S, (proc.returncode, seconds)
    assert (REJECT if kind == "slurm" else QSUB_REJECT) in line and "(1 of 3 job(s) refused)" in line
    assert len(_lines(submit_log)) == 3
    # one cancel call naming exactly the accepted jobs; closing the cluster does not cancel them again
    calls = _lines(cancel_log)
    assert len(calls) == 1 and sorted(calls[0].split()) == ["1001", "1002"], calls
    assert "cancelled the 2 job(s) already submitted (" in line


def test_no_sbatch_on_path(tmp_path):
    empty = tmp_path / "empty-bin"
    empty.mkdir()
    proc, seconds = _cai(tmp_path, str(empty), "slurm", "--jobs", "2")
    line = _only_line(proc.stderr)
    assert proc.returncode == 2 and seconds < FAST_S
    assert line.startswith("cai: error: cai cluster slurm: sbatch was not found on PATH; run this on a login node")


def test_hung_sbatch_is_stopped_after_submit_timeout(tmp_path):
    bin_dir, submit_log, cancel_log = _fake_batch(tmp_path, "slurm", accept=1, hang=True)
    proc, seconds = _cai(tmp_path, f"{bin_dir}:{os.environ['PATH']}", "slurm", "--jobs", "2",
                         "--submit-timeout", "2")
    line = _only_line(proc.stderr)
    assert proc.returncode == 2 and 2 <= seconds < FAST_S, seconds
    assert "sbatch did not answer within 2 s" in line and "cancelled the 1 job(s) already submitted (1001)" in line
    assert _lines(cancel_log) == ["1001"]
    pid = int((tmp_path / "hung.pid").read_text())
    with pytest.raises(ProcessLookupError):  # the hung sbatch was killed, not left behind
        os.kill(pid, 0)


def test_submit_timeout_is_checked():
    from cosmicai.runners.batch_jobs import JobSpec
    from cosmicai.errors import ConfigError

    with pytest.raises(ConfigError, match="submit_timeout must be seconds"):
        JobSpec(submit_timeout=0)
    assert JobSpec(submit_timeout=5).submit_timeout == 5


LOCAL_SBATCH = """\
#!/bin/sh
# Fake sbatch that really runs the job script here, in its own session; the job id is its pid. The script is
# copied first, as sbatch does: dask-jobqueue deletes its temporary file once sbatch returns.
cp "$1" {log_dir}/job-$$.sh
setsid sh {log_dir}/job-$$.sh > {log_dir}/job-$$.log 2>&1 < /dev/null &
echo "Submitted batch job $!"
"""

LOCAL_SCANCEL = """\
#!/bin/sh
echo "$@" >> {log_dir}/scancel.log
for id in "$@"; do kill -TERM -- "-$id" 2>/dev/null; done
exit 0
"""


def test_accepted_jobs_run_the_pipeline_and_are_cancelled_at_the_end(tmp_path):
    """The success path is unchanged: jobs a (local) batch system accepted start Dask workers that run the
    whole pipeline; the submitted line names their ids; the jobs are cancelled when the run ends."""
    (tmp_path / "data").mkdir()
    make_random_dataset(tmp_path / "data", partitions=2, rows=6, seed=5)
    bin_dir = tmp_path / "bin"
    bin_dir.mkdir()
    _script(bin_dir / "sbatch", LOCAL_SBATCH.format(log_dir=tmp_path))
    _script(bin_dir / "scancel", LOCAL_SCANCEL.format(log_dir=tmp_path))
    path = f"{bin_dir}:{Path(sys.executable).parent}:{os.environ['PATH']}"
    proc, seconds = _cai(tmp_path, path, "slurm", "--jobs", "2", "--python", sys.executable, timeout=60)
    assert proc.returncode == 0, proc.stderr[-3000:]
    submitted = [line for line in proc.stderr.splitlines() if line.startswith("cai: submitted")]
    assert len(submitted) == 1 and submitted[0].startswith("cai: submitted 2 slurm job(s) ("), proc.stderr
    ids = sorted(re.match(r"cai: submitted 2 slurm job\(s\) \(([\d, ]+)\); scheduler tcp://127\.0\.0\.1:",
                          submitted[0]).group(1).split(", "))
    summary = json.loads((tmp_path / "res" / "summary.json").read_text())
    assert summary["completeness"]["complete"] and summary["completeness"]["rows_out"] == 12
    cancelled = sorted(i for line in _lines(tmp_path / "scancel.log") for i in line.split())
    assert cancelled == ids
    deadline = time.monotonic() + 20
    while any(_alive(int(i)) for i in ids) and time.monotonic() < deadline:
        time.sleep(0.2)
    assert not any(_alive(int(i)) for i in ids)


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    return True
