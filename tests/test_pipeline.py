"""The whole pipeline on this machine: plan -> infer -> summarize, resume, failures, concurrency."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
import threading
import time

import numpy as np
import pyarrow.parquet as pq
import pytest

from cosmicai.config import load_config
from cosmicai.data.formats import INPUT_BITS_PER_SAMPLE, decode_partition, read_manifest
from cosmicai.pipeline.metrics import redshift_metrics
from cosmicai.results import ORIGINAL_KEYS
from cosmicai.pipeline.report import format_report
from cosmicai.runners.pipeline import run
from cosmicai.pipeline.summarize import IncompleteRunError, summarize

MODEL = "astromae-random"


def _config(data, result, **kw):
    base = {"data": data, "result": result, "model": MODEL, "workers": 1, "threads": 1, "batch_size": 5}
    return load_config({**base, **kw})[0]


def _records(result):
    return {int(f.split(".")[0]): json.loads(open(os.path.join(result, "ranks", f)).read())
            for f in os.listdir(os.path.join(result, "ranks"))}


def test_end_to_end_rows_metrics_and_records(tiny_dataset, tmp_path):
    result = str(tmp_path / "res")
    summary = run(_config(tiny_dataset, result, world_size=3), progress=False)
    comp = summary["completeness"]
    assert comp["complete"] and comp["rows_in"] == comp["rows_out"] == comp["rows_planned"] == 48
    assert comp["ranks_done"] == 3 and comp["partitions_done"] == 4 and comp["missing_ranks"] == []

    table = pq.read_table(os.path.join(result, "predictions.parquet"))
    assert table.column_names == ["object_id", "partition", "row", "z_pred", "z_true", "flag",
                                  "outside_training_range"]
    assert not any(table.column("outside_training_range").to_pylist())  # random weights: no training range
    assert summary["outside_training_range"]["known"] is False and summary["catalog_columns"] == []
    assert table.column("object_id").to_pylist() == list(range(48))
    assert table.column("row").to_pylist() == list(range(12)) * 4
    assert not any(table.column("flag").to_pylist())
    zp = table.column("z_pred").to_numpy()
    zt = table.column("z_true").to_numpy()
    expected = redshift_metrics(zp, zt)
    assert summary["metrics"] == pytest.approx(expected)
    assert json.loads(open(os.path.join(result, "summary.json")).read())["metrics"] == pytest.approx(expected)

    # Predictions are the model's own on the same rows, and the true redshifts are the data's.
    from cosmicai.models.registry import load_model

    parts = [decode_partition(open(os.path.join(tiny_dataset, e.name), "rb").read(), e.name)
             for e in read_manifest(tiny_dataset).partitions]
    images = np.concatenate([p.images for p in parts])
    mags = np.concatenate([p.magnitudes for p in parts])
    np.testing.assert_allclose(zp, load_model(MODEL, threads=1).predict(images, mags), rtol=1e-4, atol=1e-5)
    np.testing.assert_array_equal(zt, np.concatenate([p.redshift for p in parts]))

    combined = json.loads(open(os.path.join(result, "combined_data.json")).read())
    assert [r["rank"] for r in combined] == [0, 1, 2]
    prefix = os.path.basename(tiny_dataset)
    first = combined[0]
    assert list(first)[:len(ORIGINAL_KEYS)] == list(ORIGINAL_KEYS)
    assert first["data_path"] == f"{prefix}/part-000001.safetensors,{prefix}/part-000002.safetensors"
    assert combined[2]["data_path"] == f"{prefix}/part-000004.safetensors"
    assert first["rows"] == 24 and first["num_batches"] == 6 and first["batch_size"] == 5      # 2 x ceil(12/5)
    assert first["throughput_bps"] == pytest.approx(24 * INPUT_BITS_PER_SAMPLE / first["total_cpu_time (seconds)"])
    assert first["sample_persec"] == pytest.approx(24 / first["total_cpu_time (seconds)"])
    assert first["result_path"] == result and first["error"] is None and first["cold_start"] in (True, False)
    assert set(first["phases"]) >= {"fetch", "decode", "model_load", "inference", "write"}
    assert first["peak_rss_mb"] > 0 and first["cpu"]["threads"] == 1
    assert summary["rows"] == 48 and summary["throughput_bps"] > 0 and summary["peak_rss_mb"] > 0
    report = format_report(summary)
    assert "rows in 48 / out 48" in report and "MAE" in report

    # summarize is idempotent: a second pass writes byte-identical files, and the same summary but for the
    # duration of that pass (summary.json is written once per summarize, by summarize, with its own timing).
    names = ("combined_data.json", "predictions.parquet")
    before = {n: open(os.path.join(result, n), "rb").read() for n in names}
    first_summary = json.loads(open(os.path.join(result, "summary.json")).read())
    assert first_summary["stages"]["summarize_s"] > 0 and first_summary["stages"]["map_s"] > 0
    summarize(result)
    assert {n: open(os.path.join(result, n), "rb").read() for n in names} == before
    again = json.loads(open(os.path.join(result, "summary.json")).read())
    assert again["stages"].pop("summarize_s") > 0 and first_summary["stages"].pop("summarize_s") > 0
    assert again == first_summary


def _copy(tiny_dataset, dest):
    shutil.copytree(tiny_dataset, dest)
    return str(dest)


def test_failed_rank_is_named_and_rerun_does_only_it(tiny_dataset, tmp_path):
    data = _copy(tiny_dataset, tmp_path / "data")
    victim = os.path.join(data, "part-000003.safetensors")
    good = open(victim, "rb").read()
    bad = bytearray(good)
    bad[-1] ^= 0xFF
    open(victim, "wb").write(bytes(bad))
    result = str(tmp_path / "res")
    with pytest.raises(IncompleteRunError) as err:
        run(_config(data, result), progress=False)
    assert "rank 2 failed (DataError:" in str(err.value) and "sha256" in str(err.value)
    # a damaged partition is not fixed by a rerun: the message says to restore the file first
    assert str(err.value).endswith("restore the changed or damaged partition(s) ['part-000003.safetensors'] from "
                                   "the dataset's source first (a rerun alone fails the same way), then rerun "
                                   "`cai run` with the same config to resume the missing ranks")
    assert "\n" not in str(err.value) and "restore part-000003.safetensors" in str(err.value)
    error = json.loads(open(os.path.join(result, "errors", "2.json")).read())
    assert error["rank"] == 2 and error["partitions"] == ["part-000003.safetensors"]
    assert error["error_type"] == "DataError" and "Traceback" in error["traceback"]
    assert error["remedy"] == "restore" and error["damaged_partition"] == "part-000003.safetensors"
    summary = run(_config(data, result, allow_failures=True), progress=False)
    assert summary["completeness"]["failed_ranks"] == [2] and summary["completeness"]["rows_out"] == 36
    before = _records(result)
    assert sorted(before) == [0, 1, 3]

    open(victim, "wb").write(good)
    summary = run(_config(data, result), progress=False)
    assert summary["completeness"]["complete"] and summary["completeness"]["rows_out"] == 48
    assert summary["ranks_run"] == 1 and summary["ranks_resumed"] == 3
    after = _records(result)
    assert all(after[r] == before[r] for r in (0, 1, 3))        # untouched: same timestamps
    assert not os.path.exists(os.path.join(result, "errors", "2.json"))


def test_killed_run_resumes_only_missing_ranks(tiny_dataset, tmp_path):
    result = str(tmp_path / "res")
    config = {"data": tiny_dataset, "result": result, "model": MODEL, "batch_size": 1, "threads": 1}
    script = ("import sys, json; from cosmicai.config import load_config; from cosmicai.runners.pipeline import run; "
              "from cosmicai.backends.local import LocalBackend; "
              "run(load_config(json.loads(sys.argv[1]))[0], backend=LocalBackend(1, 1), progress=False)")
    proc = subprocess.Popen([sys.executable, "-c", script, json.dumps(config)])
    first = os.path.join(result, "ranks", "0.json")
    try:
        deadline = time.monotonic() + 120
        while not os.path.exists(first) and proc.poll() is None and time.monotonic() < deadline:
            time.sleep(0.01)
        assert os.path.exists(first), "the subprocess never finished rank 0"
    finally:
        proc.kill()
        proc.wait()
    done = _records(result)
    assert 0 in done and 3 not in done                     # killed mid-run
    summary = run(_config(tiny_dataset, result, batch_size=1), progress=False)
    assert summary["completeness"]["complete"] and summary["completeness"]["rows_out"] == 48
    assert summary["ranks_resumed"] == len(done) and summary["ranks_run"] == 4 - len(done)
    after = _records(result)
    assert all(after[r] == done[r] for r in done)


def test_concurrent_runs_into_different_results_do_not_interfere(tiny_dataset, tmp_path):
    outs, errors = {}, []

    def go(name, **kw):
        try:
            outs[name] = run(_config(tiny_dataset, str(tmp_path / name), **kw), progress=False)
        except BaseException as exc:  # noqa: BLE001 - reported below
            errors.append(exc)

    threads = [threading.Thread(target=go, args=("a",), kwargs={"file_limit": 1}),
               threading.Thread(target=go, args=("b",), kwargs={"file_limit": 2, "world_size": 1})]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert not errors
    assert outs["a"]["completeness"]["rows_out"] == 12 and outs["a"]["completeness"]["ranks_done"] == 1
    assert outs["b"]["completeness"]["rows_out"] == 24 and outs["b"]["completeness"]["ranks_done"] == 1
    a = pq.read_table(tmp_path / "a" / "predictions.parquet")
    b = pq.read_table(tmp_path / "b" / "predictions.parquet")
    assert a.column("object_id").to_pylist() == list(range(12))
    assert b.column("object_id").to_pylist() == list(range(24))
    np.testing.assert_allclose(a.column("z_pred").to_numpy(), b.column("z_pred").to_numpy()[:12], rtol=1e-4)
    assert json.loads((tmp_path / "a" / "plan.json").read_text())["result_url"] == str(tmp_path / "a")


def test_local_process_pool_reuses_model_per_worker(tiny_dataset, tmp_path):
    from cosmicai.backends.local import LocalBackend

    result = str(tmp_path / "res")
    # One spawned worker process (not this one) runs all three ranks and loads the model once.
    with LocalBackend(workers=1, threads=1, in_process=False) as backend:
        summary = run(_config(tiny_dataset, result, file_limit=3, world_size=3), backend=backend, progress=False)
    assert summary["completeness"]["complete"] and summary["completeness"]["rows_out"] == 36
    recs = _records(result)
    pids = {r["cpu"]["pid"] for r in recs.values()}
    assert len(pids) == 1 and os.getpid() not in pids
    assert [recs[r]["cold_start"] for r in range(3)] == [True, False, False]
    assert recs[1]["phases"]["model_load"] == 0.0 and recs[0]["phases"]["model_load"] > 0
    assert len(summary["workers"]) == 1 and summary["cold_starts"] == 1


def _write_nan_dataset(folder):
    from safetensors.numpy import save

    from cosmicai.data.formats import FORMAT_NAME, FORMAT_VERSION, Manifest, PartitionEntry, sha256_hex, write_manifest

    rng = np.random.default_rng(5)
    n = 6
    images = rng.random((n, 5, 32, 32), dtype=np.float32)
    images[2, 1, 3, 4] = np.nan
    tensors = {"images": images, "magnitudes": rng.uniform(15, 24, (n, 5)).astype(np.float32),
               "object_id": np.arange(n, dtype=np.int64), "redshift": rng.uniform(0, .4, n).astype(np.float32)}
    data = save(tensors, metadata={"format": FORMAT_NAME, "format_version": FORMAT_VERSION, "bands": "u,g,r,i,z"})
    os.makedirs(folder)
    open(os.path.join(folder, "part-000001.safetensors"), "wb").write(data)
    write_manifest(folder, Manifest([PartitionEntry("part-000001.safetensors", n, len(data), sha256_hex(data), 0)]))
    return folder


def test_nonfinite_rows_fail_or_are_flagged(tmp_path):
    data = _write_nan_dataset(str(tmp_path / "nan"))
    with pytest.raises(IncompleteRunError, match="NaN or inf"):
        run(_config(data, str(tmp_path / "strict")), progress=False)
    summary = run(_config(data, str(tmp_path / "flag"), drop_nonfinite=True), progress=False)
    assert summary["completeness"]["complete"] and summary["completeness"]["rows_out"] == 6
    table = pq.read_table(tmp_path / "flag" / "predictions.parquet")
    assert table.column("flag").to_pylist() == [False, False, True, False, False, False]
    zp = table.column("z_pred").to_numpy()
    assert np.isnan(zp[2]) and np.isfinite(np.delete(zp, 2)).all()
    assert summary["metrics"]["n"] == 5 and summary["metrics"]["n_excluded"] == 1
    assert summary["nonfinite_rows"] == 1


def test_dataset_without_manifest_counts_decoded_rows(tiny_dataset, tmp_path):
    data = tmp_path / "listed"
    data.mkdir()
    for name in ("part-000001.safetensors", "part-000002.safetensors"):
        shutil.copy(os.path.join(tiny_dataset, name), data / name)
    result = str(tmp_path / "res")
    summary = run(_config(str(data), result), progress=False)
    comp = summary["completeness"]
    assert comp["rows_planned"] is None and comp["rows_in"] == comp["rows_out"] == 24 and comp["complete"]
    assert json.loads(open(os.path.join(result, "plan.json")).read())["partitions"][0]["rows"] is None


def test_backend_map_yields_every_task_and_errors():
    from cosmicai.backends.base import Backend
    from cosmicai.errors import ConfigError
    from cosmicai.runners.registry import make_backend

    def fn(result_url, rank):
        if rank == 1:
            raise ValueError("boom")
        return {"rank": rank, "url": result_url}

    backend = make_backend("local", workers=1, threads=1)
    assert isinstance(backend, Backend) and backend.in_process
    tasks = [{"result_url": "x", "rank": r} for r in range(3)]
    out = {t["rank"]: res for t, res in backend.map(fn, tasks)}
    backend.close()
    assert sorted(out) == [0, 1, 2] and out[0] == {"rank": 0, "url": "x"}
    assert isinstance(out[1], ValueError) and str(out[1]) == "boom"
    with pytest.raises(ConfigError, match="backend 'slurm' is not known"):
        make_backend("slurm")
