"""Resampling ("infinite") datasets: sizes, order, seeded shuffles, distinct-sample counts, reuse."""

from __future__ import annotations

import json
import os

import numpy as np
import pytest

from cosmicai.data.formats import NATIVE_SAMPLE_BYTES, read_manifest
from cosmicai.data.partition import list_partitions, read_partition
from cosmicai.data.resample import plan_sizes, resample
from cosmicai.errors import ConfigError, DataError

MB = 1024**2


def _ids(url: str) -> np.ndarray:
    return np.concatenate([read_partition(r.url).object_id for r in list_partitions(url)])


def test_plan_sizes_like_the_original_layout():
    rows, per, parts = plan_sizes(1024**3, 25 * MB)
    assert (per, parts) == (25 * MB // NATIVE_SAMPLE_BYTES, 41)
    assert rows == -(-1024**3 // NATIVE_SAMPLE_BYTES)
    with pytest.raises(ConfigError):
        plan_sizes(0, MB)


def test_cycle_repeats_the_source_in_order(tiny_dataset, tmp_path):
    out = str(tmp_path / "cycle")
    info = resample(tiny_dataset, out, MB, MB // 4, "cycle")
    rows, per, parts = plan_sizes(MB, MB // 4)
    assert (info.rows, info.rows_per_partition, info.partitions) == (rows, per, parts) == (52, 12, 5)
    assert info.source_rows == 48 and info.distinct_samples == 48
    ids = _ids(out)
    assert ids.tolist() == list(range(48)) + list(range(4))
    manifest = read_manifest(out)
    assert manifest.total_rows == 52 and [p.rows for p in manifest.partitions] == [12, 12, 12, 12, 4]
    assert json.loads((tmp_path / "cycle" / "resample.json").read_text())["distinct_samples"] == 48
    # the resampled rows carry the source's redshift for the same object
    src = {int(i): float(z) for r in list_partitions(tiny_dataset) for i, z in
           zip(read_partition(r.url).object_id, read_partition(r.url).redshift)}
    last = read_partition(list_partitions(out)[-1].url)
    assert [float(z) for z in last.redshift] == [src[int(i)] for i in last.object_id]


def test_shuffle_is_a_seeded_permutation_per_pass(tiny_dataset, tmp_path):
    a = resample(tiny_dataset, str(tmp_path / "a"), 2 * MB, MB // 2, "shuffle", seed=7)
    assert a.rows == 103 and a.distinct_samples == 48
    ids = _ids(str(tmp_path / "a"))
    assert sorted(ids[:48].tolist()) == list(range(48)) and sorted(ids[48:96].tolist()) == list(range(48))
    assert ids[:48].tolist() != list(range(48))
    resample(tiny_dataset, str(tmp_path / "b"), 2 * MB, MB // 2, "shuffle", seed=7)
    resample(tiny_dataset, str(tmp_path / "c"), 2 * MB, MB // 2, "shuffle", seed=8)
    assert _ids(str(tmp_path / "b")).tolist() == ids.tolist()
    assert _ids(str(tmp_path / "c")).tolist() != ids.tolist()


def test_smaller_than_the_source_uses_fewer_distinct_samples(tiny_dataset, tmp_path):
    info = resample(tiny_dataset, str(tmp_path / "s"), 200_000, MB, "cycle")
    assert info.rows == 10 and info.distinct_samples == 10 and info.partitions == 1


def test_reuse_and_conflicts(tiny_dataset, tmp_path):
    out = tmp_path / "r"
    resample(tiny_dataset, str(out), MB // 2, MB // 4)
    first = out / "1.safetensors"
    stamp = os.stat(first).st_mtime_ns
    resample(tiny_dataset, str(out), MB // 2, MB // 4)  # same parameters: reused, not rewritten
    assert os.stat(first).st_mtime_ns == stamp
    with pytest.raises(DataError, match="different dataset"):
        resample(tiny_dataset, str(out), MB, MB // 4)
    info = resample(tiny_dataset, str(out), MB, MB // 4, overwrite=True)
    assert info.rows == 52 and read_manifest(str(out)).total_rows == 52
    with pytest.raises(ConfigError, match="resampling mode"):
        resample(tiny_dataset, str(tmp_path / "x"), MB, MB, "random")
    with pytest.raises(DataError, match="choose an empty folder"):
        resample(tiny_dataset, tiny_dataset, MB, MB)
