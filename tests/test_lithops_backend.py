"""The Lithops backend on Lithops' own localhost backend: real Lithops workers (one process per call), a real S3
server, real timeouts. The contract shared with every backend (all rows back, the same predictions, a corrupt
partition named) is in test_backend_contract.py."""

from __future__ import annotations

import os
import stat
import subprocess
import sys
import time
from pathlib import Path

import pytest

pytest.importorskip("lithops", reason="the lithops extra is not installed (pip install 'cosmicai[lithops]')")
psutil = pytest.importorskip("psutil")

import cosmicai  # noqa: E402
from cosmicai import storage  # noqa: E402
from cosmicai.backends.base import TaskTimeoutError, TaskTimeouts  # noqa: E402
from cosmicai.errors import DataError  # noqa: E402
from cosmicai.storage import S3_CLIENT_VARS  # noqa: E402

TESTS = Path(__file__).parent
COMMON = {"model": "astromae-demo", "batch_size": 5, "world_size": 4, "threads": 1}


# Task functions, run inside Lithops workers (they import this module through PYTHONPATH).
def echo(value: int, sleep: float = 0.0) -> dict:
    if value < 0:
        raise DataError(f"partition {value}: bad bytes")
    time.sleep(sleep)
    return {"value": value, "pid": os.getpid()}


@pytest.fixture
def tests_importable(monkeypatch):
    """Lithops workers are fresh interpreters: let them import this module by name."""
    monkeypatch.setenv("PYTHONPATH", os.pathsep.join(filter(None, [str(TESTS), os.environ.get("PYTHONPATH")])))


def _new_descendants(before: set[int]) -> list[psutil.Process]:
    out = []
    for proc in psutil.Process().children(recursive=True):
        try:
            if proc.pid not in before and proc.status() != psutil.STATUS_ZOMBIE:
                out.append(proc)
        except psutil.NoSuchProcess:
            pass
    return out


def test_each_task_once_with_its_exception_and_a_timeout_named(tests_importable):
    from cosmicai.backends.lithops import LithopsBackend

    tasks = [{"value": 1}, {"value": -2}, {"value": 3, "sleep": 30}, {"value": 4}]
    timeouts = TaskTimeouts(2)
    t0 = time.monotonic()
    with LithopsBackend(workers=2) as backend:
        got = {task["value"]: result for task, result in backend.map(echo, tasks, timeouts=timeouts)}
    assert time.monotonic() - t0 < 25  # the sleeping call was killed at its limit, not waited for
    assert sorted(got) == [-2, 1, 3, 4]
    assert got[1]["value"] == 1 and got[4]["value"] == 4
    assert type(got[-2]) is DataError and str(got[-2]) == "partition -2: bad bytes"
    assert type(got[3]) is TaskTimeoutError
    assert str(got[3]).startswith("a task did not finish within its task timeout of 2 s (set by task_timeout); "
                                  "its worker (Lithops localhost call ")
    # Lithops' storage keeps nothing of this executor's jobs
    from lithops.constants import JOBS_DIR, LOGS_DIR

    executor_id = backend._executor.executor_id
    store = backend._executor.storage
    assert store.list_keys(store.bucket, f"lithops.jobs/{executor_id}") == []
    # nor its localhost scratch files
    assert [n for d in (JOBS_DIR, LOGS_DIR) if os.path.isdir(d) for n in os.listdir(d) if n.startswith(executor_id)] == []


def test_close_leaves_no_process_behind(tests_importable):
    from cosmicai.backends.lithops import LithopsBackend

    before = {p.pid for p in psutil.Process().children(recursive=True)}
    backend = LithopsBackend(workers=2)
    results = backend.map(echo, [{"value": 1}, {"value": 2, "sleep": 60}, {"value": 3, "sleep": 60}])
    task, first = next(results)  # one call done, two still running in their worker processes
    assert first["value"] == 1
    running = _new_descendants(before)
    assert running, "the running calls' worker processes were expected"
    results.close()
    backend.close()
    gone, alive = psutil.wait_procs(running, timeout=5)
    assert alive == [] and _new_descendants(before) == []


def _wrapper_without_s3_env(tmp_path: Path) -> str:
    """A Lithops runtime (interpreter) that drops the S3 client variables, as a remote worker has none of the
    client's environment: the backend must hand them over itself."""
    script = tmp_path / "python-no-s3-env"
    unset = " ".join(f"-u {var}" for var in S3_CLIENT_VARS)
    script.write_text(f"#!/bin/sh\nexec env {unset} {sys.executable} \"$@\"\n")
    script.chmod(script.stat().st_mode | stat.S_IXUSR)
    return str(script)


@pytest.mark.s3
def test_a_run_on_s3_gives_the_local_predictions_and_only_the_runs_files(moto_s3, tiny_dataset, tmp_path):
    local = cosmicai.run(tiny_dataset, str(tmp_path / "local"), backend="local", workers=1,
                         backend_options={"in_process": True}, **COMMON)
    data, result = moto_s3.url("lithops-data"), moto_s3.url("lithops-result")
    for name in sorted(os.listdir(tiny_dataset)):
        storage.write_bytes(storage.join(data, name), Path(tiny_dataset, name).read_bytes())
    out = cosmicai.run(data, result, backend="lithops", workers=2,
                       backend_options={"runtime": _wrapper_without_s3_env(tmp_path)}, **COMMON)
    done = out.summary["completeness"]
    assert out.complete and (done["ranks_done"], done["rows_in"], done["rows_out"]) == (4, 48, 48)
    assert out.summary.get("backend", "lithops") == "lithops"
    ref = local.predictions(["object_id", "z_pred"]).to_pydict()
    got = out.predictions(["object_id", "z_pred"]).to_pydict()
    want = dict(zip(ref["object_id"], ref["z_pred"]))
    assert sorted(got["object_id"]) == list(range(48))
    assert max(abs(z - want[i]) for i, z in zip(got["object_id"], got["z_pred"])) <= 1e-6
    # the result folder holds what a local run writes, nothing of Lithops'
    s3 = moto_s3.client()
    keys = [o["Key"] for o in s3.list_objects_v2(Bucket=moto_s3.bucket, Prefix="lithops-result/")["Contents"]]
    names = {k[len("lithops-result/"):] for k in keys}
    local_names = {str(p.relative_to(tmp_path / "local")) for p in (tmp_path / "local").rglob("*") if p.is_file()}
    assert names == local_names
    assert not any("lithops" in name for name in names)


def test_a_missing_lithops_package_is_one_line(tiny_dataset, tmp_path):
    code = ("import sys; sys.modules['lithops'] = None\n"
            "from cosmicai.cli import main\n"
            f"sys.exit(main(['run', '--data', {tiny_dataset!r}, '--result', {str(tmp_path / 'r')!r},"
            " '--backend', 'lithops', '--world-size', '2']))\n")
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert proc.returncode == 2, proc.stderr
    lines = proc.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("cai: error: ")
    assert "lithops" in lines[0] and "pip install 'cosmicai[lithops]'" in lines[0]
    assert "Traceback" not in proc.stderr


def test_the_backend_itself_names_the_install_when_lithops_is_missing():
    code = ("import sys; sys.modules['lithops'] = None\n"
            "from cosmicai.backends.lithops import LithopsBackend\n"
            "try:\n    LithopsBackend()\nexcept Exception as exc:\n    print(type(exc).__name__, exc)\n")
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=60)
    assert proc.stdout.strip() == ("ConfigError backend 'lithops' needs the lithops package, which is not installed: "
                                   "pip install 'cosmicai[lithops]'")


def test_quiet_by_default_and_bad_options_named(tests_importable, capfd):
    from cosmicai.backends.lithops import LithopsBackend
    from cosmicai.errors import ConfigError

    with LithopsBackend(workers=1) as backend:
        assert [r["value"] for _, r in backend.map(echo, [{"value": 7}])] == [7]
        assert isinstance(next(backend.map(echo, [{"value": -1}]))[1], DataError)
    out, err = capfd.readouterr()
    assert out == "" and err == ""
    with pytest.raises(ConfigError, match=r"lithops backend: workers must be a positive integer, got 0"):
        LithopsBackend(workers=0)
    with pytest.raises(ConfigError, match=r"lithops backend: config file /nonexistent/lithops.yaml does not exist"):
        LithopsBackend(config="/nonexistent/lithops.yaml")
    with pytest.raises(ConfigError, match=r"scheduler 'tcp://x:1' applies to the dask backend only"):
        LithopsBackend(scheduler="tcp://x:1")


def test_a_lithops_config_file_or_dict_names_the_backend(tmp_path):
    from cosmicai.backends.lithops import LithopsBackend

    path = tmp_path / "lithops.yaml"
    path.write_text("lithops:\n  backend: localhost\n  storage: localhost\nlocalhost:\n  worker_processes: 3\n")
    for config in (str(path), {"lithops": {"backend": "localhost", "storage": "localhost"}}):
        with LithopsBackend(config=config, workers=3) as backend:
            assert backend.backend == "localhost" and backend.runtime == sys.executable
            assert backend._executor.config["localhost"]["worker_processes"] == 3
