"""Fault injection: every fault is followed by a resume (a rerun of the same config) that completes the run with
rows in == rows out, checked against the dataset's manifest and partitions (every object_id exactly once in
``predictions.parquet``), and every failure on the way is named (rank, partition, reason).

Faults: ``cai run`` killed -9 mid-partition; a pool worker killed -9; a partition deleted, corrupted or truncated
between plan and infer; a result write failing; the S3 server stopped and restarted mid-run; S3 answering
500/503/SlowDown or dropping connections (tests/faultproxy.py), transiently and persistently. Also: summarize
twice gives identical files; two runs at once into different result paths do not interfere.
"""

from __future__ import annotations

import io
import json
import os
import shutil
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path
from typing import Any

import numpy as np
import pyarrow.parquet as pq
import pytest

from cosmicai import storage
from cosmicai.config import load_config
from cosmicai.data.formats import read_manifest
from cosmicai.data.partition import read_partition
from cosmicai.errors import CaiError
from cosmicai.pipeline.plan import make_plan
from cosmicai.runners.pipeline import run
from cosmicai.pipeline.summarize import IncompleteRunError, summarize
from faultproxy import FaultProxy, expected_z, ledger

TESTS = str(Path(__file__).resolve().parent)
MODEL = "astromae-random"
SLOW = "faultproxy:slow_model"


def _cfg(data: str, result: str, **kw: Any):
    base = {"data": data, "result": result, "model": MODEL, "workers": 1, "threads": 1, "batch_size": 12}
    return load_config({**base, **kw})[0]


def assert_no_row_lost(result: str, data: str, model: str = MODEL) -> int:
    """The combined table holds every row of the dataset exactly once; returns the row count."""
    manifest = read_manifest(data)
    parts = [read_partition(storage.join(data, e.name)) for e in manifest.partitions]
    ids = np.concatenate([p.object_id for p in parts])
    table = pq.read_table(io.BytesIO(storage.read_bytes(storage.join(result, "predictions.parquet"))))
    got = table.column("object_id").to_numpy()
    assert table.num_rows == manifest.total_rows == len(ids)
    assert np.unique(got).size == got.size, "an object_id appears more than once"
    np.testing.assert_array_equal(np.sort(got), np.sort(ids))
    if model.startswith("faultproxy:"):
        # Each prediction sits on its own row: recompute the plug-in model's output per object_id.
        want = expected_z(np.concatenate([p.images for p in parts]), np.concatenate([p.magnitudes for p in parts]))
        order = np.argsort(ids)
        np.testing.assert_allclose(table.column("z_pred").to_numpy()[np.argsort(got)], want[order], rtol=1e-6)
    comp = storage.read_json(storage.join(result, "summary.json"))["completeness"]
    assert comp["complete"] and comp["rows_in"] == comp["rows_out"] == manifest.total_rows
    assert comp["partitions_done"] == comp["partitions_planned"] == len(manifest.partitions)
    assert comp["missing_ranks"] == [] and comp["failed_ranks"] == []
    return table.num_rows


def _records(result: str) -> dict[int, dict]:
    urls = storage.list_files(storage.join(result, "ranks"), ".json")
    return {int(storage.basename(u).split(".")[0]): storage.read_json(u) for u in urls}


def _upload(local: str, url: str) -> str:
    for name in sorted(os.listdir(local)):
        storage.write_bytes(storage.join(url, name), Path(local, name).read_bytes())
    return url


def _in_thread(fn, *args, **kw) -> tuple[threading.Thread, dict]:
    out: dict[str, Any] = {}

    def target() -> None:
        try:
            out["value"] = fn(*args, **kw)
        except BaseException as exc:  # noqa: BLE001 - inspected by the test
            out["error"] = exc

    thread = threading.Thread(target=target, daemon=True)
    thread.start()
    return thread, out


def _wait_for(path: Path, timeout: float = 120, alive=lambda: True) -> None:
    deadline = time.monotonic() + timeout
    while not path.exists() and alive() and time.monotonic() < deadline:
        time.sleep(0.005)
    assert path.exists(), f"{path} never appeared"


# --- processes killed ---------------------------------------------------------------------------------------------

def test_cai_run_killed_mid_partition_then_resumed(tiny_dataset, tmp_path, monkeypatch):
    result = tmp_path / "res"
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([TESTS, os.environ.get("PYTHONPATH", "")]),
           "CAI_FAULT_DELAY_S": "0.6"}
    argv = [sys.executable, "-m", "cosmicai.cli", "run", "--data", tiny_dataset, "--result", str(result),
            "--model", SLOW, "--workers", "1", "--threads", "1", "--batch-size", "12", "--quiet"]
    proc = subprocess.Popen(argv, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE)
    try:
        _wait_for(result / "ranks" / "0.json", alive=lambda: proc.poll() is None)
        time.sleep(0.3)                     # rank 1 is now inside its partition (0.6 s of predict)
        os.kill(proc.pid, signal.SIGKILL)
    finally:
        proc.kill()
        proc.communicate(timeout=30)
    assert proc.returncode == -signal.SIGKILL
    done = _records(str(result))
    assert 0 in done and 1 not in done and 3 not in done
    assert not (result / "errors").exists() or not os.listdir(result / "errors")   # -9 leaves no report

    monkeypatch.setenv("CAI_FAULT_DELAY_S", "0")
    summary = run(_cfg(tiny_dataset, str(result), model=SLOW), progress=False)
    assert summary["ranks_resumed"] == len(done) and summary["ranks_run"] == 4 - len(done)
    after = _records(str(result))
    assert all(after[r] == done[r] for r in done)           # finished ranks were not redone
    rows = assert_no_row_lost(str(result), tiny_dataset, SLOW)
    ledger("cai run killed -9 mid-partition", faults=1, resumes=1, rows_in=48, rows_out=rows)


def _pool_workers() -> list:
    """This process's spawned pool workers (not the multiprocessing resource tracker)."""
    import psutil

    return [p for p in psutil.Process().children() if any("spawn_main" in part for part in p.cmdline())]


def test_pool_worker_killed_mid_partition_then_resumed(tiny_dataset, tmp_path, monkeypatch):
    monkeypatch.setenv("CAI_FAULT_DELAY_S", "0.6")
    result = str(tmp_path / "res")
    config = _cfg(tiny_dataset, result, model=SLOW, workers=1, backend_options={"in_process": False})
    thread, out = _in_thread(run, config, progress=False)
    _wait_for(Path(result, "ranks", "0.json"), alive=thread.is_alive)
    time.sleep(0.2)
    workers = _pool_workers()
    assert len(workers) == 1, workers
    workers[0].kill()
    thread.join(120)
    assert not thread.is_alive()
    assert isinstance(out.get("error"), IncompleteRunError), out
    assert "missing ranks" in str(out["error"]) or "failed" in str(out["error"])
    done = _records(result)
    assert 0 < len(done) < 4

    monkeypatch.setenv("CAI_FAULT_DELAY_S", "0")
    summary = run(_cfg(tiny_dataset, result, model=SLOW), progress=False)
    assert summary["ranks_resumed"] == len(done) and summary["ranks_run"] == 4 - len(done)
    rows = assert_no_row_lost(result, tiny_dataset, SLOW)
    ledger("pool worker killed -9 mid-partition", faults=1, resumes=1, rows_in=48, rows_out=rows)


# --- data and results damaged -------------------------------------------------------------------------------------

DAMAGE = {
    "deleted": (lambda p, good: p.unlink(), "no such file"),
    "corrupted": (lambda p, good: p.write_bytes(good[:-9] + bytes(b ^ 0xA5 for b in good[-9:])),
                  "sha256 does not match the manifest"),
    "truncated": (lambda p, good: p.write_bytes(good[: len(good) // 2]), "but the plan lists"),
}


@pytest.mark.parametrize("fault", sorted(DAMAGE))
def test_partition_damaged_between_plan_and_infer(fault, tiny_dataset, tmp_path):
    data = tmp_path / "data"
    shutil.copytree(tiny_dataset, data)
    result = str(tmp_path / "res")
    config = _cfg(str(data), result, world_size=4)
    make_plan(config)
    victim = data / "part-000002.safetensors"
    good = victim.read_bytes()
    damage, reason = DAMAGE[fault]
    damage(victim, good)

    with pytest.raises(IncompleteRunError) as err:
        run(config, progress=False)
    message = str(err.value)
    assert "rank 1 failed" in message and str(victim) in message and reason in message
    error = json.loads(Path(result, "errors", "1.json").read_text())
    assert error["partitions"] == ["part-000002.safetensors"] and reason in error["message"]
    comp = json.loads(Path(result, "summary.json").read_text())["completeness"]
    assert comp["failed_ranks"] == [1] and comp["rows_out"] == 36 and not comp["complete"]

    victim.write_bytes(good)
    summary = run(config, progress=False)
    assert summary["ranks_run"] == 1 and summary["ranks_resumed"] == 3
    assert not Path(result, "errors", "1.json").exists()
    rows = assert_no_row_lost(result, str(data))
    ledger(f"partition {fault} between plan and infer", faults=1, resumes=1, rows_in=48, rows_out=rows)


def test_unlisted_dataset_partition_deleted_after_plan_is_named(tiny_dataset, tmp_path):
    """Without a manifest the plan comes from a listing; losing a partition after planning must still be
    reported as that partition, and restoring it must let the same config resume."""
    data = tmp_path / "listed"
    data.mkdir()
    for name in sorted(os.listdir(tiny_dataset)):
        if name.endswith(".safetensors"):
            shutil.copy(Path(tiny_dataset, name), data / name)
    result = str(tmp_path / "res")
    config = _cfg(str(data), result, world_size=4)
    make_plan(config)
    victim = data / "part-000003.safetensors"
    good, before = victim.read_bytes(), victim.stat()
    victim.unlink()
    with pytest.raises(CaiError) as err:
        run(config, progress=False)
    assert "part-000003.safetensors" in str(err.value), str(err.value)
    victim.write_bytes(good)
    os.utime(victim, ns=(before.st_atime_ns, before.st_mtime_ns))  # restored as it was (cp -p, rsync -t)
    summary = run(config, progress=False)
    comp = summary["completeness"]
    assert comp["complete"] and comp["rows_in"] == comp["rows_out"] == 48


def test_result_write_failing_is_named_then_resumed(tiny_dataset, tmp_path):
    """A rank whose predictions cannot be written (a folder is in the way) fails by name; the others finish."""
    result = tmp_path / "res"
    config = _cfg(tiny_dataset, str(result), world_size=4)
    make_plan(config)
    blocker = result / "predictions" / "1.parquet"
    blocker.mkdir(parents=True)
    (blocker / "keep").write_text("x")
    with pytest.raises(IncompleteRunError) as err:
        run(config, progress=False)
    assert "rank 1 failed (StorageError:" in str(err.value) and "predictions/1.parquet: cannot write" in str(err.value)
    assert sorted(_records(str(result))) == [0, 2, 3]
    assert json.loads((result / "errors" / "1.json").read_text())["error_type"] == "StorageError"

    shutil.rmtree(blocker)
    summary = run(config, progress=False)
    assert summary["ranks_run"] == 1
    rows = assert_no_row_lost(str(result), tiny_dataset)
    ledger("result write failing (local)", faults=1, resumes=1, rows_in=48, rows_out=rows)


def _without_summarize_time(summary: dict) -> dict:
    """``summary`` without ``stages.summarize_s``, the one field a summarize pass measures about itself."""
    assert summary["stages"]["summarize_s"] > 0
    return {**summary, "stages": {k: v for k, v in summary["stages"].items() if k != "summarize_s"}}


def test_summarize_twice_gives_identical_files(tiny_dataset, tmp_path):
    result = str(tmp_path / "res")
    run(_cfg(tiny_dataset, result, world_size=3), progress=False)
    names = ("combined_data.json", "predictions.parquet")  # summary.json: the same but for summarize's own time
    first = {n: Path(result, n).read_bytes() for n in names}
    first_summary = _without_summarize_time(json.loads(Path(result, "summary.json").read_text()))
    again = summarize(result)
    assert {n: Path(result, n).read_bytes() for n in names} == first
    assert _without_summarize_time(json.loads(Path(result, "summary.json").read_text())) == first_summary
    for n in (*names, "summary.json"):                # rebuilt from the rank outputs alone
        Path(result, n).unlink()
    assert _without_summarize_time(summarize(result)) == _without_summarize_time(again)
    assert {n: Path(result, n).read_bytes() for n in names} == first
    assert _without_summarize_time(json.loads(Path(result, "summary.json").read_text())) == first_summary
    assert_no_row_lost(result, tiny_dataset)


# --- S3 faults ----------------------------------------------------------------------------------------------------

@pytest.fixture
def s3_data(s3_url, tiny_dataset) -> str:
    """The tiny dataset uploaded to the session S3 server (straight, not through a proxy)."""
    return _upload(tiny_dataset, storage.join(s3_url, "data"))


@pytest.fixture
def proxy(s3_server, monkeypatch):
    """A fault proxy in front of the session S3 server; cosmicai's S3 client is pointed at it for this test."""
    with FaultProxy(s3_server.endpoint) as px:
        monkeypatch.setenv("CAI_S3_ENDPOINT", px.endpoint)
        yield px


@pytest.mark.s3
def test_s3_transient_errors_are_retried_through(s3_data, s3_url, proxy):
    rules = [proxy.add_rule("GET", r"/manifest\.json", 503, "ServiceUnavailable", times=1),
             proxy.add_rule("GET", r"/data/part-000002\.safetensors", 503, "SlowDown", times=2),
             proxy.add_rule("GET", r"list-type=2", 500, "InternalError", times=1),
             proxy.add_rule("PUT", r"/predictions/", 500, "InternalError", times=1),
             proxy.add_rule("PUT", r"/ranks/3\.json", None, times=1),
             proxy.add_rule("GET", r"/data/part-000004\.safetensors", None, times=1)]
    result = storage.join(s3_url, "res")
    summary = run(_cfg(s3_data, result, world_size=4), progress=False)
    assert [r.failed for r in rules] == [r.times for r in rules], proxy.log
    assert proxy.injected == 7
    assert summary["ranks_run"] == 4 and summary["completeness"]["complete"]
    rows = assert_no_row_lost(result, s3_data)
    ledger("S3 503/SlowDown/500/reset, retried through", faults=proxy.injected, resumes=0, rows_in=48,
           rows_out=rows)


PERSISTENT = {
    "get-500": ("GET", r"/data/part-000002\.safetensors", 500, "InternalError", 1, "part-000002.safetensors: cannot read"),
    "put-slowdown": ("PUT", r"/predictions/2\.parquet", 503, "SlowDown", 2, "predictions/2.parquet: cannot write"),
}


@pytest.mark.s3
@pytest.mark.parametrize("fault", sorted(PERSISTENT))
def test_s3_persistent_error_is_named_then_resumed(fault, s3_data, s3_url, proxy, monkeypatch):
    monkeypatch.setenv("AWS_MAX_ATTEMPTS", "1")          # botocore gives up at once; s3fs still retries some
    method, path, status, code, rank, reason = PERSISTENT[fault]
    proxy.add_rule(method, path, status, code, times=10**6)
    result = storage.join(s3_url, "res")
    config = _cfg(s3_data, result, world_size=4)
    with pytest.raises(IncompleteRunError) as err:
        run(config, progress=False)
    message = str(err.value)
    assert f"rank {rank} failed (StorageError:" in message and reason in message, message
    error = storage.read_json(storage.join(result, "errors", f"{rank}.json"))
    assert error["rank"] == rank and reason in error["message"]
    injected = proxy.injected
    assert injected >= 1

    proxy.clear()
    summary = run(config, progress=False)
    assert summary["ranks_run"] == 1 and summary["ranks_resumed"] == 3
    assert not storage.exists(storage.join(result, "errors", f"{rank}.json"))
    rows = assert_no_row_lost(result, s3_data)
    ledger(f"S3 persistent {fault}, named then resumed", faults=injected, resumes=1, rows_in=48, rows_out=rows)


@pytest.mark.s3
def test_s3_persistent_error_while_planning_is_named_then_resumed(s3_data, s3_url, proxy, monkeypatch):
    """S3 keeps answering 503 to the manifest's HEAD: the run stops with a StorageError naming manifest.json
    (exit 2 from the CLI), nothing is planned from a partial view, and a rerun after the outage completes."""
    monkeypatch.setenv("AWS_MAX_ATTEMPTS", "1")
    proxy.add_rule("HEAD", r"/data/manifest\.json", 503, "ServiceUnavailable", times=10**6)
    result = storage.join(s3_url, "res")
    config = _cfg(s3_data, result, world_size=4)
    with pytest.raises(CaiError) as err:
        run(config, progress=False)
    assert storage.join(s3_data, "manifest.json") in str(err.value), repr(err.value)
    injected = proxy.injected
    proxy.clear()
    assert not storage.exists(storage.join(result, "plan.json"))
    summary = run(config, progress=False)
    assert summary["ranks_run"] == 4
    rows = assert_no_row_lost(result, s3_data)
    ledger("S3 persistent 503 while planning, named then resumed", faults=injected, resumes=1, rows_in=48,
           rows_out=rows)


@pytest.mark.s3
def test_s3_server_stopped_and_restarted_mid_run(s3_server, s3_data, s3_url, monkeypatch):
    if s3_server.kind != "rclone":
        pytest.skip("needs the rclone S3 server: moto keeps objects in memory, so they do not survive a restart")
    monkeypatch.setenv("CAI_FAULT_DELAY_S", "0.4")
    result = storage.join(s3_url, "res")
    on_disk = Path(s3_server.data_dir, *result[len("s3://"):].split("/"))
    config = _cfg(s3_data, result, world_size=4, model=SLOW)
    thread, out = _in_thread(run, config, progress=False)
    try:
        _wait_for(on_disk / "ranks" / "0.json", alive=thread.is_alive)
        s3_server.stop()
        assert not (on_disk / "ranks" / "3.json").exists()          # really mid-run
        time.sleep(1.5)
    finally:
        s3_server.start()
    thread.join(180)
    assert not thread.is_alive()
    first_ok = "value" in out and out["value"]["completeness"]["complete"]
    if not first_ok:                          # the outage was not absorbed by retries: it must be named
        assert isinstance(out.get("error"), CaiError), out
    monkeypatch.setenv("CAI_FAULT_DELAY_S", "0")
    summary = run(config, progress=False)
    assert summary["completeness"]["complete"]
    rows = assert_no_row_lost(result, s3_data, SLOW)
    ledger("S3 server stopped and restarted mid-run", faults=1, resumes=1, rows_in=48, rows_out=rows,
           survived_without_resume=bool(first_ok))


@pytest.mark.s3
def test_two_runs_at_once_into_different_results(s3_data, s3_url, monkeypatch):
    monkeypatch.setenv("CAI_FAULT_DELAY_S", "0.25")
    a, b = storage.join(s3_url, "run-a"), storage.join(s3_url, "run-b")
    ta, oa = _in_thread(run, _cfg(s3_data, a, world_size=4, model=SLOW), progress=False)
    tb, ob = _in_thread(run, _cfg(s3_data, b, world_size=2, model=SLOW), progress=False)
    ta.join(180)
    tb.join(180)
    assert "value" in oa and "value" in ob, (oa, ob)
    for result in (a, b):
        assert_no_row_lost(result, s3_data, SLOW)
    ra, rb = _records(a), _records(b)
    assert sorted(ra) == [0, 1, 2, 3] and sorted(rb) == [0, 1]
    assert all(r["result_path"] == a for r in ra.values()) and all(r["result_path"] == b for r in rb.values())
    spans = [(min(r["started_at"] for r in rs.values()), max(r["finished_at"] for r in rs.values()))
             for rs in (ra, rb)]
    assert max(s for s, _ in spans) < min(e for _, e in spans), "the two runs did not overlap"
    assert storage.read_json(storage.join(a, "plan.json"))["world_size"] == 4
    assert storage.read_json(storage.join(b, "plan.json"))["world_size"] == 2
    ledger("two runs at once, different result paths", faults=0, resumes=0, rows_in=96, rows_out=96, runs=2)


def test_damaged_rank_output_is_named_then_redone(tiny_dataset, tmp_path):
    """A rank's predictions file damaged after the rank finished (a bad copy, a disk fault): summarize names the
    file instead of crashing, and a rerun of the same config redoes that rank."""
    result = tmp_path / "res"
    config = _cfg(tiny_dataset, str(result), world_size=4)
    run(config, progress=False)
    victim = result / "predictions" / "2.parquet"
    victim.write_bytes(victim.read_bytes()[:100])
    with pytest.raises(CaiError) as err:
        summarize(str(result))
    assert "predictions/2.parquet" in str(err.value), repr(err.value)
    summary = run(config, progress=False)
    assert summary["ranks_run"] == 1 and summary["ranks_resumed"] == 3
    rows = assert_no_row_lost(str(result), tiny_dataset)
    ledger("rank output damaged after the rank finished", faults=1, resumes=1, rows_in=48, rows_out=rows)
