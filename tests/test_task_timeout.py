"""Nothing hangs: a rank whose worker is stopped (a real SIGSTOP, as a hung NFS read or a stuck driver would leave
it) fails by name after its task timeout, its worker is killed, the other ranks complete, and a rerun resumes it.

The plug-in model ``test_task_timeout:hang_once`` (imported by the pool workers, with ``tests/`` on ``sys.path``)
lets the first partition it sees write its process id to ``$CAI_HANG_MARKER`` and then wait, so the test knows
which worker to stop while that worker is inside a task. Later calls (the rerun included) predict at once.
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest

TESTS = str(Path(__file__).resolve().parent)
PARTITIONS, ROWS = 4, 6
TIMEOUT_S = 10   # covers a cold start (interpreter, imports) on a loaded machine


class _HangOnce:
    n_params = 0

    def predict(self, images: np.ndarray, magnitudes: np.ndarray, batch_size: int = 512) -> np.ndarray:
        marker = os.environ.get("CAI_HANG_MARKER")
        if marker:
            try:
                fd = os.open(marker + ".claim", os.O_CREAT | os.O_EXCL | os.O_WRONLY)
            except FileExistsError:
                pass
            else:
                os.close(fd)
                with open(marker + ".tmp", "w") as fh:
                    fh.write(str(os.getpid()))
                os.replace(marker + ".tmp", marker)
                time.sleep(120)   # the test stops this process in here
        return (0.01 * magnitudes.mean(axis=1)).astype(np.float32)


def hang_once(weights=None, device="cpu", mode="exact", threads=None) -> _HangOnce:
    """Model ``test_task_timeout:hang_once``."""
    return _HangOnce()


pytestmark = pytest.mark.skipif(not hasattr(signal, "SIGSTOP"), reason="needs POSIX SIGSTOP")


@pytest.fixture(scope="module")
def dataset(tmp_path_factory) -> str:
    from conftest import make_random_dataset

    return make_random_dataset(tmp_path_factory.mktemp("timeout_data"), PARTITIONS, ROWS, seed=900,
                               description="tests: task timeout")


def _cai(data: str, result: Path, *extra: str) -> list[str]:
    return [sys.executable, "-m", "cosmicai.cli", "run", "--data", data, "--result", str(result), "--model",
            "test_task_timeout:hang_once", "--workers", "2", "--threads", "1", "--quiet", *extra]


def _env(marker: Path) -> dict[str, str]:
    return {**os.environ, "PYTHONPATH": os.pathsep.join([TESTS, os.environ.get("PYTHONPATH", "")]),
            "CAI_HANG_MARKER": str(marker)}


def _gone(pid: int) -> bool:
    import psutil

    try:
        return psutil.Process(pid).status() == psutil.STATUS_ZOMBIE
    except psutil.NoSuchProcess:
        return True


def test_a_stopped_worker_fails_its_rank_by_name_and_a_rerun_resumes_it(dataset, tmp_path):
    result, marker = tmp_path / "res", tmp_path / "hung.pid"
    proc = subprocess.Popen(_cai(dataset, result, "--task-timeout", str(TIMEOUT_S)), env=_env(marker),
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, start_new_session=True)
    pid = None
    try:
        deadline = time.monotonic() + 60
        while not marker.exists():
            assert proc.poll() is None, proc.communicate()[1].decode()[-2000:]
            assert time.monotonic() < deadline, "no worker reached the model"
            time.sleep(0.02)
        pid = int(marker.read_text())
        os.kill(pid, signal.SIGSTOP)     # the worker is inside its task: stopped as a hung read would leave it
        stopped = time.monotonic()
        out, err = proc.communicate(timeout=60)
        took = time.monotonic() - stopped
    finally:
        if proc.poll() is None:
            os.killpg(proc.pid, signal.SIGKILL)
            proc.communicate()
        if pid is not None and not _gone(pid):
            os.kill(pid, signal.SIGKILL)
    err = err.decode()
    assert proc.returncode == 1, err
    assert took < TIMEOUT_S + 10
    assert _gone(pid), "the stopped worker outlived its run"
    failed = [json.loads(p.read_text()) for p in sorted((result / "errors").glob("*.json"))]
    assert len(failed) == 1 and failed[0]["error_type"] == "TaskTimeoutError"
    rank = failed[0]["rank"]
    message = failed[0]["message"]
    assert message.startswith(f"rank {rank} did not finish within its task timeout of {TIMEOUT_S} s "
                              "(set by task_timeout); its worker (pid ") and "was killed" in message
    assert f"FAILED rank {rank}" in out.decode() and "TaskTimeoutError" in out.decode()
    assert err.startswith("cai: error: ") and err.count("\n") == 1
    assert f"rank {rank} failed (TaskTimeoutError: rank {rank} did not finish within" in err
    summary = json.loads((result / "summary.json").read_text())
    assert [f["rank"] for f in summary["failures"]] == [rank]
    assert summary["completeness"]["ranks_done"] == PARTITIONS - 1
    assert sorted(p.name for p in (result / "ranks").glob("*.json")) == sorted(
        f"{r}.json" for r in range(PARTITIONS) if r != rank)

    # The rerun (the model no longer hangs: the marker is taken) runs only the failed rank.
    again = subprocess.run(_cai(dataset, result, "--task-timeout", "none"), env=_env(marker),
                           capture_output=True, timeout=120)
    assert again.returncode == 0, again.stderr.decode()[-2000:]
    assert "[3 rank(s) resumed]" in again.stdout.decode()
    summary = json.loads((result / "summary.json").read_text())
    assert summary["completeness"]["complete"] and summary["completeness"]["rows_out"] == PARTITIONS * ROWS


@pytest.mark.parametrize("value", ["soon", "-1", "nan", "inf"])
def test_a_bad_task_timeout_is_one_line(tiny_dataset, tmp_path, capsys, value):
    from cosmicai.cli import main

    rc = main(["run", "--data", tiny_dataset, "--result", str(tmp_path / "res"), "--task-timeout", value, "--quiet"])
    err = capsys.readouterr().err
    assert rc == 2 and err == ("cai: error: config: 'task_timeout' must be seconds > 0, 0 or 'none' (no timeout), or "
                               f"'auto' (derived from the measured time per row), got '{value}'\n")
    assert not (tmp_path / "res").exists()


def test_task_timeout_values_and_the_plan_hash(tiny_dataset, tmp_path):
    from cosmicai.config import load_config
    from cosmicai.errors import ConfigError
    from cosmicai.pipeline.plan import plan_contents

    base = {"data": tiny_dataset, "result": str(tmp_path / "r")}
    got = {v: load_config({**base, "task_timeout": v})[0].task_timeout
           for v in ("auto", "none", "off", 0, "0", 12, "2.5", None)}
    assert got == {"auto": "auto", "none": 0.0, "off": 0.0, 0: 0.0, "0": 0.0, 12: 12.0, "2.5": 2.5, None: 0.0}
    assert load_config(base)[0].task_timeout == "auto"
    for bad in (True, -3, float("nan"), [5]):
        with pytest.raises(ConfigError, match=r"^config: 'task_timeout' must be seconds > 0"):
            load_config({**base, "task_timeout": bad})
    hashes = {plan_contents(load_config({**base, "task_timeout": v, "allow_unsafe_lease": u,
                                         "model": "astromae-random"})[0])[2]
              for v, u in (("auto", False), (5, True), (0, False))}
    assert len(hashes) == 1   # neither changes what a run computes


def test_auto_timeout_follows_the_slowest_time_per_row():
    from cosmicai.backends.base import AUTO_FLOOR_S, TaskTimeouts, task_rows

    task = {"rank": 2, "task": {"partitions": [{"rows": 10_000}, {"rows": None, "bytes": 20480 * 500}]}}
    assert task_rows(task) == 10_500 and task_rows({"rank": 0}) is None
    auto = TaskTimeouts("auto")
    assert auto.enabled and auto.limit(task) == pytest.approx(10 * 0.05 * 10_500)   # before any measurement
    auto.finished({"task": {"partitions": [{"rows": 100}]}}, 0.2)                  # 2 ms per row
    auto.finished({"task": {"partitions": [{"rows": 100}]}}, 0.1)                  # faster: the slowest stays
    assert auto.slowest_s_per_row == pytest.approx(0.002)
    assert auto.limit(task) == AUTO_FLOOR_S                                         # 210 s < the floor
    assert auto.limit({"task": {"partitions": [{"rows": 100_000}]}}) == pytest.approx(2000.0)
    assert auto.limit({"rank": 0}) is None
    assert "auto: 10 x the slowest 0.002 s/row seen, at least 600 s" in auto.message(task, 600.0, "pid 1")
    assert TaskTimeouts(0.0).enabled is False and TaskTimeouts(7.0).limit(task) == 7.0
