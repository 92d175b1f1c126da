"""Nothing stale and nothing deleted: a resume notices changed data or weights, one live run per result path,
``--overwrite`` removes only what the run wrote, and the run-level input checks (issue #15)."""

from __future__ import annotations

import json
import os
import shutil
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pyarrow.parquet as pq
import pytest

from cosmicai import storage
from cosmicai.config import load_config
from cosmicai.errors import ConfigError, ModelError
from cosmicai.models.worker import worker_models
from cosmicai.pipeline.infer import run_task
from cosmicai.pipeline.lease import LeaseHeldError
from cosmicai.results import LEASE_NAME
from cosmicai.pipeline.plan import make_plan
from cosmicai.runners.pipeline import run

TESTS = str(Path(__file__).parent)


def _cfg(data, result, **kw):
    base = {"data": str(data), "result": str(result), "model": "astromae-random", "workers": 1, "threads": 1,
            "batch_size": 12}
    return load_config({**base, **kw})[0]


def _listed_copy(tiny_dataset, folder: Path) -> Path:
    """The tiny dataset as a plain listing (no manifest), like the original's 1.pt, 2.pt folders."""
    folder.mkdir()
    for name in sorted(os.listdir(tiny_dataset)):
        if name.endswith(".safetensors"):
            shutil.copy(os.path.join(tiny_dataset, name), folder / name)
    return folder


def test_resume_refuses_a_partition_replaced_by_a_same_sized_file(tiny_dataset, tmp_path):
    data = _listed_copy(tiny_dataset, tmp_path / "listed")
    config = _cfg(data, tmp_path / "res", world_size=4)
    plan = make_plan(config)
    run_task(config.result, 0, plan.plan_hash)  # rank 0 finished, then the run was killed
    # part 2 replaced by part 4's bytes: the same name and, with equal row counts, the same size
    victim = data / "part-000002.safetensors"
    other = (data / "part-000004.safetensors").read_bytes()
    assert len(other) == victim.stat().st_size
    time.sleep(0.01)
    victim.write_bytes(other)
    with pytest.raises(ConfigError, match=r"the dataset changed since .* was planned \(new: none, changed: "
                                          r"\['part-000002.safetensors'\]; .*resuming would mix rows of old and new"):
        run(config, progress=False)


def _copy_weights(tmp_path: Path) -> Path:
    from cosmicai.models.astromae import demo_weights_path

    path = tmp_path / "w.safetensors"
    shutil.copy(demo_weights_path(), path)
    return path


def _retrain_in_place(path: Path) -> None:
    """Rewrite the weights file in place with slightly different weights (a retrain or re-import)."""
    from safetensors.torch import load, save

    from cosmicai.models.weights_io import read_safetensors_metadata

    data = path.read_bytes()
    tensors, meta = load(data), read_safetensors_metadata(data)
    tensors["fusion.2.bias"] = tensors["fusion.2.bias"] + 0.01
    path.write_bytes(save(tensors, metadata=meta))


def test_resume_refuses_weights_rewritten_in_place(tiny_dataset, tmp_path):
    weights = _copy_weights(tmp_path)
    config = _cfg(tiny_dataset, tmp_path / "res", model="astromae", weights=str(weights), world_size=2)
    plan = make_plan(config)
    assert len(plan.config["weights_sha256"]) == 64
    run_task(config.result, 0, plan.plan_hash)
    _retrain_in_place(weights)
    worker_models().clear()
    # a worker of the old plan refuses to predict with other weights ...
    with pytest.raises(ModelError, match=r"weights '.*w.safetensors' changed since the run was planned \(sha256 "):
        run_task(config.result, 1, plan.plan_hash)
    # ... and the rerun names what changed instead of finishing half with each model
    with pytest.raises(ConfigError, match=r"already holds a run with a different config \(changed weights_sha256: "
                                          r"'?[0-9a-f]{12}\.\.\.'? -> '?[0-9a-f]{12}\.\.\.'?\)"):
        run(config, progress=False)


def _slow_run(data, result: Path, delay: str) -> subprocess.Popen:
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([TESTS, os.environ.get("PYTHONPATH", "")]),
           "CAI_FAULT_DELAY_S": delay}
    argv = [sys.executable, "-m", "cosmicai.cli", "run", "--data", str(data), "--result", str(result),
            "--model", "faultproxy:slow_model", "--workers", "1", "--threads", "1", "--batch-size", "12", "--quiet"]
    return subprocess.Popen(argv, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, start_new_session=True)


def test_second_run_is_refused_while_the_first_is_live(tiny_dataset, tmp_path, monkeypatch):
    result = tmp_path / "res"
    proc = _slow_run(tiny_dataset, result, "0.5")
    try:
        deadline = time.monotonic() + 60
        while not (result / LEASE_NAME).exists() and proc.poll() is None and time.monotonic() < deadline:
            time.sleep(0.02)
        lease = json.loads((result / LEASE_NAME).read_text())
        assert lease["pid"] == proc.pid and lease["host"] == socket.gethostname()
        for overwrite in (False, True):   # --overwrite is refused too
            with pytest.raises(LeaseHeldError, match=rf"res is in use by a live run \(pid {proc.pid} on host "):
                run(_cfg(tiny_dataset, result, batch_size=5, overwrite=overwrite), progress=False)
        os.kill(proc.pid, signal.SIGKILL)
        proc.communicate(timeout=30)
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.communicate(timeout=30)
    # its owner is gone (same host, no such process): the resume takes the lease over by itself
    monkeypatch.setenv("CAI_FAULT_DELAY_S", "0")
    monkeypatch.syspath_prepend(TESTS)
    summary = run(_cfg(tiny_dataset, result, model="faultproxy:slow_model"), progress=False)
    assert summary["completeness"]["complete"] and summary["completeness"]["rows_out"] == 48
    assert not (result / LEASE_NAME).exists()  # released at the end


def test_a_stale_lease_from_another_host_is_broken_only_when_asked(tiny_dataset, tmp_path):
    result = tmp_path / "res"
    result.mkdir()
    stale = {"run_id": "x", "user": "someone", "host": "elsewhere.example", "pid": 4242,
             "started_at": "2026-11-30T00:00:00Z", "heartbeat": time.time() - 3600}
    (result / LEASE_NAME).write_text(json.dumps(stale))
    with pytest.raises(LeaseHeldError, match=r"holds a stale lease \(pid 4242 on host elsewhere.example .*heartbeat "
                                             r"3600 s ago\); if that run is dead, rerun with --break-lease"):
        run(_cfg(tiny_dataset, result), progress=False)
    summary = run(_cfg(tiny_dataset, result, break_lease=True), progress=False)
    assert summary["completeness"]["complete"]


def test_overwrite_removes_only_what_the_run_wrote(tiny_dataset, tmp_path):
    result = tmp_path / "res"
    run(_cfg(tiny_dataset, result, world_size=2), progress=False)
    notes = result / "predictions" / "my-notes.csv"
    notes.write_text("object_id,comment\n1,interesting\n")
    with pytest.raises(ConfigError, match=r"--overwrite removes only what the previous run wrote, but 1 other file\(s\) "
                                          r"are there: .*my-notes.csv; move them away first"):
        run(_cfg(tiny_dataset, result, world_size=3, overwrite=True), progress=False)
    assert notes.exists() and (result / "predictions" / "0.parquet").exists()   # nothing was deleted
    notes.unlink()
    summary = run(_cfg(tiny_dataset, result, world_size=3, overwrite=True), progress=False)
    assert summary["world_size"] == 3 and sorted(os.listdir(result / "ranks")) == ["0.json", "1.json", "2.json"]


def test_overwrite_never_deletes_a_dataset(tiny_dataset, tmp_path):
    data = tmp_path / "data"
    shutil.copytree(tiny_dataset, data)
    (data / "ranks").mkdir()
    (data / "ranks" / "0.json").write_text("{}")
    before = sorted(os.listdir(data))
    with pytest.raises(ConfigError, match=r"holds a dataset \(manifest.json or partition files\); --overwrite never "
                                          r"deletes data"):
        run(_cfg(data, data, overwrite=True), progress=False)
    assert sorted(os.listdir(data)) == before


def test_files_without_a_plan_are_not_called_another_run(tiny_dataset, tmp_path):
    result = tmp_path / "res"
    (result / "errors").mkdir(parents=True)
    (result / "errors" / "todo.txt").write_text("x")
    with pytest.raises(ConfigError, match=r"already holds files in ranks/predictions/errors/fast_check but no plan.json, so "
                                          r"they are not a cosmicai run's outputs \(.*todo.txt\)"):
        run(_cfg(tiny_dataset, result), progress=False)


def test_a_huge_world_size_materialises_no_empty_rank(tiny_dataset, tmp_path):
    t0 = time.perf_counter()
    plan = make_plan(_cfg(tiny_dataset, tmp_path / "res", world_size=1_000_000))
    assert time.perf_counter() - t0 < 5   # not a speed target: a million empty ranks took 14 s and 1 GB
    assert plan.world_size == 1_000_000 and sorted(plan.tasks) == plan.ranks == [0, 1, 2, 3]
    assert (tmp_path / "res" / "plan.json").stat().st_size < 20_000


def test_a_task_of_a_replaced_plan_is_refused(tiny_dataset, tmp_path):
    result = tmp_path / "res"
    old = make_plan(_cfg(tiny_dataset, result, world_size=2))
    new = make_plan(_cfg(tiny_dataset, result, world_size=3, overwrite=True))
    assert old.plan_hash != new.plan_hash
    with pytest.raises(ConfigError, match=r"the plan was replaced while this run was going .* rank 0 was not run"):
        run_task(str(result), 0, old.plan_hash)
    assert not (result / "ranks" / "0.json").exists()


def test_extreme_finite_inputs_are_flagged_and_counted(tmp_path):
    from cosmicai.data.formats import Partition, encode_partition

    rng = np.random.default_rng(0)
    images = rng.random((6, 5, 32, 32), dtype=np.float32)
    mags = np.full((6, 5), 18.0, np.float32)
    images[1, 0, 0, 0] = 1e19
    mags[4] = 3e38
    data = tmp_path / "data"
    data.mkdir()
    part = Partition(images, mags, np.arange(6, dtype=np.int64), np.full(6, 0.1, np.float32))
    (data / "part-000001.safetensors").write_bytes(encode_partition(part))
    result = tmp_path / "res"
    summary = run(_cfg(data, result, model="astromae-demo"), progress=False)
    table = pq.read_table(result / "predictions.parquet")
    assert table.column("flag").to_pylist() == [False, True, False, False, True, False]
    z = table.column("z_pred").to_numpy(zero_copy_only=False)
    assert np.isnan(z[[1, 4]]).all() and np.isfinite(z[[0, 2, 3, 5]]).all()
    record = json.loads((result / "ranks" / "0.json").read_text())
    assert record["nonfinite_predictions"] == {"part-000001.safetensors": 2}
    assert summary["metrics"]["n"] == 4 and summary["metrics"]["n_excluded"] == 2
    assert summary["nonfinite_predictions"]["rows"] == 2 and summary["nonfinite_predictions"]["partitions"] == [
        "part-000001.safetensors"]
    from cosmicai.pipeline.report import format_report

    assert ("non-finite predictions: 2 row(s) flagged, 2 from finite inputs, in 1 partition(s): "
            "part-000001.safetensors") in format_report(summary)


def test_options_for_another_backend_are_refused(tmp_path):
    with pytest.raises(ConfigError, match=r"'scheduler' \('tcp://h:8786'\) applies only to the dask backend, but the "
                                          r"backend is 'local'"):
        load_config({"data": str(tmp_path), "result": str(tmp_path / "r"), "scheduler": "tcp://h:8786"})


def test_result_paths_are_one_spelling(tiny_dataset, tmp_path):
    first = run(_cfg(tiny_dataset, f"{tmp_path}/res/", world_size=2), progress=False)
    again = run(_cfg(tiny_dataset, f"{tmp_path}//res", world_size=2), progress=False)   # no --overwrite needed
    assert first["plan_hash"] == again["plan_hash"] and first["result_url"] == str(tmp_path / "res")


def test_device_and_weights_are_checked_before_planning(tiny_dataset, tmp_path):
    result = tmp_path / "res"
    with pytest.raises(ConfigError, match=r"weights: .*missing.safetensors does not exist"):
        run(_cfg(tiny_dataset, result, model="astromae", weights=str(tmp_path / "missing.safetensors")),
            progress=False)
    with pytest.raises(ConfigError, match=r"device: device 'cuda' is not available"):
        run(_cfg(tiny_dataset, result, device="cuda"), progress=False)
    assert not result.exists()   # nothing planned, no worker started


def test_a_finished_run_is_reported_without_writing(tiny_dataset, tmp_path, monkeypatch, capsys):
    result = tmp_path / "res"
    done = run(_cfg(tiny_dataset, result, world_size=2), progress=False)

    def refuse(*args, **kwargs):
        raise PermissionError("read-only file system")

    monkeypatch.setattr(storage, "write_bytes", refuse)
    monkeypatch.setattr(storage, "remove", refuse)
    again = run(_cfg(tiny_dataset, result, world_size=2), progress=False, report=True)
    assert again["plan_hash"] == done["plan_hash"] and again["completeness"]["complete"]
    assert "complete: True" in capsys.readouterr().out
