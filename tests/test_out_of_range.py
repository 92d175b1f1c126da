"""Inputs a rank must not trust, and ranks that run out of memory, as a user meets them in ``cai run``.

* Out-of-range inputs (magnitudes outside ``results.MAGNITUDE_RANGE``, pixels beyond ``results.PIXEL_LIMIT``) are
  still predicted (rows in == rows out) but flagged, like non-finite ones: the ``flag`` column, per-rank counts in
  ``ranks/<rank>.json``, totals in ``summary.json`` (and the metrics leave them out).
* A ``MemoryError`` while reading, decoding or predicting a partition names the partition, its rows/bytes and what
  to do, in ``errors/<rank>.json``, the summary and the one-line CLI error; never an empty message.
"""

from __future__ import annotations

import json
import os

import numpy as np
import pyarrow.parquet as pq
import pytest

from cosmicai import cli
from cosmicai.config import load_config
from cosmicai.data.formats import Manifest, Partition, PartitionEntry, encode_partition, sha256_hex, write_manifest
from cosmicai.errors import ModelError
from cosmicai.models.worker import worker_models
from cosmicai.pipeline import infer
from cosmicai.pipeline.metrics import redshift_metrics
from cosmicai.pipeline.summarize import IncompleteRunError
from cosmicai.results import MAGNITUDE_RANGE, PIXEL_LIMIT
from cosmicai.runners.pipeline import run
from conftest import make_random_partition

ROWS = 8
#: (partition index, row) -> what is wrong with it: ("mag", band, value) / ("pix", (band, y, x), value). Every
#: other row is an ordinary galaxy. Row (2, 7) is out of range twice.
BAD = {(1, 1): [("mag", 2, 1e30)], (1, 3): [("mag", 0, -9999.0)], (1, 6): [("pix", (3, 16, 16), 5e4)],
       (2, 0): [("mag", 0, 99.0)], (2, 7): [("pix", (0, 0, 0), -2e4), ("mag", 4, 41.0)]}


def _spoil(part: Partition, index: int) -> Partition:
    images, mags = part.images.copy(), part.magnitudes.copy()
    for (p, row), changes in BAD.items():
        for kind, where, value in changes if p == index else []:
            if kind == "mag":
                mags[row, where] = value
            else:
                images[(row, *where)] = value
    return Partition(images, mags, part.object_id, part.redshift)


def _dataset(root, partitions: int = 3) -> str:
    os.makedirs(root)
    entries = []
    for i in range(partitions):
        data = encode_partition(_spoil(make_random_partition(ROWS, seed=40 + i, first_id=i * ROWS), i))
        name = f"part-{i + 1:06d}.safetensors"
        with open(os.path.join(root, name), "wb") as fh:
            fh.write(data)
        entries.append(PartitionEntry(name=name, rows=ROWS, bytes=len(data), sha256=sha256_hex(data),
                                      first_row=i * ROWS))
    write_manifest(str(root), Manifest(partitions=entries, has_redshift=True, description="tests: out of range"))
    return str(root)


def _config(data: str, result: str, **kw):
    base = {"data": data, "result": result, "model": "astromae-random", "workers": 1, "threads": 1,
            "batch_size": 4, "world_size": 2}
    return load_config({**base, **kw})[0]


def test_out_of_range_rows_are_predicted_flagged_and_counted(tmp_path):
    data = _dataset(str(tmp_path / "data"))
    result = str(tmp_path / "res")
    summary = run(_config(data, result), progress=False)

    comp = summary["completeness"]
    assert comp["complete"] and comp["rows_in"] == comp["rows_out"] == 3 * ROWS  # every row still predicted
    table = pq.read_table(os.path.join(result, "predictions.parquet"))
    bad_ids = sorted(p * ROWS + row for p, row in BAD)
    flag = table.column("flag").to_numpy(zero_copy_only=False)
    ids = table.column("object_id").to_numpy()
    assert sorted(ids[flag].tolist()) == bad_ids                      # exactly those rows ...
    assert not flag[~np.isin(ids, bad_ids)].any()                     # ... and no ordinary galaxy
    zp = table.column("z_pred").to_numpy()
    kept = np.isin(ids, [ROWS * 1 + 3, ROWS * 1 + 6, ROWS * 2 + 0, ROWS * 2 + 7])
    assert np.isfinite(zp[kept]).all()                                # predicted, not blanked

    # per rank: the rank that read partition 2 (index 1) counts its 3 rows, the other its 2
    plan = json.loads(open(os.path.join(result, "plan.json")).read())
    by_rank = {}
    for rank in (0, 1):
        rec = json.loads(open(os.path.join(result, "ranks", f"{rank}.json")).read())
        by_rank[rank] = rec
        assert rec["out_of_range_rows"] == rec["out_of_range"]["rows"]
    expected = {"part-000002.safetensors": 3, "part-000003.safetensors": 2}
    for rank, rec in by_rank.items():
        mine = {name: n for name, n in expected.items() if name in rec["partitions"]}
        assert rec["out_of_range"]["by_partition"] == mine, (rank, plan)
        assert rec["out_of_range_rows"] == sum(mine.values())
        assert rec["nonfinite_rows"] == int(rec["nonfinite_predictions"].get("part-000002.safetensors", 0))

    oor = summary["out_of_range"]
    assert oor["rows"] == 5 and oor["magnitudes"] == 4 and oor["pixels"] == 2  # row (2, 7) is both
    assert oor["by_partition"] == expected and oor["n_partitions"] == 2
    assert oor["magnitude_range"] == list(MAGNITUDE_RANGE) and oor["pixel_limit"] == PIXEL_LIMIT
    assert summary["out_of_range_rows"] == 5
    stored = json.loads(open(os.path.join(result, "summary.json")).read())
    assert stored["out_of_range"] == oor
    from cosmicai.pipeline.report import format_report

    line = [ln for ln in format_report(summary).splitlines() if "out-of-range inputs" in ln]
    assert line == [f"  out-of-range inputs: 5 row(s) flagged, predicted but not scored (4 with magnitudes outside "
                    f"0..40, 2 with pixels beyond +-10000), in 2 partition(s): {', '.join(sorted(expected))}"], line

    # The metrics score only the trusted rows: no 1e30-sized MAE.
    zt = table.column("z_true").to_numpy()
    want = redshift_metrics(zp[~flag], zt[~flag])
    m = summary["metrics"]
    assert m["n"] == want["n"] == 3 * ROWS - 5 and m["MAE"] == pytest.approx(want["MAE"], rel=1e-12)
    assert m["n_out_of_range"] + m["n_nonfinite_pred"] == 5 and m["n_excluded"] == 5
    assert m["MAE"] < 10


def test_bounds_are_inclusive_and_nonfinite_rows_are_not_counted_twice():
    part = make_random_partition(8, seed=3)
    lo, hi = MAGNITUDE_RANGE
    part.magnitudes[0, 0], part.magnitudes[1, 1] = lo, hi                   # on the bounds: fine
    part.magnitudes[2, 2], part.magnitudes[3, 3] = lo - 0.01, hi + 0.01     # just outside
    part.images[4, 0, 1, 1], part.images[5, 1, 2, 2] = PIXEL_LIMIT, -PIXEL_LIMIT
    part.images[6, 2, 3, 3] = PIXEL_LIMIT * 1.001
    part.images[7, 4, 0, 0], part.magnitudes[7, 0] = np.nan, 1e30           # non-finite: flagged as such only
    mags, pixels = infer.out_of_range_rows(part)
    assert np.flatnonzero(mags).tolist() == [2, 3]
    assert np.flatnonzero(pixels).tolist() == [6]


def test_training_like_galaxies_are_not_flagged(tiny_dataset):
    from cosmicai.data.partition import read_partition

    for name in sorted(os.listdir(tiny_dataset)):
        if name.endswith(".safetensors"):
            mags, pixels = infer.out_of_range_rows(read_partition(os.path.join(tiny_dataset, name)))
            assert not mags.any() and not pixels.any(), name


def test_nonfinite_and_out_of_range_rows_together(tmp_path):
    """drop_nonfinite: a NaN row is counted as non-finite, an out-of-range row as out of range, each once."""
    from safetensors.numpy import save

    from cosmicai.data.formats import FORMAT_NAME, FORMAT_VERSION

    part = make_random_partition(6, seed=9)
    part.images[1, 0, 0, 0] = np.nan
    part.magnitudes[4, 3] = -50.0
    tensors = {"images": part.images, "magnitudes": part.magnitudes, "object_id": part.object_id,
               "redshift": part.redshift}
    blob = save(tensors, metadata={"format": FORMAT_NAME, "format_version": FORMAT_VERSION, "bands": "u,g,r,i,z"})
    folder = tmp_path / "data"
    folder.mkdir()
    (folder / "part-000001.safetensors").write_bytes(blob)
    entry = PartitionEntry("part-000001.safetensors", 6, len(blob), sha256_hex(blob), 0)
    write_manifest(str(folder), Manifest([entry]))
    summary = run(_config(str(folder), str(tmp_path / "res"), world_size=1, drop_nonfinite=True), progress=False)
    table = pq.read_table(tmp_path / "res" / "predictions.parquet")
    assert table.column("flag").to_pylist() == [False, True, False, False, True, False]
    zp = table.column("z_pred").to_numpy()
    assert np.isnan(zp[1]) and np.isfinite(zp[4])
    assert summary["nonfinite_rows"] == 1 and summary["out_of_range"]["rows"] == 1
    assert summary["metrics"]["n"] == 4 and summary["metrics"]["n_out_of_range"] == 1


# -- ranks out of memory ------------------------------------------------------------------------------------------

class _Hungry:
    """A model whose predict always fails with a bare MemoryError (what numpy/torch raise)."""

    def predict(self, images, magnitudes, batch_size=None):
        raise MemoryError()


def _small_dataset(tmp_path) -> str:
    from conftest import make_random_dataset

    root = tmp_path / "data"
    root.mkdir()
    return make_random_dataset(root, partitions=2, rows=6, seed=11)


def _error(result: str, rank: int = 0) -> dict:
    return json.loads(open(os.path.join(result, "errors", f"{rank}.json")).read())


def test_memory_error_while_predicting_names_partition_and_remedy(tmp_path, monkeypatch):
    data = _small_dataset(tmp_path)
    result = str(tmp_path / "res")
    monkeypatch.setattr(worker_models(), "get", lambda *a, **k: (_Hungry(), False, 0.0))
    with pytest.raises(IncompleteRunError) as info:
        run(_config(data, result, world_size=1, batch_size=5), progress=False)
    err = _error(result)
    assert err["error_type"] == "OutOfMemoryError"
    msg = err["message"]
    assert msg.startswith("out of memory while predicting partition part-000001.safetensors (6 rows, 0.1 MB, "
                          "batch 5); use fewer rows per partition (cai data split --partition-size")
    assert "a smaller --batch-size" in msg and "more memory" in msg
    assert "rank 0 failed (OutOfMemoryError: out of memory while predicting partition part-000001" in str(info.value)
    summary = json.loads(open(os.path.join(result, "summary.json")).read())
    assert summary["failures"][0]["message"] == msg and summary["failures"][0]["error_type"] == "OutOfMemoryError"


def test_memory_error_while_decoding_via_cli(tmp_path, monkeypatch, capsys):
    import cosmicai.data.partition as partition_mod

    def no_memory(data, name, allow_nonfinite=False):
        raise MemoryError()

    data = _small_dataset(tmp_path)
    result = str(tmp_path / "res")
    monkeypatch.setattr(partition_mod, "decode", no_memory)
    rc = cli.main(["run", "--data", data, "--result", result, "--model", "astromae-random", "--workers", "1",
                   "--threads", "1", "--world-size", "2"])
    err = capsys.readouterr().err
    lines = [line for line in err.splitlines() if line.startswith("cai: error:")]
    assert rc == 1 and len(lines) == 1, err  # 1: the run is incomplete (a rerun resumes it)
    size = os.path.getsize(os.path.join(data, "part-000001.safetensors")) / 1e6
    assert (f"rank 0 failed (OutOfMemoryError: out of memory while decoding partition part-000001.safetensors "
            f"(6 rows, {size:,.1f} MB); use fewer rows per partition") in lines[0]
    assert "MemoryError: )" not in err and "Traceback" not in err
    assert _error(result, 1)["message"].startswith("out of memory while decoding partition part-000002.safetensors")


def test_memory_error_while_reading(tmp_path, monkeypatch):
    from cosmicai import storage
    from cosmicai.pipeline.plan import make_plan

    data = _small_dataset(tmp_path)
    result = str(tmp_path / "res")
    make_plan(_config(data, result, world_size=1))
    real = storage.read_bytes

    def read_bytes(url, *a, **k):
        if url.endswith(".safetensors"):
            raise MemoryError()
        return real(url, *a, **k)

    monkeypatch.setattr(storage, "read_bytes", read_bytes)
    # the partition reader names the file and its size (one error type for every out-of-memory)
    with pytest.raises(infer.OutOfMemoryError, match=r"part-000001\.safetensors: out of memory reading the "
                                                     r"[\d,]+-byte partition; give the worker more memory"):
        infer.run_task(result, 0)
    assert _error(result)["error_type"] == "OutOfMemoryError"


def test_fast_mode_guard_skips_out_of_range_rows(monkeypatch):
    """The fast-vs-exact guard compares trusted rows only: garbage inputs must not force exact mode (or fail a
    strict run) because two engines disagree on them."""
    class Engine:
        def __init__(self, garbage_out: float):
            self.garbage_out = garbage_out

        def predict(self, images, magnitudes, batch_size=None):
            z = (magnitudes[:, 0] / 100).astype(np.float32)
            return np.where(magnitudes[:, 0] > MAGNITUDE_RANGE[1], self.garbage_out, z)

    part = make_random_partition(10, seed=2)
    part.magnitudes[[2, 7], 0] = 1e30
    fast, exact = Engine(1e3), Engine(-1e3)
    monkeypatch.setattr(worker_models(), "get", lambda *a, **k: (exact, False, 0.0))
    cfg = {"model": "m", "weights": None, "weights_sha256": None, "device": "cpu", "batch_size": 4,
           "fast_guard": "strict"}
    worker_models().clear()
    try:
        untrusted = np.logical_or(*infer.out_of_range_rows(part))
        used, check = infer.checked_model(cfg, fast, part, "part-1", untrusted=untrusted)
        assert used is fast and check["mode_used"] == "fast" and check["rows"] == 8 and check["max_dz"] == 0
        worker_models().clear()
        with pytest.raises(ModelError, match="fast mode deviates from exact"):
            infer.checked_model(cfg, fast, part, "part-1")   # without the mask the garbage rows decide
    finally:
        worker_models().clear()
