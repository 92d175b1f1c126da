"""Issue #15's input fixes, tried as a user would: real files, the `cai` CLI, the exact one-line reasons.

* ``~`` and ``$VAR`` are expanded in every local path (storage resolves them once for readers and writers);
* uint64 object ids >= 2**63 are refused by ``convert`` (the native object_id is int64), smaller ones kept;
* NUL, control characters and non-UTF-8 names are refused when the manifest is read or the listing made;
* ``verify`` rejects NaN/inf redshift (a negative one is "unknown", not an error) and duplicate object ids.
"""

from __future__ import annotations

import json
import os
import shutil

import h5py
import numpy as np
import pytest
from astropy.io import fits

from cosmicai import storage
from cosmicai.cli import main
from cosmicai.data.formats import Manifest, PartitionEntry, encode_partition, read_manifest, sha256_hex, write_manifest
from cosmicai.data.legacy import write_legacy_pt
from cosmicai.data.partition import list_partitions, read_partition
from cosmicai.data.verify import verify_dataset
from cosmicai.errors import DataError, StorageError


def _cli(argv, capsys) -> tuple[int, str, str]:
    rc = main(argv)
    out, err = capsys.readouterr()
    assert "Traceback" not in err
    return rc, out, err


def _one_line_error(err: str) -> str:
    lines = [line for line in err.splitlines() if line.startswith("cai: error:")]
    assert len(lines) == 1, err
    return lines[0]


def _save_npz(path, part, object_id=None) -> None:
    np.savez(path, images=part.images, magnitudes=part.magnitudes, redshift=part.redshift,
             object_id=part.object_id if object_id is None else object_id)


def _write_native(folder, parts, manifest=True) -> str:
    """A native dataset written partition by partition (bypassing convert's own checks, as a foreign or older
    writer might): returns its path."""
    os.makedirs(folder, exist_ok=True)
    entries, first = [], 0
    for i, part in enumerate(parts, start=1):
        data = encode_partition(part)
        name = f"part-{i:06d}.safetensors"
        with open(os.path.join(folder, name), "wb") as fh:
            fh.write(data)
        entries.append(PartitionEntry(name, len(part), len(data), sha256_hex(data), first))
        first += len(part)
    if manifest:
        write_manifest(str(folder), Manifest(partitions=entries))
    return str(folder)


# --- 1. ~ and $VAR in local paths ----------------------------------------------------------------------------------

@pytest.fixture
def home(tmp_path, monkeypatch):
    """A fake $HOME, a $CAI_TEST_DATA inside it, and a working directory elsewhere (where a literal ./~ would land)."""
    home = tmp_path / "home"
    home.mkdir()
    cwd = tmp_path / "cwd"
    cwd.mkdir()
    monkeypatch.setenv("HOME", str(home))
    monkeypatch.setenv("CAI_TEST_DATA", str(home / "data"))
    monkeypatch.chdir(cwd)
    yield home
    assert not (cwd / "~").exists(), "a literal ./~ folder was written"
    assert not (cwd / "$CAI_TEST_DATA").exists(), "a literal ./$CAI_TEST_DATA folder was written"


def test_storage_expands_tilde_and_env_vars_for_writers_and_readers(home):
    storage.write_bytes("~/a/x.bin", b"tilde")
    assert (home / "a" / "x.bin").read_bytes() == b"tilde"
    assert storage.read_bytes("~/a/x.bin") == b"tilde"
    assert storage.read_bytes("file://~/a/x.bin") == b"tilde"
    assert storage.size("~/a/x.bin") == 5 and storage.exists("~/a")
    assert storage.list_files("~/a") == [str(home / "a" / "x.bin")]

    storage.write_json("$CAI_TEST_DATA/y.json", {"v": 1})
    storage.write_json("file://${CAI_TEST_DATA}/z.json", {"v": 2})
    assert json.loads((home / "data" / "y.json").read_text()) == {"v": 1}
    assert json.loads((home / "data" / "z.json").read_text()) == {"v": 2}
    assert storage.read_json("~/data/y.json") == {"v": 1}
    assert storage.read_json("$CAI_TEST_DATA/z.json") == {"v": 2}
    assert storage.local_path("$CAI_TEST_DATA/z.json") == str(home / "data" / "z.json")
    storage.remove("$CAI_TEST_DATA", recursive=True)
    assert not (home / "data").exists()

    # Object keys are left alone: '~' and '$' are ordinary characters there.
    assert storage.expand("s3://bucket/~/$HOME/k") == "s3://bucket/~/$HOME/k"
    assert storage.local_path("s3://bucket/~/k") is None
    # An unset variable stays as written.
    assert storage.expand("/x/$CAI_SURELY_UNSET_VAR/y") == "/x/$CAI_SURELY_UNSET_VAR/y"


def test_storage_refuses_a_nul_byte_in_a_path(tmp_path):
    with pytest.raises(StorageError, match=r"'.*a\\x00b': a path cannot contain a NUL byte"):
        storage.read_bytes(str(tmp_path / "a\x00b"))


def test_cli_convert_verify_info_with_tilde_and_env_var_paths(home, random_partition, capsys):
    part = random_partition(5, seed=1, first_id=100)
    _save_npz(home / "src.npz", part)
    rc, out, err = _cli(["data", "convert", "~/src.npz", "--out", "~/out", "--quiet"], capsys)
    assert rc == 0, err
    assert "wrote ~/out: 1 partition(s), 5 rows" in out
    assert read_manifest(str(home / "out")).total_rows == 5
    rc, out, err = _cli(["data", "verify", "$HOME/out", "--quiet"], capsys)
    assert rc == 0, err
    assert "ok: 1 partition(s), 5 rows" in out
    rc, out, err = _cli(["data", "split", "~/out", "--out", "$CAI_TEST_DATA/resplit", "--quiet",
                         "--partition-size", str(2 * 20_508)], capsys)
    assert rc == 0, err
    assert [p.rows for p in read_manifest(str(home / "data" / "resplit")).partitions] == [2, 2, 1]
    # The same folder under two spellings is still "the same place".
    rc, out, err = _cli(["data", "split", "~/out", "--out", str(home / "out"), "--quiet"], capsys)
    assert rc == 2 and "the output must differ from the source" in _one_line_error(err)


# --- 2. uint64 object ids ------------------------------------------------------------------------------------------

BIG = 2**64 - 1


def test_convert_refuses_uint64_ids_that_do_not_fit_int64_npz(tmp_path, random_partition, capsys):
    part = random_partition(4, seed=2)
    ids = np.array([1, 2**63 - 1, BIG, 2**63], dtype=np.uint64)
    src = tmp_path / "ids.npz"
    _save_npz(src, part, ids)
    rc, _, err = _cli(["data", "convert", str(src), "--out", str(tmp_path / "out"), "--quiet"], capsys)
    assert rc == 2
    assert _one_line_error(err) == (
        f"cai: error: object_id 18446744073709551615 in {src} (row 2, the first such) does not fit int64, the native "
        f"object_id type (at most 9223372036854775807); map the ids below 2**63 before converting")
    assert not (tmp_path / "out" / "manifest.json").exists()


def test_convert_refuses_uint64_ids_that_do_not_fit_int64_fits_and_hdf5(tmp_path, random_partition, capsys):
    part = random_partition(3, seed=3)
    ids = np.array([7, 2**63, 8], dtype=np.uint64)
    table = fits.BinTableHDU.from_columns(
        [fits.Column(name="magnitudes", format="5E", array=part.magnitudes),
         fits.Column(name="redshift", format="E", array=part.redshift),
         fits.Column(name="object_id", format="K", bzero=2**63, array=ids)], name="CATALOG")
    src = tmp_path / "cat.fits"
    fits.HDUList([fits.PrimaryHDU(), fits.ImageHDU(part.images, name="IMAGES"), table]).writeto(src)
    with fits.open(src) as hdul:  # the file really holds unsigned 64-bit ids
        assert hdul["CATALOG"].data["object_id"].dtype == np.uint64
    rc, _, err = _cli(["data", "convert", str(src), "--out", str(tmp_path / "o1"), "--quiet"], capsys)
    assert rc == 2
    assert f"cai: error: object_id 9223372036854775808 in {src} (row 1, the first such) does not fit int64" \
        in _one_line_error(err)

    h5 = tmp_path / "cat.h5"
    with h5py.File(h5, "w") as fh:
        fh["images"], fh["magnitudes"], fh["object_id"] = part.images, part.magnitudes, ids
    rc, _, err = _cli(["data", "convert", str(h5), "--out", str(tmp_path / "o2"), "--quiet"], capsys)
    assert rc == 2
    assert f"object_id 9223372036854775808 in {h5} (row 1, the first such) does not fit int64" in err


def test_convert_keeps_uint64_ids_below_2_63_exactly(tmp_path, random_partition, capsys):
    part = random_partition(4, seed=4)
    ids = np.array([0, 12345678901234567, 2**63 - 2, 2**63 - 1], dtype=np.uint64)
    _save_npz(tmp_path / "ok.npz", part, ids)
    rc, _, err = _cli(["data", "convert", str(tmp_path / "ok.npz"), "--out", str(tmp_path / "out"), "--quiet"],
                      capsys)
    assert rc == 0, err
    got = read_partition(str(tmp_path / "out" / "part-000001.safetensors"))
    assert got.object_id.dtype == np.int64
    assert [int(v) for v in got.object_id] == [int(v) for v in ids]


# --- 3. NUL, control characters and non-UTF-8 names ---------------------------------------------------------------

def _dataset_with_name(tiny_dataset, tmp_path, bad_name: str) -> str:
    """A copy of tiny_dataset whose manifest names its first partition ``bad_name`` (JSON escapes it)."""
    dst = tmp_path / "data"
    shutil.copytree(tiny_dataset, dst)
    raw = json.loads((dst / "manifest.json").read_text())
    raw["partitions"][0]["name"] = bad_name
    (dst / "manifest.json").write_text(json.dumps(raw))
    return str(dst)


@pytest.mark.parametrize("bad_name, reason", [
    ("part-000001\x00.safetensors", "contains a NUL byte; partition names must be printable"),
    ("part-000001\n.safetensors", "contains control character '\\n'; partition names must be printable"),
    ("part-\udcff.safetensors", "is not valid UTF-8 (byte b'\\xff'); rename it to a UTF-8 name"),
], ids=["nul", "newline", "non-utf8"])
def test_verify_and_run_refuse_a_bad_manifest_name_naming_it(bad_name, reason, tiny_dataset, tmp_path, capsys):
    data = _dataset_with_name(tiny_dataset, tmp_path, bad_name)
    expected = f"cai: error: {data}/manifest.json: partitions[0] name {bad_name!r} {reason}"
    rc, _, err = _cli(["data", "verify", data, "--quiet"], capsys)
    assert rc == 2
    assert _one_line_error(err) == expected
    rc, _, err = _cli(["data", "info", data], capsys)
    assert rc == 2 and _one_line_error(err) == expected
    rc, _, err = _cli(["run", "--data", data, "--result", str(tmp_path / "r"), "--workers", "1", "--threads", "1",
                       "--quiet"], capsys)
    assert rc == 2
    assert expected in _one_line_error(err)
    assert "embedded null byte" not in err


def test_a_non_utf8_file_name_in_a_listing_is_refused_before_anything_runs(tiny_dataset, tmp_path, capsys):
    folder = tmp_path / "listing"
    folder.mkdir()
    shutil.copy(os.path.join(tiny_dataset, "part-000001.safetensors"), folder / "part-000001.safetensors")
    bad = os.fsencode(str(folder)) + b"/part-\xff.safetensors"
    shutil.copy(os.path.join(tiny_dataset, "part-000002.safetensors"), bad)
    expected = (f"cai: error: {folder}: file 'part-\\udcff.safetensors' in the listing is not valid UTF-8 "
                f"(byte b'\\xff'); rename it to a UTF-8 name")
    with pytest.raises(DataError, match="is not valid UTF-8"):
        list_partitions(str(folder))
    rc, _, err = _cli(["data", "verify", str(folder), "--quiet"], capsys)
    assert rc == 2 and _one_line_error(err) == expected
    rc, _, err = _cli(["run", "--data", str(folder), "--result", str(tmp_path / "r"), "--workers", "1",
                       "--threads", "1", "--quiet"], capsys)
    assert rc == 2 and expected in _one_line_error(err)
    assert not (tmp_path / "r" / "predictions").exists()
    rc, _, err = _cli(["data", "convert", str(folder), "--out", str(tmp_path / "o"), "--quiet"], capsys)
    assert rc == 2 and _one_line_error(err) == expected


# --- 4. verify checks what it says it checks ----------------------------------------------------------------------

def test_verify_rejects_nan_and_inf_redshift_but_not_negative(tmp_path, random_partition, capsys):
    good = random_partition(6, seed=5, first_id=0)
    bad = random_partition(6, seed=6, first_id=6)
    z = np.array(bad.redshift)
    z[[1, 4]] = [np.nan, np.inf]
    bad.redshift = z
    data = _write_native(tmp_path / "nan", [good, bad])
    rc, _, err = _cli(["data", "verify", data, "--quiet"], capsys)
    assert rc == 1
    assert ("BAD part-000002.safetensors: 2 row(s) have NaN or inf in redshift (first rows: [1, 4]); convert "
            "rejects such rows (--drop-nonfinite drops them)") in err.splitlines()
    assert "1 of 2 partition(s) bad: part-000002.safetensors" in err
    # convert says the same about the same rows
    rc, _, err = _cli(["data", "convert", data, "--out", str(tmp_path / "o"), "--quiet"], capsys)
    assert rc == 2 and "2 row(s) have NaN or inf in images, magnitudes or redshift (rows [1, 4]" in err

    unknown = random_partition(6, seed=7, first_id=12)
    z = np.array(unknown.redshift)
    z[[0, 3]] = -1.0  # the usual "unknown" marker
    unknown.redshift = z
    data = _write_native(tmp_path / "neg", [good, unknown])
    rc, out, err = _cli(["data", "verify", data, "--quiet"], capsys)
    assert rc == 0, err
    assert "ok: 2 partition(s), 12 rows" in out


def test_verify_reports_duplicate_object_ids_across_the_dataset(tmp_path, random_partition, capsys):
    a = random_partition(5, seed=8, first_id=0)    # ids 0..4
    b = random_partition(5, seed=9, first_id=3)    # ids 3..7: 3 and 4 again
    c = random_partition(5, seed=10, first_id=10)  # ids 10..14
    c.object_id = np.array([10, 11, 12, 11, 0], dtype=np.int64)  # 11 twice in itself, 0 from part 1
    data = _write_native(tmp_path / "dups", [a, b, c])
    rc, _, err = _cli(["data", "verify", data, "--quiet"], capsys)
    assert rc == 1
    total = "4 object id(s) appear more than once in the dataset (4 repeated row(s))"
    lines = err.splitlines()
    assert (f"BAD part-000002.safetensors: 2 row(s) repeat an object id seen earlier (first: object_id 3 at row 0, "
            f"already at part-000001.safetensors row 3); {total}") in lines
    assert (f"BAD part-000003.safetensors: 2 row(s) repeat an object id seen earlier (first: object_id 11 at row 3, "
            f"already at part-000003.safetensors row 1); {total}") in lines
    assert "2 of 3 partition(s) bad: part-000002.safetensors, part-000003.safetensors" in err

    report = verify_dataset(data)
    assert not report.ok
    assert (report.duplicate_ids, report.duplicate_rows) == (4, 4)
    assert report.duplicate_examples[0] == {"object_id": 3, "first": ["part-000001.safetensors", 3],
                                            "again": ["part-000002.safetensors", 0]}

    # Without a manifest (a plain listing) the same check runs.
    os.remove(os.path.join(data, "manifest.json"))
    assert verify_dataset(data).duplicate_ids == 4


def test_verify_unique_ids_and_legacy_row_index_ids_pass(tiny_dataset, tmp_path, random_partition, capsys):
    rc, out, err = _cli(["data", "verify", tiny_dataset, "--quiet"], capsys)
    assert rc == 0, err
    assert verify_dataset(tiny_dataset).duplicate_ids == 0
    # Original .pt partitions carry no ids (each is 0..N-1): not duplicates.
    legacy = tmp_path / "legacy"
    legacy.mkdir()
    for i in (1, 2):
        (legacy / f"{i}.pt").write_bytes(write_legacy_pt(random_partition(4, seed=i)))
    rc, out, err = _cli(["data", "verify", str(legacy), "--quiet"], capsys)
    assert rc == 0, err
    assert "ok: 2 partition(s), 8 rows" in out


def test_verify_counts_but_allows_repeats_in_a_resampled_dataset(tiny_dataset, tmp_path, capsys):
    from cosmicai.data.resample import resample

    out = str(tmp_path / "resampled")
    resample(tiny_dataset, out, 2**20, 2**18, "cycle")  # 48 source rows cycled: ids repeat by design
    rc, out_text, err = _cli(["data", "verify", out, "--quiet"], capsys)
    assert rc == 0, err
    report = verify_dataset(out)
    repeats = report.rows - 48  # fewer than 48 rows beyond the source's: each repeats a distinct id once
    assert report.ok and 0 < repeats < 48
    assert (report.duplicate_ids, report.duplicate_rows) == (repeats, repeats)
    os.remove(os.path.join(out, "resample.json"))  # the same rows, no longer marked as resampled: a finding
    rc, _, err = _cli(["data", "verify", out, "--quiet"], capsys)
    assert rc == 1 and f"{repeats} object id(s) appear more than once in the dataset ({repeats} repeated row(s))" in err
