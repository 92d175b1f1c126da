"""Summarize in bounded memory: the streamed predictions.parquet, the chunked metrics, unknown redshifts and
non-finite predictions, on local disk and through the real local S3 server.

The result trees are written by the pipeline's own code (``make_plan``, then ``infer.run_task`` per rank) with
only the partition fetch and the model replaced, as ``benchmarks/summarize_scale.py`` does at scale. The old
whole-table summarize (read every rank, cast the partition column to strings, ``concat_tables``) is
reproduced here as the reference the streamed output must equal.
"""

from __future__ import annotations

import glob
import json
import math
import os
import warnings

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from cosmicai import storage
from cosmicai.config import load_config
from cosmicai.data.formats import Manifest, Partition, PartitionEntry, write_manifest
from cosmicai.models.worker import worker_models
from cosmicai.pipeline import infer
from cosmicai.pipeline import summarize as summarize_mod
from cosmicai.pipeline.metrics import MetricsAccumulator, redshift_metrics
from cosmicai.pipeline.plan import make_plan
from cosmicai.pipeline.summarize import IncompleteRunError, summarize

COLUMNS = ["object_id", "partition", "row", "z_pred", "z_true", "flag", "outside_training_range"]
ZERO_IMAGE = np.zeros((1, 5, 32, 32), dtype=np.float32)


def _default_values(index: int, n: int) -> tuple[np.ndarray | None, np.ndarray]:
    rng = np.random.default_rng(index)
    z_true = rng.gamma(2.0, 0.08, n).astype(np.float32)
    z_pred = (z_true + rng.normal(0, 0.03, n) * (1 + z_true)).astype(np.float32)
    return z_true, z_pred


class _Prepared:
    """The model: returns the prediction the fake fetch put in the magnitudes: |z| in column 0, its sign in
    column 1 (21 for negative, else 20), so every magnitude stays in the physical range and is not flagged."""

    def predict(self, images, magnitudes, batch_size=None):
        return np.where(magnitudes[:, 1] > 20.5, -magnitudes[:, 0], magnitudes[:, 0])


def build_tree(root, monkeypatch, ranks: int, rows: int | list[int], per_rank: int = 1, values=_default_values,
               result: str | None = None) -> str:
    """A result tree of ``ranks`` ranks x ``per_rank`` partitions written by make_plan + infer.run_task.

    ``rows``: rows per partition (one number, or one per partition); ``values(index, n) -> (z_true or None,
    z_pred)`` gives partition ``index``'s (1-based) true redshifts and predictions."""
    n_parts = ranks * per_rank
    sizes = rows if isinstance(rows, list) else [rows] * n_parts
    data = os.path.join(str(root), "data")
    os.makedirs(data, exist_ok=True)
    first = np.concatenate([[0], np.cumsum(sizes)[:-1]]).astype(int)
    entries = [PartitionEntry(name=f"part-{i + 1:06d}.safetensors", rows=int(sizes[i]), bytes=int(sizes[i]) * 20_508,
                              sha256=f"{i:064x}", first_row=int(first[i])) for i in range(n_parts)]
    write_manifest(data, Manifest(partitions=entries, has_redshift=True, description="tests (no partition files)"))

    def fake_fetch(part, allow_nonfinite):
        index = int(part["name"].split("-")[1].split(".")[0])
        n = int(part["rows"])
        z_true, z_pred = values(index, n)
        mags = np.full((n, 5), 20.0, dtype=np.float32)
        mags[:, 0] = np.abs(z_pred)
        mags[:, 1] = np.where(z_pred < 0, 21.0, 20.0)
        start = int(first[index - 1])
        return Partition(images=np.broadcast_to(ZERO_IMAGE, (n, 5, 32, 32)), magnitudes=mags,
                         object_id=np.arange(start, start + n, dtype=np.int64), redshift=z_true), 0.0, 0.0

    monkeypatch.setattr(infer, "_fetch", fake_fetch)
    monkeypatch.setattr(worker_models(), "get", lambda *a, **k: (_Prepared(), False, 0.0))
    result = result or os.path.join(str(root), "result")
    config, _ = load_config({"data": data, "result": result, "model": "astromae-demo", "batch_size": 512,
                             "world_size": ranks, "workers": 1, "threads": 1})
    plan = make_plan(config)
    for rank in plan.ranks:
        infer.run_task(result, rank)
    return result


def old_whole_table(result: str) -> pa.Table:
    """What summarize wrote before streaming: every rank's table, partition cast to strings, concatenated."""
    tables = []
    for path in sorted(glob.glob(os.path.join(result, "predictions", "*.parquet")),
                       key=lambda p: int(os.path.basename(p).split(".")[0])):
        t = pq.read_table(path)
        idx = t.schema.get_field_index("partition")
        tables.append(t.set_column(idx, "partition", t.column("partition").cast(pa.string())))
    combined = pa.concat_tables(tables, promote_options="default")
    return combined.select([c for c in COLUMNS if c in combined.column_names])


@pytest.fixture
def small_groups(monkeypatch):
    """Row groups of 1,000 rows and a read-ahead window of 3 on 2 threads, so small trees exercise both."""
    monkeypatch.setattr(summarize_mod, "ROW_GROUP_ROWS", 1000)
    monkeypatch.setattr(summarize_mod, "READ_AHEAD", 3)
    monkeypatch.setattr(summarize_mod, "READ_THREADS", 2)


def _assert_same_as_old(result: str, old: pa.Table, rows_per_group: int = 1000) -> pa.Table:
    new = pq.read_table(os.path.join(result, "predictions.parquet"))
    assert new.column_names == old.column_names
    assert new.column("partition").type == pa.dictionary(pa.int32(), pa.string())
    assert new.cast(old.schema).equals(old)                     # same rows, order and values
    assert new.column("partition").to_pylist() == old.column("partition").to_pylist()
    meta = pq.ParquetFile(os.path.join(result, "predictions.parquet")).metadata
    sizes = [meta.row_group(i).num_rows for i in range(meta.num_row_groups)]
    assert sizes == [rows_per_group] * (old.num_rows // rows_per_group) + (
        [old.num_rows % rows_per_group] if old.num_rows % rows_per_group else [])
    return new


def test_streamed_output_equals_the_whole_table(tmp_path, monkeypatch, small_groups):
    # 7 ranks x 2 partitions of uneven sizes: row groups cut through ranks and partitions.
    rows = [313, 700, 5, 999, 1001, 250, 0, 640, 77, 1200, 333, 12, 450, 800]
    result = build_tree(tmp_path, monkeypatch, ranks=7, rows=rows, per_rank=2)
    summary = summarize(result)
    comp = summary["completeness"]
    assert comp["complete"] and comp["rows_out"] == comp["rows_in"] == sum(rows) and comp["partitions_done"] == 14
    old = old_whole_table(result)
    new = _assert_same_as_old(result, old)
    assert new.column("object_id").to_pylist() == list(range(sum(rows)))

    # Metrics: equal to redshift_metrics on the whole columns (Bias, Precision, outliers bit for bit).
    want = redshift_metrics(old.column("z_pred").to_numpy(), old.column("z_true").to_numpy())
    got = summary["metrics"]
    assert set(got) == set(want)
    for key, value in want.items():
        assert got[key] == pytest.approx(value, rel=1e-9, abs=0), key
    for key in ("n", "n_excluded", "Bias", "Precision", "outlier_fraction"):
        assert got[key] == want[key], key
    assert summary["nonfinite_predictions"] == {"rows": 0, "from_finite_inputs": 0, "n_partitions": 0,
                                                "partitions": [], "by_partition": {}}

    # Idempotent: a second pass writes byte-identical files (summary.json: but for that pass's own duration), and
    # no temporary file is left behind.
    names = ("combined_data.json", "predictions.parquet")
    before = {n: open(os.path.join(result, n), "rb").read() for n in names}
    first = json.loads(open(os.path.join(result, "summary.json")).read())
    summarize(result)
    assert {n: open(os.path.join(result, n), "rb").read() for n in names} == before
    again = json.loads(open(os.path.join(result, "summary.json")).read())
    assert again["stages"].pop("summarize_s") > 0 and first["stages"].pop("summarize_s") > 0 and again == first
    assert not glob.glob(os.path.join(result, ".tmp-*"))


def test_a_rank_without_redshifts_gets_null_z_true_as_before(tmp_path, monkeypatch, small_groups):
    # The first rank has no z_true column, the later ones do: the output schema grows (a second pass), and the
    # first rank's z_true is null, as concat_tables(promote_options="default") made it.
    def values(index, n):
        z_true, z_pred = _default_values(index, n)
        return (None if index == 1 else z_true), z_pred

    result = build_tree(tmp_path, monkeypatch, ranks=4, rows=600, values=values)
    assert "z_true" not in pq.read_table(os.path.join(result, "predictions", "0.parquet")).column_names
    summary = summarize(result)
    old = old_whole_table(result)
    _assert_same_as_old(result, old)
    assert old.column("z_true").null_count == 600
    m = summary["metrics"]
    assert m["n"] == 1800 and m["n_unknown_z"] == 600 and m["n_excluded"] == 600
    want = redshift_metrics(old.column("z_pred").to_numpy(), old.column("z_true").to_numpy())
    assert m == pytest.approx(want, rel=1e-9)


def test_metrics_accumulator_equals_redshift_metrics_over_chunks():
    rng = np.random.default_rng(3)
    n = 200_003
    zt = rng.gamma(2.0, 0.1, n).astype(np.float32)
    zp = (zt + rng.normal(0, 0.05, n)).astype(np.float32)
    zp[rng.random(n) < 0.01] = np.nan
    zt[rng.random(n) < 0.01] = -1.0
    zt[rng.random(n) < 0.001] = np.nan
    want = redshift_metrics(zp, zt)
    for capacity in (0, 10, n):  # grown from nothing, grown, sized exactly
        acc = MetricsAccumulator(capacity=capacity)
        cuts = np.sort(rng.choice(n, 40, replace=False))
        for a, b in zip(np.r_[0, cuts], np.r_[cuts, n]):
            acc.add(zp[a:b], zt[a:b])
        got = acc.result()
        assert got.keys() == want.keys()
        for key in want:
            assert got[key] == pytest.approx(want[key], rel=1e-12, abs=0), key
        assert got["Precision"] == want["Precision"] and got["Bias"] == want["Bias"]
        assert acc.result() == got  # computed once, stable
    empty = MetricsAccumulator()
    empty.add([np.nan], [0.2])
    res = empty.result()
    assert res["n"] == 0 and res["n_excluded"] == 1 and math.isnan(res["MAE"])


def test_negative_redshift_is_unknown_not_a_null_bias():
    zt = np.array([0.1, -1.0, 0.3, -0.5, 0.2], dtype=np.float32)
    zp = np.array([0.12, 0.4, 0.28, 0.1, 0.2], dtype=np.float32)
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # no RuntimeWarning (division by 1 + z = 0)
        m = redshift_metrics(zp, zt)
    known = zt >= 0
    ref = redshift_metrics(zp[known], zt[known])
    assert m["n"] == 3 and m["n_unknown_z"] == 2 and m["n_excluded"] == 2 and m["n_nonfinite_pred"] == 0
    assert math.isfinite(m["Bias"]) and m["Bias"] == ref["Bias"] and m["MAE"] == ref["MAE"]


def test_negative_redshift_counted_as_unknown_in_the_summary(tmp_path, monkeypatch):
    def values(index, n):
        z_true, z_pred = _default_values(index, n)
        if index == 2:
            z_true[:7] = -1.0
        return z_true, z_pred

    result = build_tree(tmp_path, monkeypatch, ranks=3, rows=50, values=values)
    with warnings.catch_warnings():
        warnings.simplefilter("error", RuntimeWarning)
        summary = summarize(result)
    m = summary["metrics"]
    assert m["n"] == 143 and m["n_unknown_z"] == 7 and m["n_excluded"] == 7
    assert m["Bias"] is not None and math.isfinite(m["Bias"])
    table = pq.read_table(os.path.join(result, "predictions.parquet"))
    assert (table.column("z_true").to_numpy() < 0).sum() == 7  # the data is kept as it was


def test_nonfinite_predictions_are_counted_and_their_partitions_named(tmp_path, monkeypatch):
    # Finite inputs whose prediction came out NaN/inf (an overflowing model): 3 rows in partition 2, 1 in 5.
    def values(index, n):
        z_true, z_pred = _default_values(index, n)
        if index == 2:
            z_pred[[0, 4, 9]] = [np.nan, np.inf, np.nan]
        if index == 5:
            z_pred[3] = np.nan
        return z_true, z_pred

    result = build_tree(tmp_path, monkeypatch, ranks=3, rows=20, per_rank=2, values=values)
    summary = summarize(result, allow_failures=True)
    bad = summary["nonfinite_predictions"]
    assert bad["rows"] == 4 and bad["from_finite_inputs"] == 4 and bad["n_partitions"] == 2
    assert bad["partitions"] == ["part-000002.safetensors", "part-000005.safetensors"]
    assert bad["by_partition"] == {"part-000002.safetensors": 3, "part-000005.safetensors": 1}
    assert summary["metrics"]["n_nonfinite_pred"] == 4 and summary["metrics"]["n"] == 116
    assert storage.read_json(os.path.join(result, "summary.json"))["nonfinite_predictions"] == bad


def test_completeness_checks_are_kept(tmp_path, monkeypatch, small_groups):
    result = build_tree(tmp_path, monkeypatch, ranks=5, rows=400)
    summarize(result)
    before = open(os.path.join(result, "predictions.parquet"), "rb").read()
    # Rank 1's predictions damaged; rank 3's predictions replaced by a table with rows missing.
    path1 = os.path.join(result, "predictions", "1.parquet")
    open(path1, "wb").write(open(path1, "rb").read()[:-40])
    path3 = os.path.join(result, "predictions", "3.parquet")
    pq.write_table(pq.read_table(path3).slice(0, 390), path3)
    with pytest.raises(IncompleteRunError) as err:
        summarize(result)
    message = str(err.value)
    assert "missing ranks [1]" in message and "predictions/1.parquet is unreadable" in message
    assert "partition part-000004.safetensors (rank 3): 400 rows in, 390 rows out" in message
    summary = storage.read_json(os.path.join(result, "summary.json"))
    comp = summary["completeness"]
    assert not comp["complete"] and comp["ranks_done"] == 4 and comp["rows_out"] == 1590
    table = pq.read_table(os.path.join(result, "predictions.parquet"))
    assert table.num_rows == 1590 and "part-000002.safetensors" not in set(table.column("partition").to_pylist())
    assert before != open(os.path.join(result, "predictions.parquet"), "rb").read()


def test_a_failure_while_streaming_leaves_the_old_file(tmp_path, monkeypatch, small_groups):
    result = build_tree(tmp_path, monkeypatch, ranks=4, rows=900)
    summarize(result)
    before = open(os.path.join(result, "predictions.parquet"), "rb").read()
    calls = []

    def failing_score(self, rec, table):
        calls.append(1)
        if len(calls) == 3:  # after two ranks, one row group, were written to the temporary file
            raise RuntimeError("disk on fire")

    monkeypatch.setattr(summarize_mod._Gathered, "_score", failing_score)
    with pytest.raises(RuntimeError, match="disk on fire"):
        summarize(result)
    assert open(os.path.join(result, "predictions.parquet"), "rb").read() == before
    assert not glob.glob(os.path.join(result, ".tmp-*"))


@pytest.mark.s3
def test_s3_summarize_streams_through_the_server(tmp_path, monkeypatch, s3_url, small_groups):
    def values(index, n):
        z_true, z_pred = _default_values(index, n)
        if index == 3:
            z_true[:2] = -1.0
            z_pred[5] = np.nan
        return z_true, z_pred

    local = build_tree(tmp_path / "local", monkeypatch, ranks=6, rows=[700, 333, 1500, 20, 999, 640], values=values)
    local_summary = summarize(local)
    remote = storage.join(s3_url, "result")
    build_tree(tmp_path / "remote", monkeypatch, ranks=6, rows=[700, 333, 1500, 20, 999, 640], values=values,
               result=remote)
    reader = storage.BulkReader(remote)
    assert reader._fs is not None  # the S3 reads go through pyarrow's client here
    summary = summarize(remote)
    assert summary["completeness"] == local_summary["completeness"] and summary["completeness"]["complete"]
    assert summary["metrics"] == local_summary["metrics"]
    assert summary["nonfinite_predictions"] == local_summary["nonfinite_predictions"]
    assert summary["nonfinite_predictions"]["partitions"] == ["part-000003.safetensors"]
    assert summary["metrics"]["n_unknown_z"] == 2
    got = pq.read_table(pa.BufferReader(storage.read_bytes(storage.join(remote, "predictions.parquet"))))
    want = pq.read_table(os.path.join(local, "predictions.parquet"))
    assert got.schema == want.schema and got.num_rows == want.num_rows == 4192
    for name in got.column_names:  # (Table.equals would call the NaN prediction unequal to itself)
        if name == "z_pred":
            np.testing.assert_array_equal(got.column(name).to_numpy(), want.column(name).to_numpy())
        else:
            assert got.column(name).to_pylist() == want.column(name).to_pylist(), name
    assert not [u for u in storage.list_files(remote) if storage.basename(u).startswith(".tmp")]


@pytest.mark.s3
def test_s3_reads_fall_back_to_storage(tmp_path, monkeypatch, s3_url):
    """When pyarrow's S3 client fails (no credentials it can find, no S3 support...), storage reads everything."""
    remote = storage.join(s3_url, "result")
    build_tree(tmp_path, monkeypatch, ranks=6, rows=30, result=remote)
    want = summarize(remote)

    class Broken:
        opened = 0

        def open_input_stream(self, path, compression=None):
            Broken.opened += 1
            raise OSError("AWS Error ACCESS_DENIED")

    monkeypatch.setattr(storage, "arrow_s3", lambda url: Broken())
    got = summarize(remote)
    assert got["metrics"] == want["metrics"] and got["completeness"] == want["completeness"]
    # Switched off after a few fallbacks (records and predictions share one reader): not tried for all 12 reads.
    assert storage.BulkReader.FALLBACKS_BEFORE_OFF <= Broken.opened < 12


def test_duplicate_object_ids_are_counted_in_the_summary(tmp_path):
    """Two partitions that share ids (a dataset assembled twice from the same catalogue): counted and named."""
    from cosmicai.config import load_config
    from cosmicai.data.formats import encode_partition
    from cosmicai.pipeline.report import format_report
    from cosmicai.runners.pipeline import run
    from conftest import make_random_partition

    data = tmp_path / "data"
    data.mkdir()
    (data / "part-000001.safetensors").write_bytes(encode_partition(make_random_partition(10, seed=1, first_id=0)))
    (data / "part-000002.safetensors").write_bytes(encode_partition(make_random_partition(10, seed=2, first_id=7)))
    summary = run(load_config({"data": str(data), "result": str(tmp_path / "res"), "model": "astromae-random",
                               "workers": 1, "threads": 1})[0], progress=False)
    assert summary["completeness"]["complete"] and summary["completeness"]["rows_out"] == 20
    assert summary["duplicate_ids"] == {"ids": 3, "rows": 3, "examples": [7, 8, 9]}
    assert "duplicate object ids: 3 id(s) appear more than once (3 extra row(s)), e.g. 7, 8, 9" in format_report(summary)
