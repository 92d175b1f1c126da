"""The fast-mode guard: fast and exact compared on the weights in use, before a run predicts in fast mode."""

from __future__ import annotations

import json
import os

import numpy as np
import pytest

from cosmicai.config import load_config
from cosmicai.errors import ConfigError, ModelError
from cosmicai.models.guard import CALIBRATION_ROWS, FAST_TOLERANCE, calibrate, max_dz
from cosmicai.models.registry import load_model
from cosmicai.pipeline.report import format_report
from cosmicai.runners.pipeline import run


def _rows(n=CALIBRATION_ROWS, seed=0):
    rng = np.random.default_rng(seed)
    return rng.random((n, 5, 32, 32), dtype=np.float32), rng.uniform(15, 24, (n, 5)).astype(np.float32)


def test_max_dz_ignores_non_finite_rows():
    assert max_dz(np.array([1.0, np.nan, 0.5]), np.array([1.0, 0.2, 0.25])) == pytest.approx(0.2)
    assert max_dz(np.array([np.nan]), np.array([0.1])) == 0.0


def test_guard_falls_back_or_refuses_on_weights_where_fast_deviates(authors_weights):
    images, mags = _rows()
    fast = load_model("astromae", weights=str(authors_weights), mode="fast", threads=1)
    exact = load_model("astromae", weights=str(authors_weights), mode="exact", threads=1)
    check = calibrate(fast, exact, images, mags, sample="part-1")
    assert check.rows == CALIBRATION_ROWS and check.max_dz > FAST_TOLERANCE
    assert not check.passed and check.mode_used == "exact" and check.seconds > 0
    with pytest.raises(ModelError, match=r"fast mode deviates from exact mode by max \|dz\| \d\.\d\de-0\d on 256 rows "
                                         r"of part-1, over the tolerance 0\.002 for these weights"):
        calibrate(fast, exact, images, mags, policy="strict", sample="part-1")


def test_guard_passes_the_demo_weights():
    images, mags = _rows()
    check = calibrate(load_model(mode="fast", threads=1), load_model(threads=1), images, mags)
    assert check.passed and check.mode_used == "fast" and check.max_dz < 1e-4


def _cfg(data, result, **kw):
    return load_config({"data": data, "result": result, "workers": 1, "threads": 1, "batch_size": 16, **kw})[0]


def test_run_in_fast_mode_falls_back_and_says_so(tiny_dataset, authors_weights, tmp_path):
    result = str(tmp_path / "res")
    with pytest.warns(RuntimeWarning, match="predicting in exact mode"):
        summary = run(_cfg(tiny_dataset, result, model="astromae", weights=str(authors_weights), mode="fast",
                           world_size=2), progress=False, report=False)
    assert summary["completeness"]["complete"] and summary["mode"] == "fast" and summary["mode_used"] == "exact"
    fc = summary["fast_check"]
    assert fc["policy"] == "fallback" and fc["max_dz"] > FAST_TOLERANCE and fc["ranks_in_exact"] == [0, 1]
    assert fc["rows_compared"] == 24  # the first 12-row partition of each rank (fewer than 256 rows there)
    stored = json.loads(open(os.path.join(result, "summary.json")).read())
    assert stored["fast_check"]["max_dz"] == pytest.approx(fc["max_dz"])
    rank0 = json.loads(open(os.path.join(result, "ranks", "0.json")).read())
    assert rank0["mode_used"] == "exact" and rank0["fast_check"]["sample"] == "part-000001.safetensors"
    assert "OVER TOLERANCE: 2 rank(s) predicted in exact mode instead" in format_report(summary)
    # the predictions are exact mode's
    exact = run(_cfg(tiny_dataset, str(tmp_path / "exact"), model="astromae", weights=str(authors_weights),
                     world_size=2), progress=False, report=False)
    import pyarrow.parquet as pq

    a = pq.read_table(os.path.join(result, "predictions.parquet")).column("z_pred").to_numpy()
    b = pq.read_table(os.path.join(str(tmp_path / "exact"), "predictions.parquet")).column("z_pred").to_numpy()
    assert exact["mode_used"] == "exact" and "fast_check" not in exact
    np.testing.assert_array_equal(a, b)


def test_strict_fast_mode_refuses_the_run(tiny_dataset, authors_weights, tmp_path):
    from cosmicai.pipeline.summarize import IncompleteRunError

    with pytest.raises(IncompleteRunError) as err:
        run(_cfg(tiny_dataset, str(tmp_path / "res"), model="astromae", weights=str(authors_weights), mode="fast",
                 fast_guard="strict", world_size=1), progress=False, report=False)
    assert "fast mode deviates from exact mode by max |dz|" in str(err.value)


def test_fast_mode_on_demo_weights_stays_fast(tiny_dataset, tmp_path):
    summary = run(_cfg(tiny_dataset, str(tmp_path / "res"), mode="fast"), progress=False, report=False)
    assert summary["mode_used"] == "fast" and summary["fast_check"]["max_dz"] < FAST_TOLERANCE
    assert summary["fast_check"]["ranks_in_exact"] == [] and summary["phases_total_s"]["fast_check"] > 0


def test_a_pool_run_measures_the_check_once_before_its_workers_start(tiny_dataset, tmp_path):
    """Workers that start together reuse the check the run made before starting them: one stored check, and no
    rank pays for it again."""
    result = tmp_path / "res"
    summary = run(_cfg(tiny_dataset, str(result), mode="fast", workers=2, world_size=4), progress=False, report=False)
    assert summary["completeness"]["complete"] and summary["mode_used"] == "fast"
    assert len(list((result / "fast_check").iterdir())) == 1
    records = [json.loads((result / "ranks" / f"{r}.json").read_text()) for r in range(4)]
    checks = [rec["fast_check"] for rec in records]
    assert all(c.get("measured_by_other_worker") or c.get("measured_by_earlier_task") for c in checks), checks
    assert all(c["max_dz"] == checks[0]["max_dz"] < FAST_TOLERANCE for c in checks)
    assert max(c["seconds"] for c in checks) < 0.5  # reading the stored check, not measuring


def test_unknown_fast_guard_is_a_config_error(tmp_path):
    with pytest.raises(ConfigError, match="'fast_guard' must be one of fallback|strict|off, got 'maybe'"):
        load_config({"data": str(tmp_path), "result": str(tmp_path / "r"), "fast_guard": "maybe"})


def test_check_is_measured_once_per_run_and_shared_with_the_same_decision(authors_weights, tmp_path):
    """The first worker process measures and stores ``fast_check/<key>.json``; the next reuses it (no exact model
    loaded, same numbers, this worker's policy applied); other weights or another dataset get their own key."""
    from cosmicai.models.guard import shared_calibrate, shared_key
    from cosmicai.results import RunFolder

    images, mags = _rows(32)
    fast = load_model("astromae", weights=str(authors_weights), mode="fast", threads=1)
    exact = load_model("astromae", weights=str(authors_weights), mode="exact", threads=1)
    calls = []

    def measure():
        calls.append(1)
        return calibrate(fast, exact, images, mags, policy="fallback", sample="part-1", rows=32)

    key = shared_key("astromae", "ab" * 32, fast.engine, "cpu", "/data")
    url = RunFolder(str(tmp_path)).fast_check(key)
    first, reused = shared_calibrate(url, key, "fallback", measure)
    assert not reused and not first.passed and first.mode_used == "exact" and calls == [1]
    stored = json.loads((tmp_path / "fast_check" / f"{key}.json").read_text())
    assert stored["max_dz"] == first.max_dz and stored["key"] == key
    again, reused = shared_calibrate(url, key, "fallback", measure)
    assert reused and calls == [1] and again.max_dz == first.max_dz and again.mode_used == "exact"
    assert again.seconds < first.seconds
    with pytest.raises(ModelError, match=r"fast mode deviates .* on 32 rows of part-1, over the tolerance 0\.002"):
        shared_calibrate(url, key, "strict", measure)  # the stored failure, refused under strict
    assert calls == [1]
    assert shared_key("astromae", "cd" * 32, fast.engine, "cpu", "/data") != key
    assert shared_key("astromae", "ab" * 32, fast.engine, "cpu", "/other") != key
    assert shared_key("astromae", None, fast.engine, "cpu", "/data") is None  # unknown weights: never shared
    assert shared_key("astromae", "ab" * 32, fast.engine, "cuda", "/data") is None
    (tmp_path / "fast_check" / f"{key}.json").write_text('{"rows": 32, "max_dz": 0.0, "passed": true}')  # tampered
    _, reused = shared_calibrate(url, key, "fallback", measure)
    assert not reused and calls == [1, 1]  # an incomplete file is not trusted: measured again
