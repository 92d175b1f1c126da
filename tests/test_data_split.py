"""cai data split / convert: sizes, manifest totals, bit-exact round trips, resume, NaN handling, bad input."""

from __future__ import annotations

import os

import numpy as np
import pytest

from cosmicai import storage
from cosmicai.data.formats import Partition, read_manifest
from cosmicai.data.legacy import write_legacy_pt
from cosmicai.data.partition import list_partitions, read_partition
from cosmicai.data.split import SIZE_SAMPLE_BYTES, rows_per_partition, split
from cosmicai.sizes import parse_size
from cosmicai.errors import ConfigError, DataError


def read_all(url: str) -> Partition:
    return Partition.concat([read_partition(r.url) for r in list_partitions(url)])


def test_partition_sizes_reproduce_the_original_row_counts():
    assert SIZE_SAMPLE_BYTES == 20_508
    assert rows_per_partition("100MB") == 5113  # the original's 100 MB partitions (10 batches of <=512)
    assert rows_per_partition("25MB") == 1278   # the original's 25 MB partitions
    assert rows_per_partition("50MB") == 2556   # the original split 659,817 rows into 259 partitions of 50MB
    assert rows_per_partition("10MB") == 511
    assert rows_per_partition(20_508) == 1
    assert parse_size("1.5GB") == int(1.5 * 2**30) and parse_size("64KiB") == 65536
    with pytest.raises(ConfigError, match=r"--partition-size: '20507B' \(20507 bytes\) is smaller than one sample"):
        rows_per_partition("20507B")
    with pytest.raises(ConfigError, match="cannot parse '25 furlongs'"):
        parse_size("25 furlongs")


def test_split_totals_and_bit_exact_roundtrip(tiny_dataset, tmp_path):
    out = str(tmp_path / "out")
    report = split(tiny_dataset, out, partition_size=5 * SIZE_SAMPLE_BYTES)
    manifest = read_manifest(out)
    assert manifest.total_rows == 48 == read_manifest(tiny_dataset).total_rows
    assert [p.rows for p in manifest.partitions] == [5] * 9 + [3]
    assert [p.first_row for p in manifest.partitions] == list(range(0, 48, 5))
    on_disk = {f: os.path.getsize(os.path.join(out, f)) for f in os.listdir(out) if f.endswith(".safetensors")}
    assert manifest.total_bytes == sum(on_disk.values())
    assert {p.name: p.bytes for p in manifest.partitions} == on_disk
    assert sorted(report.written) == sorted(on_disk) and report.skipped == []
    src, got = read_all(tiny_dataset), read_all(out)
    for key in ("images", "magnitudes", "object_id", "redshift"):
        assert np.array_equal(getattr(src, key), getattr(got, key)), key
    assert not [f for f in os.listdir(out) if f.startswith(".tmp")]


def test_split_resumes_and_rewrites_only_changed_partitions(tiny_dataset, tmp_path):
    out = str(tmp_path / "out")
    split(tiny_dataset, out, partition_size="0.5MB")  # 25 rows per partition -> 2 partitions
    again = split(tiny_dataset, out, partition_size="0.5MB")
    assert again.written == [] and again.skipped == ["part-000001.safetensors", "part-000002.safetensors"]
    path = os.path.join(out, "part-000002.safetensors")
    data = bytearray(open(path, "rb").read())
    data[-1] ^= 0xFF
    open(path, "wb").write(bytes(data))
    os.remove(os.path.join(out, "manifest.json"))  # as after an interrupted run
    third = split(tiny_dataset, out, partition_size="0.5MB")
    assert third.written == ["part-000002.safetensors"] and third.skipped == ["part-000001.safetensors"]
    assert np.array_equal(read_all(out).images, read_all(tiny_dataset).images)


def _legacy_dir(tmp_path, random_partition, sizes=(3, 4, 2)):
    folder = tmp_path / "legacy"
    folder.mkdir()
    parts = []
    for i, n in enumerate(sizes, start=1):
        part = random_partition(n, seed=i)
        parts.append(part)
        (folder / f"{i}.pt").write_bytes(write_legacy_pt(part))
    return str(folder), parts


def test_convert_legacy_dataset_assigns_global_row_ids(tmp_path, random_partition):
    src, parts = _legacy_dir(tmp_path, random_partition)
    out = str(tmp_path / "native")
    report = split(src, out, partition_size="100MB")
    got = read_all(out)
    assert report.manifest.total_rows == 9 and len(report.manifest.partitions) == 1
    assert np.array_equal(got.object_id, np.arange(9))
    assert np.array_equal(got.images, np.concatenate([p.images for p in parts]))
    assert np.array_equal(got.redshift, np.concatenate([p.redshift for p in parts]))


def _with_nan(tmp_path, random_partition):
    folder = tmp_path / "nan"
    folder.mkdir()
    part = random_partition(6, seed=9)
    part.images[1, 0, 0, 0] = np.nan
    part.magnitudes[4, 2] = np.inf
    np.savez(folder / "a.npz", images=part.images, magnitudes=part.magnitudes, redshift=part.redshift)
    return str(folder / "a.npz"), part


def test_nonfinite_rows_error_names_file_and_rows(tmp_path, random_partition):
    src, _ = _with_nan(tmp_path, random_partition)
    with pytest.raises(DataError, match=r"a\.npz: 2 row\(s\) have NaN or inf .*rows \[1, 4\].*--drop-nonfinite"):
        split(src, str(tmp_path / "out"), partition_size="25MB")
    assert read_manifest(str(tmp_path / "out")) is None


def test_drop_nonfinite_drops_and_reports(tmp_path, random_partition):
    src, part = _with_nan(tmp_path, random_partition)
    report = split(src, str(tmp_path / "out"), partition_size="25MB", drop_nonfinite=True)
    assert report.dropped_rows == 2 and report.dropped_by_source == {src: 2}
    got = read_all(str(tmp_path / "out"))
    assert np.array_equal(got.object_id, [0, 2, 3, 5])  # ids are source row indexes, so dropped rows show
    assert np.array_equal(got.images, part.images[[0, 2, 3, 5]])
    assert any("dropped 2 row(s)" in line for line in report.lines())


def test_split_bad_inputs(tmp_path, tiny_dataset):
    with pytest.raises(DataError, match="source not found"):
        split(str(tmp_path / "missing"), str(tmp_path / "o"))
    (tmp_path / "empty").mkdir()
    with pytest.raises(DataError, match="empty folder"):
        split(str(tmp_path / "empty"), str(tmp_path / "o"))
    with pytest.raises(ConfigError, match="must differ from the source"):
        split(tiny_dataset, tiny_dataset)
    with pytest.raises(ConfigError, match="smaller than one sample"):
        split(tiny_dataset, str(tmp_path / "o"), partition_size="10KB")
    assert not storage.exists(str(tmp_path / "o"))
