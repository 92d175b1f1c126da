"""`cai data convert|split|synth --out` never replaces a dataset: refused in one line naming it, resumed when the
same source is written again with the same options, replaced (its own files only) with --replace. Locally and
on a real S3 server."""

from __future__ import annotations

import hashlib
import json
import os

import numpy as np
import pytest

from conftest import make_random_partition

from cosmicai import storage
from cosmicai.cli import main
from cosmicai.data.formats import read_manifest

ROWS = 100  # rows per partition below
SIZE = str(ROWS * 20_508)


def _npz(path, n: int, seed: int) -> str:
    part = make_random_partition(n, seed=seed)
    np.savez(path, images=part.images, magnitudes=part.magnitudes, redshift=part.redshift)
    return str(path)


def _convert(src: str, out: str, *extra: str) -> int:
    return main(["data", "convert", src, "--out", out, "--partition-size", SIZE, "--quiet", *extra])


def _snapshot(folder) -> dict[str, str]:
    return {name: hashlib.sha256((folder / name).read_bytes()).hexdigest() for name in sorted(os.listdir(folder))}


@pytest.fixture
def sources(tmp_path):
    return _npz(tmp_path / "big.npz", 300, 1), _npz(tmp_path / "small.npz", 20, 2)


def test_convert_onto_another_dataset_is_refused_and_leaves_it_byte_for_byte(tmp_path, sources, capsys):
    big, small = sources
    out = tmp_path / "set"
    assert _convert(big, str(out)) == 0
    before = _snapshot(out)
    assert {"manifest.json", "part-000003.safetensors"} <= set(before)
    capsys.readouterr()
    assert _convert(small, str(out)) == 2
    err = capsys.readouterr().err.strip()
    assert err.count("\n") == 0 and err.startswith(f"cai: error: --out {out} already holds a dataset")
    assert "manifest.json: 3 partition(s), 300 rows" in err and f"written from {big}" in err and "--replace" in err
    assert _snapshot(out) == before
    assert read_manifest(str(out)).total_rows == 300


def test_same_source_resumes_other_options_are_refused(tmp_path, sources, capsys):
    big, _ = sources
    out = tmp_path / "set"
    assert _convert(big, str(out)) == 0
    capsys.readouterr()
    assert _convert(big, str(out)) == 0  # the same source, the same options: a resume, nothing rewritten
    assert "0 written, 3 already present" in capsys.readouterr().out
    os.remove(out / "manifest.json")  # as after an interrupted write: partitions there, no manifest yet
    os.remove(out / "part-000003.safetensors")
    assert _convert(big, str(out)) == 0
    assert "1 written, 2 already present" in capsys.readouterr().out
    before = _snapshot(out)
    assert main(["data", "convert", big, "--out", str(out), "--partition-size", str(50 * 20_508), "--quiet"]) == 2
    err = capsys.readouterr().err
    assert "which has changed since or was written with other options" in err and "--replace" in err
    assert _snapshot(out) == before


def test_a_changed_source_is_not_a_resume(tmp_path, sources, capsys):
    big, _ = sources
    out = tmp_path / "set"
    assert _convert(big, str(out)) == 0
    before = _snapshot(out)
    _npz(tmp_path / "big.npz", 300, 7)  # same name, new content
    capsys.readouterr()
    assert _convert(big, str(out)) == 2
    assert "already holds a dataset" in capsys.readouterr().err
    assert _snapshot(out) == before


def test_replace_removes_only_the_datasets_own_files(tmp_path, sources, capsys):
    big, small = sources
    out = tmp_path / "set"
    assert _convert(big, str(out)) == 0
    (out / "notes.txt").write_text("mine")
    (out / "keep.safetensors").write_bytes(b"not listed in the manifest")
    assert _convert(small, str(out), "--replace") == 0
    left = sorted(os.listdir(out))
    assert left == [".cai-source.json", "keep.safetensors", "manifest.json", "notes.txt", "part-000001.safetensors"]
    assert (out / "notes.txt").read_text() == "mine"
    assert read_manifest(str(out)).total_rows == 20
    assert json.loads((out / ".cai-source.json").read_text())["source"] == os.path.realpath(small)


def test_partitions_without_a_manifest_are_refused_even_with_replace(tmp_path, sources, capsys):
    _, small = sources
    out = tmp_path / "theirs"
    out.mkdir()
    (out / "1.safetensors").write_bytes(b"someone else's")
    for extra in ((), ("--replace",)):
        assert _convert(small, str(out), *extra) == 2
        err = capsys.readouterr().err
        assert err.count("\n") == 1 and str(out) in err and "1 partition file(s)" in err
    assert sorted(os.listdir(out)) == ["1.safetensors"]


def test_split_and_synth_refuse_too(tmp_path, tiny_dataset, capsys):
    out = tmp_path / "set"
    assert main(["data", "split", tiny_dataset, "--out", str(out), "--partition-size", str(10 * 20_508),
                 "--quiet"]) == 0
    before = _snapshot(out)
    assert main(["data", "synth", "--galaxies", "3", "--out", str(out), "--quiet", "--workers", "1"]) == 2
    assert f"written from {os.path.realpath(tiny_dataset)}" in capsys.readouterr().err
    assert main(["data", "split", tiny_dataset, "--out", str(out), "--partition-size", str(10 * 20_508),
                 "--quiet"]) == 0
    assert _snapshot(out) == before
    # replacing a folder the source lies in would delete the source
    assert main(["data", "split", str(out / "part-000001.safetensors"), "--out", str(out), "--replace",
                 "--quiet"]) == 2
    assert "is inside it, so replacing it would delete the source" in capsys.readouterr().err
    assert _snapshot(out) == before


@pytest.mark.s3
def test_s3_convert_refuses_resumes_and_replaces(tmp_path, sources, s3_url, s3_server, capsys):
    big, small = sources
    out = storage.join(s3_url, "set")
    assert _convert(big, out) == 0
    client, bucket = s3_server.client(), s3_server.bucket
    prefix = out.split(f"s3://{bucket}/", 1)[1] + "/"

    def objects() -> dict[str, str]:
        listed = client.list_objects_v2(Bucket=bucket, Prefix=prefix).get("Contents", [])
        return {o["Key"]: hashlib.sha256(client.get_object(Bucket=bucket, Key=o["Key"])["Body"].read()).hexdigest()
                for o in listed}

    before = objects()
    assert len(before) == 5  # 3 partitions, the manifest, the source record
    capsys.readouterr()
    assert _convert(small, out) == 2
    assert "already holds a dataset (manifest.json: 3 partition(s), 300 rows" in capsys.readouterr().err
    assert objects() == before
    assert _convert(big, out) == 0 and objects() == before
    assert _convert(small, out, "--replace") == 0
    assert sorted(k.rsplit("/", 1)[1] for k in objects()) == [".cai-source.json", "manifest.json",
                                                               "part-000001.safetensors"]
    assert read_manifest(out).total_rows == 20


@pytest.mark.s3
def test_s3_out_with_bracketed_name_leaves_the_look_alike_dataset_alone(tmp_path, sources, s3_url, s3_server):
    """`--out s3://b/data/set[1]` next to `data/set1/`: set1 is another dataset, untouched byte for byte."""
    big, small = sources
    client, bucket = s3_server.client(), s3_server.bucket
    set1 = storage.join(s3_url, "data", "set1")
    assert _convert(big, set1) == 0
    prefix = set1.split(f"s3://{bucket}/", 1)[1] + "/"

    def set1_objects() -> dict[str, str]:
        listed = client.list_objects_v2(Bucket=bucket, Prefix=prefix).get("Contents", [])
        return {o["Key"]: hashlib.sha256(client.get_object(Bucket=bucket, Key=o["Key"])["Body"].read()).hexdigest()
                for o in listed}

    before = set1_objects()
    odd = storage.join(s3_url, "data", "set[1]")
    assert _convert(small, odd) == 0
    assert set1_objects() == before
    assert read_manifest(set1).total_rows == 300 and read_manifest(odd).total_rows == 20
    assert _convert(big, odd, "--replace") == 0  # replacing set[1] removes set[1]'s files only
    assert set1_objects() == before
    assert read_manifest(odd).total_rows == 300
