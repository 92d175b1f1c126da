"""cosmicai.data.partition: decode by suffix, read by URL (memory map for local native files), list a dataset."""

from __future__ import annotations

import numpy as np
import pytest

from cosmicai import storage
from cosmicai.data.formats import encode_partition, read_manifest
from cosmicai.data.legacy import write_legacy_pt
from cosmicai.data.partition import (PARTITION_FORMATS, PARTITION_SUFFIXES, PartitionRef, decode, list_partitions,
                                     partition_format, read_partition, read_partition_bytes)
from cosmicai.errors import DataError, StorageError


def assert_same(a, b):
    assert a.images.dtype == b.images.dtype == np.float32
    assert np.array_equal(a.images, b.images) and np.array_equal(a.magnitudes, b.magnitudes)
    assert np.array_equal(a.object_id, b.object_id)
    assert (a.redshift is None) == (b.redshift is None)
    if a.redshift is not None:
        assert np.array_equal(a.redshift, b.redshift)


def test_native_roundtrip_bit_exact_from_bytes_and_memory_map(tmp_path, random_partition):
    part = random_partition(7, seed=3, first_id=100)
    data = encode_partition(part)
    assert encode_partition(part) == data  # deterministic bytes, so checksums are stable across runs
    assert_same(decode(data, "x.safetensors"), part)
    path = tmp_path / "p.safetensors"
    path.write_bytes(data)
    mapped = read_partition(str(path))
    assert isinstance(mapped.images.base, np.memmap) or isinstance(mapped.images, np.memmap)
    assert_same(mapped, part)
    assert float(mapped.images.sum(dtype=np.float64)) == pytest.approx(float(part.images.sum(dtype=np.float64)))


def test_decode_dispatches_legacy_pt_with_row_index_ids(random_partition):
    part = random_partition(4, seed=1, first_id=50)
    got = decode(write_legacy_pt(part), "1.pt")
    assert np.array_equal(got.object_id, np.arange(4))
    assert np.array_equal(got.images, part.images) and np.array_equal(got.redshift, part.redshift)


def test_one_table_of_partition_formats(tmp_path, random_partition):
    """Suffixes, decoders, head checks and the object-id rule all come from PARTITION_FORMATS."""
    assert PARTITION_SUFFIXES == tuple(PARTITION_FORMATS) == (".safetensors", ".pt")
    assert partition_format("s3://b/d/part-000001.safetensors").object_ids
    assert not partition_format("7.pt").object_ids  # legacy ids are row indices
    with pytest.raises(DataError, match=r"^d/x\.npz: unsupported partition format \(expected a \.safetensors or "
                       r"\.pt file\)$"):
        partition_format("d/x.npz")
    junk = tmp_path / "x.npz"
    junk.write_bytes(encode_partition(random_partition(2)))
    with pytest.raises(DataError, match=r"x\.npz: unsupported partition format"):  # refused before its body is read
        read_partition_bytes(str(junk))
    fake = tmp_path / "2.pt"
    fake.write_bytes(encode_partition(random_partition(2)))  # a native file under the legacy suffix
    with pytest.raises(DataError, match=r"2\.pt: not a torch \.pt partition \(first bytes"):
        read_partition_bytes(str(fake))


def test_decode_rejects_unknown_suffix_and_truncated_bytes(random_partition):
    data = encode_partition(random_partition(3))
    with pytest.raises(DataError, match=r"data\.csv: unsupported partition format"):
        decode(data, "data.csv")
    with pytest.raises(DataError, match=r"p\.safetensors: truncated"):
        decode(data[:-100], "p.safetensors")
    with pytest.raises(DataError, match=r"p\.safetensors: truncated"):
        decode(data[:4], "p.safetensors")


def test_decode_nonfinite_is_an_error_unless_allowed(random_partition):
    part = random_partition(5)
    data = bytearray(encode_partition(part))
    # Poke a NaN into the image bytes of row 2 through a decoded copy, then re-encode the raw layout.
    bad = decode(bytes(data), "a.safetensors")
    images = bad.images.copy()
    images[2, 1, 3, 4] = np.nan
    from safetensors.numpy import save
    raw = save({"images": images, "magnitudes": bad.magnitudes, "object_id": bad.object_id,
                "redshift": bad.redshift}, metadata={"format": "cosmicai-partition", "format_version": "1",
                                                     "bands": "u,g,r,i,z"})
    with pytest.raises(DataError, match=r"bad\.safetensors: 1 row\(s\) have NaN or inf .*\[2\]"):
        decode(raw, "bad.safetensors")
    assert np.isnan(decode(raw, "bad.safetensors", allow_nonfinite=True).images[2, 1, 3, 4])


def test_read_partition_missing_and_empty_files(tmp_path):
    with pytest.raises(StorageError, match="no such file"):
        read_partition(str(tmp_path / "nope.safetensors"))
    (tmp_path / "empty.safetensors").write_bytes(b"")
    with pytest.raises(DataError, match="empty.safetensors"):
        read_partition(str(tmp_path / "empty.safetensors"))
    (tmp_path / "empty.pt").write_bytes(b"")
    with pytest.raises(DataError, match=r"empty\.pt: empty file"):
        read_partition(str(tmp_path / "empty.pt"))


def test_list_partitions_from_manifest(tiny_dataset):
    refs = list_partitions(tiny_dataset)
    manifest = read_manifest(tiny_dataset)
    assert [r.name for r in refs] == [f"part-{i:06d}.safetensors" for i in range(1, 5)]
    assert [r.first_row for r in refs] == [0, 12, 24, 36]
    assert all(r.rows == 12 and r.sha256 == e.sha256 for r, e in zip(refs, manifest.partitions))
    assert refs[0].url == storage.join(tiny_dataset, refs[0].name)


def test_list_partitions_without_manifest_in_numeric_order(tmp_path, random_partition):
    for i in (10, 2, 1, 33):
        (tmp_path / f"{i}.pt").write_bytes(write_legacy_pt(random_partition(1, seed=i)))
    (tmp_path / "notes.txt").write_text("ignored")
    refs = list_partitions(str(tmp_path))
    assert [r.name for r in refs] == ["1.pt", "2.pt", "10.pt", "33.pt"]
    assert all(isinstance(r, PartitionRef) and r.rows is None and r.sha256 is None and r.bytes > 20_000
               for r in refs)
    single = list_partitions(str(tmp_path / "2.pt"))
    assert [r.name for r in single] == ["2.pt"]


def test_list_partitions_missing_or_empty_dataset(tmp_path):
    with pytest.raises(DataError, match="dataset not found"):
        list_partitions(str(tmp_path / "absent"))
    (tmp_path / "empty").mkdir()
    with pytest.raises(DataError, match="empty dataset"):
        list_partitions(str(tmp_path / "empty"))
    (tmp_path / "nomanifest").mkdir()
    (tmp_path / "nomanifest" / "manifest.json").write_text('{"format_version": "1", "partitions": []}')
    with pytest.raises(DataError, match="lists no partitions"):
        list_partitions(str(tmp_path / "nomanifest"))
