"""No process outlives its run: real ``cai run`` processes, real signals, sent to the ``cai`` process alone.

Each run starts in its own session (``start_new_session=True``), so a signal sent to it reaches only the ``cai``
process, as ``kill PID``, a driver's ``Popen.terminate()`` or the OOM killer would, and never its workers
(Ctrl-C and GNU ``timeout`` signal the whole group, which never was a problem). The plug-in model
``faultproxy:slow_model`` sleeps ``$CAI_FAULT_DELAY_S`` per partition, so the signal lands mid-run.

* SIGKILL to ``cai`` on the local pool: its pool workers are gone within seconds, nothing is written afterwards
  and a driver's ``communicate()`` returns (nobody is left holding its pipes);
* SIGTERM to ``cai``: it stops its pool and exits 143, and a rerun resumes the completed ranks (rows in == rows
  out, finished ranks untouched);
* SIGKILL to ``cai`` on the Dask backend (a LocalCluster the backend started): no worker or nanny process is
  left.

Every wait is bounded and every process started is killed in a ``finally``, so a failing test leaves none behind.
"""

from __future__ import annotations

import io
import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import psutil
import pyarrow.parquet as pq
import pytest

from conftest import make_random_dataset

TESTS = str(Path(__file__).resolve().parent)
SLOW = "faultproxy:slow_model"
PARTITIONS, ROWS = 8, 6
DELAY_S = "1.0"            # per partition: 8 ranks on 2 workers take about 4 s, so signals land mid-run
GONE_WITHIN_S = 5.0        # the parent-death signal is immediate, the watchdog polls every 0.5 s

pytestmark = pytest.mark.skipif(not hasattr(signal, "SIGKILL"), reason="POSIX signals")


@pytest.fixture(scope="module")
def dataset(tmp_path_factory) -> str:
    """8 partitions of 6 rows (ids 0..47): one rank each, so a run is 8 tasks."""
    return make_random_dataset(tmp_path_factory.mktemp("lifetime_data"), PARTITIONS, ROWS, seed=500,
                               description="tests: lifetime")


def _argv(data: str, result: Path, *extra: str) -> list[str]:
    return [sys.executable, "-m", "cosmicai.cli", "run", "--data", data, "--result", str(result), "--model", SLOW,
            "--workers", "2", "--threads", "1", "--batch-size", str(ROWS), "--quiet", *extra]


def _env(delay: str) -> dict[str, str]:
    return {**os.environ, "PYTHONPATH": os.pathsep.join([TESTS, os.environ.get("PYTHONPATH", "")]),
            "CAI_FAULT_DELAY_S": delay}


class Run:
    """A ``cai run`` in its own session; remembers every descendant it has seen, kills them all on exit."""

    def __init__(self, argv: list[str], env: dict[str, str]):
        self.proc = subprocess.Popen(argv, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                                     start_new_session=True)
        self.seen: dict[int, psutil.Process] = {}

    def descendants(self) -> list[psutil.Process]:
        try:
            found = psutil.Process(self.proc.pid).children(recursive=True)
        except psutil.NoSuchProcess:
            found = []
        for p in found:
            self.seen.setdefault(p.pid, p)
        return found

    def workers(self) -> list[psutil.Process]:
        """The spawned worker processes (pool workers, Dask workers), not the resource tracker."""
        out = []
        for p in self.descendants():
            try:
                cmd = " ".join(p.cmdline())
            except psutil.Error:
                continue
            if "spawn_main" in cmd:
                out.append(p)
        return out

    def wait_until(self, what: str, cond, timeout: float = 60.0) -> None:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            self.descendants()
            if cond():
                return
            if self.proc.poll() is not None:
                out, err = self.proc.communicate(timeout=10)
                pytest.fail(f"cai exited ({self.proc.returncode}) before {what}: {err.decode()[-2000:]}")
            time.sleep(0.05)
        pytest.fail(f"timed out after {timeout} s waiting for {what}")

    def __enter__(self) -> "Run":
        return self

    def __exit__(self, *exc) -> None:
        try:
            os.killpg(self.proc.pid, signal.SIGKILL)     # the session: anything still in it
        except (ProcessLookupError, PermissionError):
            pass
        for p in self.seen.values():                     # anything that left the session
            try:
                p.kill()
            except psutil.Error:
                pass
        self.proc.kill()
        try:
            self.proc.communicate(timeout=10)
        except subprocess.TimeoutExpired:
            pass


def _alive(procs: list[psutil.Process]) -> list[psutil.Process]:
    out = []
    for p in procs:
        try:
            if p.is_running() and p.status() != psutil.STATUS_ZOMBIE:
                out.append(p)
        except psutil.NoSuchProcess:
            pass
    return out


def _assert_gone(procs: list[psutil.Process], timeout: float = GONE_WITHIN_S) -> float:
    """Every process in ``procs`` exits within ``timeout`` s; returns how long that took."""
    t0 = time.monotonic()
    while _alive(procs) and time.monotonic() - t0 < timeout:
        time.sleep(0.05)
    left = _alive(procs)
    assert not left, f"still alive {timeout} s after the parent died: " + "; ".join(
        f"pid {p.pid} ppid {p.ppid()} {' '.join(p.cmdline())[:120]}" for p in left)
    return time.monotonic() - t0


def _in_session(sid: int) -> list[psutil.Process]:
    """Every process whose session is ``sid`` (everything the run started, reparented or not)."""
    out = []
    for p in psutil.process_iter():
        try:
            if os.getsid(p.pid) == sid:
                out.append(p)
        except (OSError, psutil.Error):
            pass
    return out


def _written(result: Path) -> dict[str, int]:
    """Every file under the result folder with its size (temporary files included)."""
    return {str(p.relative_to(result)): p.stat().st_size for p in result.rglob("*") if p.is_file()}


def _ranks_done(result: Path) -> dict[int, dict]:
    folder = result / "ranks"
    if not folder.is_dir():
        return {}
    out = {}
    for p in folder.glob("*.json"):
        try:
            out[int(p.stem)] = json.loads(p.read_text())
        except (ValueError, OSError):
            pass
    return out


def _kill_mid_run_and_check(run: Run, result: Path, workers: int) -> None:
    run.wait_until(f"{workers} workers", lambda: len(run.workers()) >= workers)
    run.wait_until("a first rank", lambda: len(_ranks_done(result)) >= 1)
    assert len(_ranks_done(result)) < PARTITIONS, "the run finished before the signal: make DELAY_S longer"
    victims = run.descendants()
    assert len([p for p in victims if "spawn_main" in " ".join(p.cmdline())]) >= workers
    os.kill(run.proc.pid, signal.SIGKILL)                # the cai process alone
    run.proc.wait(timeout=10)
    _assert_gone(victims)
    assert not _alive(_in_session(run.proc.pid)), "a process of the run is left in its session"
    before = _written(result)
    # A driver reading the pipes returns at once: no orphan holds them.
    run.proc.communicate(timeout=5)
    time.sleep(float(DELAY_S) * 1.5)                     # longer than one partition: a live worker would write
    assert _written(result) == before, "files were written after the cai process was killed"
    assert len(_ranks_done(result)) < PARTITIONS


def test_sigkill_to_cai_local_pool_workers_die_with_it(dataset, tmp_path):
    result = tmp_path / "res"
    with Run(_argv(dataset, result), _env(DELAY_S)) as run:
        _kill_mid_run_and_check(run, result, workers=2)


def test_sigterm_to_cai_stops_the_pool_and_a_rerun_resumes(dataset, tmp_path):
    result = tmp_path / "res"
    with Run(_argv(dataset, result), _env(DELAY_S)) as run:
        run.wait_until("2 pool workers", lambda: len(run.workers()) >= 2)
        run.wait_until("a first rank", lambda: len(_ranks_done(result)) >= 1)
        victims = run.descendants()
        t0 = time.monotonic()
        run.proc.terminate()                             # what a driver does: SIGTERM to cai alone
        out, err = run.proc.communicate(timeout=30)
        stopped_s = time.monotonic() - t0
        assert run.proc.returncode in (143, -signal.SIGTERM), (run.proc.returncode, err.decode()[-2000:])
        assert stopped_s < 10, f"cai took {stopped_s:.1f} s to stop after SIGTERM"
        assert b"completed work is kept" in err, err.decode()[-2000:]
        _assert_gone(victims)
    done = _ranks_done(result)
    assert 0 < len(done) < PARTITIONS, sorted(done)
    # the stopped tasks unwound like Ctrl-C: no error report for them, no temporary file left
    assert not list(result.glob("errors/*.json")) and not list(result.rglob(".tmp-*"))

    rerun = subprocess.run(_argv(dataset, result), env=_env("0"), capture_output=True, timeout=120)
    assert rerun.returncode == 0, rerun.stderr.decode()[-3000:]
    info = json.loads((result / "run.json").read_text())
    assert info["ranks_resumed"] == len(done)
    assert sorted(info["ranks_run"]) == sorted(set(range(PARTITIONS)) - set(done))
    after = _ranks_done(result)
    assert all(after[r] == done[r] for r in done)        # the ranks finished before SIGTERM were kept, not redone
    comp = json.loads((result / "summary.json").read_text())["completeness"]
    assert comp["complete"] and comp["rows_in"] == comp["rows_out"] == PARTITIONS * ROWS
    table = pq.read_table(io.BytesIO((result / "predictions.parquet").read_bytes()))
    ids = table.column("object_id").to_numpy()
    np.testing.assert_array_equal(np.sort(ids), np.arange(PARTITIONS * ROWS))


def test_sigkill_to_cai_dask_local_cluster_leaves_no_worker_or_nanny(dataset, tmp_path):
    pytest.importorskip("distributed")
    result = tmp_path / "res"
    with Run(_argv(dataset, result, "--backend", "dask"), _env(DELAY_S)) as run:
        _kill_mid_run_and_check(run, result, workers=2)


# --- the guards one by one ----------------------------------------------------------------------------------------

def _guards(rank: int) -> dict:
    """Run in a pool worker: its parent-death signal (Linux ``PR_GET_PDEATHSIG``) and its watchdog thread."""
    import ctypes
    import threading

    sig = ctypes.c_int(-1)
    if sys.platform.startswith("linux"):
        ctypes.CDLL(None, use_errno=True).prctl(2, ctypes.byref(sig), 0, 0, 0)
    return {"rank": rank, "pid": os.getpid(), "pdeathsig": sig.value,
            "watchdog": any(t.name.startswith("cai-parent-watchdog-") for t in threading.enumerate())}


def test_pool_workers_carry_the_parent_death_signal_and_the_watchdog():
    import threading

    from cosmicai.backends.local import LocalBackend

    linux = sys.platform.startswith("linux")
    with LocalBackend(workers=1, threads=1, in_process=False) as backend:   # pool started by the main thread
        (_, got), = list(backend.map(_guards, [{"rank": 0}]))
    assert got["watchdog"] and got["pdeathsig"] == (int(signal.SIGKILL) if linux else -1)

    # A pool started from a short-lived thread: no parent-death signal (the kernel would send it when that
    # thread exits), only the watchdog; the worker outlives the thread and serves the next map.
    out: dict = {}
    backend = LocalBackend(workers=1, threads=1, in_process=False)
    try:
        thread = threading.Thread(target=lambda: out.update(r=list(backend.map(_guards, [{"rank": 1}]))))
        thread.start()
        thread.join(60)
        (_, first), = out["r"]
        (_, again), = list(backend.map(_guards, [{"rank": 2}]))
    finally:
        backend.close()
    assert first["watchdog"] and first["pdeathsig"] in (0, -1)
    assert again["pid"] == first["pid"]


ORPHAN = """
import subprocess, sys, time
child = subprocess.Popen([sys.executable, "-c", "import time\\nfrom cosmicai.backends.lifetime import die_with_parent\\n"
                          "die_with_parent(pdeathsig=False, interval=0.2)\\nprint('ready', flush=True)\\ntime.sleep(60)"],
                         stdout=subprocess.PIPE)
print(child.pid, child.stdout.readline().decode().strip(), flush=True)
time.sleep(60)
"""


def test_watchdog_alone_ends_a_worker_whose_parent_is_killed():
    proc = subprocess.Popen([sys.executable, "-c", ORPHAN], stdout=subprocess.PIPE, start_new_session=True)
    child = None
    try:
        pid, state = proc.stdout.readline().split()
        child = psutil.Process(int(pid))
        assert state == b"ready" and _alive([child]) and child.ppid() == proc.pid
        proc.kill()
        proc.wait(10)
        took = _assert_gone([child], timeout=3.0)
        assert took < 3.0
    finally:
        for p in (child,):
            if p is not None:
                try:
                    p.kill()
                except psutil.Error:
                    pass
        proc.kill()
        proc.communicate(timeout=10)
