"""Catalogue columns carried in partitions (`catalog.<name>` tensors) and from a catalogue by
`cai data convert FOLDER --catalog CAT --columns ...`."""

from __future__ import annotations

import csv
import json

import numpy as np
import pytest

from cosmicai.data.formats import (Manifest, Partition, decode_partition, encode_partition, load_partition_file)
from cosmicai.data.partition import list_partitions, read_partition
from cosmicai.errors import DataError

N = 4
BIG = 2**63 + 12345  # an SDSS-style id beyond int64


def _part(columns):
    from conftest import make_random_partition

    part = make_random_partition(N, seed=1)
    part.columns = columns
    return part


def _cols():
    return {"ra": np.linspace(150, 151, N), "dec": np.linspace(2, 3, N).astype(np.float32),
            "specobjid": np.array([BIG, 1, 2, 3], dtype=np.uint64), "plate": np.arange(N, dtype=np.int32),
            "objid": np.arange(N, dtype=np.int64) + 10**15}


def test_columns_round_trip_exactly_in_order(tmp_path):
    part = _part(_cols())
    data = encode_partition(part)
    (tmp_path / "p.safetensors").write_bytes(data)
    for got in (decode_partition(data), load_partition_file(str(tmp_path / "p.safetensors"))):
        assert list(got.columns) == ["ra", "dec", "specobjid", "plate", "objid"]
        for name, arr in _cols().items():
            assert got.columns[name].dtype == arr.dtype
            np.testing.assert_array_equal(got.columns[name], arr)
    assert int(decode_partition(data).columns["specobjid"][0]) == BIG
    taken = decode_partition(data).take(np.array([3, 0]))
    assert taken.columns["plate"].tolist() == [3, 0]
    both = Partition.concat([decode_partition(data), taken])
    assert both.columns["objid"].tolist()[-2:] == [10**15 + 3, 10**15]
    assert Partition.concat([_part({}), _part({})]).columns == {}
    assert part.nbytes == _part({}).nbytes + sum(a.nbytes for a in _cols().values())


@pytest.mark.parametrize("columns, match", [
    ({"1ra": np.zeros(N)}, r"column name '1ra' must match"),
    ({"r-a": np.zeros(N)}, r"column name 'r-a' must match"),
    ({"ra": np.zeros(N, np.int16)}, r"catalogue column 'ra' has dtype int16, expected one of float32, float64"),
    ({"flag": np.zeros(N, bool)}, r"catalogue column 'flag' has dtype bool"),
    ({"ra": np.zeros(N + 1)}, r"catalogue column 'ra' has shape \(5,\), expected \[4\]"),
    ({"ra": np.zeros((N, 2))}, r"catalogue column 'ra' has shape \(4, 2\), expected \[4\]"),
    ({f"c{i}": np.zeros(N) for i in range(33)}, r"33 catalogue columns, at most 32"),
    ({"ra": [1.0, 2.0, 3.0, 4.0]}, r"catalogue column 'ra' is list, expected a numpy array"),
])
def test_bad_columns_are_one_line_errors(columns, match):
    with pytest.raises(DataError, match=match) as info:
        _part(columns).validate("p")
    assert "\n" not in str(info.value)


def _raw(tensors):
    from safetensors.numpy import save

    return save(tensors, metadata={"format": "cosmicai-partition", "format_version": "1", "bands": "u,g,r,i,z"})


def test_stored_tensors_other_than_catalog_are_refused():
    base = _part({})
    tensors = {"images": base.images, "magnitudes": base.magnitudes, "object_id": base.object_id}
    assert decode_partition(_raw({**tensors, "catalog.ra": np.zeros(N)})).columns["ra"].tolist() == [0.0] * N
    with pytest.raises(DataError, match=r"unexpected tensor\(s\) \['extra'\]"):
        decode_partition(_raw({**tensors, "extra": np.zeros(N)}), source="x.safetensors")
    with pytest.raises(DataError, match=r"catalogue column 'ra' has shape \(5,\), expected \[4\]"):
        decode_partition(_raw({**tensors, "catalog.ra": np.zeros(N + 1)}))
    with pytest.raises(DataError, match=r"catalogue column 'ra' has dtype float16"):
        decode_partition(_raw({**tensors, "catalog.ra": np.zeros(N, np.float16)}))
    with pytest.raises(DataError, match=r"column name 'r a' must match"):
        decode_partition(_raw({**tensors, "catalog.r a": np.zeros(N)}))


def test_manifest_records_columns_and_refuses_bad_ones():
    m = Manifest.from_dict({**Manifest(partitions=[], columns=["ra", "dec"]).to_dict()})
    assert m.columns == ["ra", "dec"]
    assert Manifest.from_dict({"format_version": "1", "partitions": []}).columns == []
    for bad in (["ra", "ra"], "ra", ["r a"]):
        with pytest.raises(DataError, match="'columns'"):
            Manifest.from_dict({"format_version": "1", "partitions": [], "columns": bad})


def _cutouts(tmp_path, n=5):
    from conftest import make_random_partition

    part = make_random_partition(n, seed=3)
    folder = tmp_path / "cut"
    folder.mkdir()
    for k in range(n):
        np.save(folder / f"{k + 1}.npy", part.images[k])
    return folder, part


def test_convert_carries_columns_exactly(tmp_path, capsys):
    from cosmicai.cli import main
    from cosmicai.data.formats import read_manifest

    folder, part = _cutouts(tmp_path)
    with open(tmp_path / "cat.csv", "w", newline="") as fh:
        w = csv.writer(fh)
        w.writerow(["objid", "ra", "dec", "specobjid", "u", "g", "r", "i", "z", "name", "nexp"])
        for k in range(5):
            dec = "" if k == 2 else f"{-1.5 + k}"
            w.writerow([k + 1, f"{150.123456789 + k}", dec, BIG + k, *part.magnitudes[k].tolist(), f"g{k}", k])
    out = tmp_path / "ds"
    assert main(["data", "convert", str(folder), "--catalog", str(tmp_path / "cat.csv"), "--out", str(out),
                 "--columns", "ra,dec,specobjid,nexp", "--quiet"]) == 0
    (got,) = [read_partition(r.url) for r in list_partitions(str(out))]
    assert list(got.columns) == ["ra", "dec", "specobjid", "nexp"]
    assert got.columns["ra"].dtype == np.float64 and got.columns["ra"][0] == 150.123456789
    assert np.isnan(got.columns["dec"][2]) and got.columns["dec"][3] == 1.5
    assert got.columns["specobjid"].dtype == np.uint64
    assert [int(v) for v in got.columns["specobjid"]] == [BIG + k for k in range(5)]
    assert got.columns["nexp"].dtype == np.int64 and got.columns["nexp"].tolist() == list(range(5))
    assert read_manifest(str(out)).columns == ["ra", "dec", "specobjid", "nexp"]
    assert json.load(open(out / "manifest.json"))["columns"] == ["ra", "dec", "specobjid", "nexp"]
    assert main(["data", "info", str(out)]) == 0
    assert "columns     ra, dec, specobjid, nexp" in capsys.readouterr().out
    # re-partitioning keeps them
    assert main(["data", "split", str(out), "--out", str(tmp_path / "re"), "--partition-size", str(2 * 20_508),
                 "--quiet"]) == 0
    parts = [read_partition(r.url) for r in list_partitions(str(tmp_path / "re"))]
    assert [len(p) for p in parts] == [2, 2, 1]
    assert np.concatenate([p.columns["specobjid"] for p in parts]).tolist() == got.columns["specobjid"].tolist()
    assert read_manifest(str(tmp_path / "re")).columns == ["ra", "dec", "specobjid", "nexp"]
    # an empty cell in an integer column is refused, naming it
    text = (tmp_path / "cat.csv").read_text().replace(",g1,1", ",g1,")
    (tmp_path / "cat.csv").write_text(text)
    assert main(["data", "convert", str(folder), "--catalog", str(tmp_path / "cat.csv"), "--out",
                 str(tmp_path / "ds3"), "--columns", "nexp", "--quiet"]) == 2
    err = capsys.readouterr().err
    assert "integer column 'nexp' has 1 empty value(s) (first at row 1)" in err and err.count("\n") == 1


def test_parquet_bool_column_refused_and_ints_widened(tmp_path):
    import pyarrow as pa
    import pyarrow.parquet as pq

    from cosmicai.data.cutouts import convert_cutouts

    folder, part = _cutouts(tmp_path)
    cols = {"id": np.arange(1, 6), "magnitudes": pa.array(part.magnitudes.tolist(), pa.list_(pa.float32(), 5)),
            "flag": np.array([True, False] * 2 + [True]), "fiber": np.arange(5, dtype=np.int16)}
    pq.write_table(pa.table(cols), tmp_path / "cat.parquet")
    with pytest.raises(DataError, match=r"column 'flag' holds true/false values; only numeric columns can be carried"):
        convert_cutouts(str(folder), str(tmp_path / "cat.parquet"), str(tmp_path / "a"), columns=["flag"])
    convert_cutouts(str(folder), str(tmp_path / "cat.parquet"), str(tmp_path / "b"), columns=["fiber"])
    (got,) = [read_partition(r.url) for r in list_partitions(str(tmp_path / "b"))]
    assert got.columns["fiber"].dtype == np.int32 and got.columns["fiber"].tolist() == list(range(5))
    np.testing.assert_array_equal(got.magnitudes, part.magnitudes)


def test_verify_flags_a_partition_whose_columns_differ_from_the_manifest(tmp_path):
    from cosmicai.data.formats import PartitionEntry, sha256_hex, write_manifest
    from cosmicai.data.verify import verify_dataset

    a, b = encode_partition(_part({"ra": np.zeros(N)})), encode_partition(_part({}))
    (tmp_path / "a.safetensors").write_bytes(a)
    (tmp_path / "b.safetensors").write_bytes(b)
    write_manifest(str(tmp_path), Manifest([PartitionEntry("a.safetensors", N, len(a), sha256_hex(a), 0),
                                            PartitionEntry("b.safetensors", N, len(b), sha256_hex(b), N)],
                                           columns=["ra"]))
    report = verify_dataset(str(tmp_path))
    assert list(report.problems) == ["b.safetensors"]
    assert "carries catalogue columns [], the manifest says ['ra']" in report.problems["b.safetensors"]
