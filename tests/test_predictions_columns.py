"""Catalogue columns a dataset carries (``catalog.<name>`` tensors) come out in predictions.parquet, after the
standard columns, with their exact values and types; ranks that disagree on them are named in one line."""

from __future__ import annotations

import json
import os

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from cosmicai.cli import main
from cosmicai.data.formats import Manifest, Partition, PartitionEntry, encode_partition, sha256_hex, write_manifest
from cosmicai.errors import DataError
from cosmicai.results import PREDICTION_COLUMNS

ROWS = 6


def _catalog(ids: np.ndarray) -> dict[str, np.ndarray]:
    return {"ra": (150.0 + ids * 0.001234567891).astype(np.float64),
            "dec": (2.0 - ids * 0.25).astype(np.float32),
            # SDSS specobjids are unsigned 64-bit: values above 2**63 must survive exactly
            "specobjid": (np.uint64(2**63) + ids.astype(np.uint64) * np.uint64(2**40) + np.uint64(7))}


def _dataset(root, parts: int, columns=_catalog, seed: int = 0) -> str:
    rng = np.random.default_rng(seed)
    root.mkdir()
    entries = []
    for i in range(parts):
        ids = np.arange(i * ROWS, (i + 1) * ROWS, dtype=np.int64)
        part = Partition(rng.random((ROWS, 5, 32, 32), dtype=np.float32),
                         rng.uniform(15, 24, (ROWS, 5)).astype(np.float32), ids,
                         rng.uniform(0, 0.4, ROWS).astype(np.float32), columns(ids) if i != -1 else {})
        data = encode_partition(part)
        name = f"part-{i + 1:06d}.safetensors"
        (root / name).write_bytes(data)
        entries.append(PartitionEntry(name, ROWS, len(data), sha256_hex(data), i * ROWS))
    cols = list(columns(np.arange(1, dtype=np.int64)))
    write_manifest(str(root), Manifest(entries, columns=cols))
    return str(root)


def _run(data: str, result: str, *extra: str) -> int:
    return main(["run", "--data", data, "--result", result, "--model", "astromae-random", "--workers", "1",
                 "--threads", "1", "--batch-size", "8", "--quiet", *extra])


def test_catalogue_columns_reach_predictions_exactly(tmp_path, capsys):
    data = _dataset(tmp_path / "data", parts=3)
    result = str(tmp_path / "res")
    assert _run(data, result, "--world-size", "2") == 0
    out = capsys.readouterr().out
    assert "catalogue columns carried into predictions.parquet: ra, dec, specobjid" in out
    table = pq.read_table(os.path.join(result, "predictions.parquet"))
    assert table.column_names == list(PREDICTION_COLUMNS) + ["ra", "dec", "specobjid"]
    assert table.schema.field("ra").type == pa.float64() and table.schema.field("dec").type == pa.float32()
    assert table.schema.field("specobjid").type == pa.uint64()
    ids = table.column("object_id").to_numpy()
    assert sorted(ids.tolist()) == list(range(3 * ROWS))
    want = _catalog(ids)
    for name in ("ra", "dec", "specobjid"):
        got = table.column(name).to_numpy()
        assert got.dtype == want[name].dtype and np.array_equal(got, want[name]), name
    spec = table.column("specobjid").to_pylist()
    assert spec[ids.tolist().index(17)] == 2**63 + 17 * 2**40 + 7  # > 2**63, exact as a Python int
    assert json.load(open(os.path.join(result, "summary.json")))["catalog_columns"] == ["ra", "dec", "specobjid"]
    # each rank's own file carries them too
    rank1 = pq.read_table(os.path.join(result, "predictions", "1.parquet"))
    assert rank1.column_names[-3:] == ["ra", "dec", "specobjid"]


def test_ranks_with_different_catalogue_columns_are_named(tmp_path, capsys):
    def mixed(ids):  # 'dec' as float64 in the second partition: a dataset assembled from two sources
        cols = _catalog(ids)
        return dict(cols, dec=cols["dec"].astype(np.float64)) if ids[0] >= ROWS else cols

    data = _dataset(tmp_path / "data", parts=2, columns=mixed)
    result = str(tmp_path / "res")
    assert _run(data, result, "--world-size", "2") == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1, err
    assert err[0].startswith(f"cai: error: rank 1: {result}/predictions/1.parquet has catalogue columns "
                             "[ra double, dec double, specobjid uint64] but rank 0 has [ra double, dec float, "
                             "specobjid uint64]; the dataset's partitions must carry the same columns")
    assert not os.path.exists(os.path.join(result, "predictions.parquet"))  # nothing half-combined


def test_partitions_of_one_rank_must_agree_and_not_shadow_prediction_columns():
    from cosmicai.pipeline.infer import _RankOutput

    ids = np.arange(3, dtype=np.int64)
    base = dict(images=np.zeros((3, 5, 32, 32), np.float32), magnitudes=np.full((3, 5), 20, np.float32),
                object_id=ids)
    out = _RankOutput((0.0, 1.0))
    out.add("a", Partition(**base, columns={"ra": np.ones(3)}), np.full(3, 0.5), False, 8)
    with pytest.raises(DataError, match=r"^b: catalogue columns \[ra float64, dec float64\] differ from a's "
                                        r"\[ra float64\]; every partition"):
        out.add("b", Partition(**base, columns={"ra": np.ones(3), "dec": np.ones(3)}), np.full(3, 0.5), False, 8)
    with pytest.raises(DataError, match=r"^c: catalogue column\(s\) \['z_pred'\] have the names of prediction "
                                        r"columns; rename them"):
        _RankOutput().add("c", Partition(**base, columns={"z_pred": np.ones(3)}), np.full(3, 0.5), False, 8)
    table = pq.read_table(pa.BufferReader(out.parquet()))
    assert table.column_names == ["object_id", "partition", "row", "z_pred", "flag", "outside_training_range", "ra"]
