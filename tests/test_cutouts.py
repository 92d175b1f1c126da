"""`cai data convert FOLDER --catalog CAT`: per-galaxy cutouts joined to a catalogue; units warnings; the
convert command named when `cai run` meets convertible input."""

from __future__ import annotations

import csv
import os

import numpy as np
import pytest

from cosmicai.cli import main
from cosmicai.data.cutouts import convert_cutouts
from cosmicai.data.formats import read_manifest
from cosmicai.data.partition import list_partitions, read_partition
from cosmicai.errors import ConfigError, DataError

N = 12


@pytest.fixture(scope="module")
def galaxies(tmp_path_factory):
    from cosmicai.data.synth import synthesize

    return synthesize(N, seed=5, workers=1)


def _write_csv(path, header, rows):
    with open(path, "w", newline="") as fh:
        w = csv.writer(fh)
        w.writerow(header)
        w.writerows(rows)


def _npy_folder(tmp_path, galaxies, ids, name="cutouts"):
    folder = tmp_path / name
    folder.mkdir()
    for k, oid in enumerate(ids):
        np.save(folder / f"{oid}.npy", galaxies.images[k])
    return folder


def _catalog_rows(galaxies, ids, order):
    return [[ids[k], *galaxies.magnitudes[k].tolist(), float(galaxies.redshift[k])] for k in order]


def _read_all(out):
    parts = [read_partition(r.url) for r in list_partitions(str(out))]
    return parts


def test_npy_cutouts_and_csv_join_by_id_in_catalogue_order(tmp_path, galaxies, capsys):
    ids = [7000 + 3 * k for k in range(N)]
    folder = _npy_folder(tmp_path, galaxies, ids)
    order = list(np.random.default_rng(0).permutation(N))
    _write_csv(tmp_path / "cat.csv", ["objid", "u", "g", "r", "i", "z", "redshift"], _catalog_rows(galaxies, ids, order))
    out = tmp_path / "ds"
    assert main(["data", "convert", str(folder), "--catalog", str(tmp_path / "cat.csv"), "--out", str(out),
                 "--partition-size", str(5 * 20_508), "--quiet"]) == 0
    assert f"3 partition(s), {N} rows" in capsys.readouterr().out
    parts = _read_all(out)
    assert [len(p) for p in parts] == [5, 5, 2]
    got_ids = np.concatenate([p.object_id for p in parts])
    assert got_ids.tolist() == [ids[k] for k in order]
    images = np.concatenate([p.images for p in parts])
    np.testing.assert_array_equal(images, galaxies.images[order])
    np.testing.assert_array_equal(np.concatenate([p.magnitudes for p in parts]), galaxies.magnitudes[order])
    np.testing.assert_array_equal(np.concatenate([p.redshift for p in parts]), galaxies.redshift[order])
    assert read_manifest(str(out)).columns == []
    assert capsys.readouterr().err == ""  # nanomaggies and AB magnitudes: no units warning


def test_fits_cutouts_fits_table_file_column_and_vector_magnitudes(tmp_path, galaxies):
    from astropy.io import fits

    folder = tmp_path / "fits"
    folder.mkdir()
    names = [f"gal_{chr(97 + k)}.fits" for k in range(N)]
    for k, name in enumerate(names):
        fits.PrimaryHDU(galaxies.images[k]).writeto(folder / name)
    (folder / "README.txt").write_text("not a cutout")  # other files are ignored
    cols = [fits.Column(name="FILE", format="20A", array=np.array(names)),
            fits.Column(name="magnitudes", format="5E", array=galaxies.magnitudes),
            fits.Column(name="RA", format="D", array=np.linspace(150, 151, N))]
    fits.BinTableHDU.from_columns(cols).writeto(tmp_path / "cat.fits")
    report = convert_cutouts(str(folder), str(tmp_path / "cat.fits"), str(tmp_path / "ds"), columns=["RA"])
    assert report.manifest.total_rows == N and report.manifest.has_redshift is False
    (part,) = _read_all(tmp_path / "ds")
    assert part.object_id.tolist() == list(range(N))  # no id column: catalogue row numbers
    np.testing.assert_array_equal(part.images, galaxies.images)
    np.testing.assert_array_equal(part.columns["RA"], np.linspace(150, 151, N))
    assert part.redshift is None


def test_parquet_catalogue_prefixed_bands_and_zero_padded_names(tmp_path, galaxies):
    import pyarrow as pa
    import pyarrow.parquet as pq

    folder = tmp_path / "c"
    folder.mkdir()
    for k in range(N):
        np.save(folder / f"{k:06d}.npy", galaxies.images[k].astype(np.float64))
    table = {"object_id": np.arange(N, dtype=np.int64), "redshift": galaxies.redshift}
    table.update({f"mag_{b}": galaxies.magnitudes[:, i] for i, b in enumerate("ugriz")})
    pq.write_table(pa.table(table), tmp_path / "cat.parquet")
    convert_cutouts(str(folder), str(tmp_path / "cat.parquet"), str(tmp_path / "ds"))
    (part,) = _read_all(tmp_path / "ds")
    np.testing.assert_array_equal(part.images, galaxies.images)
    assert part.object_id.tolist() == list(range(N))


def _small(tmp_path, galaxies, ids, rows_ids=None, header=None):
    folder = _npy_folder(tmp_path, galaxies, ids)
    rows_ids = ids if rows_ids is None else rows_ids
    rows = [[oid, *galaxies.magnitudes[k % N].tolist()] for k, oid in enumerate(rows_ids)]
    _write_csv(tmp_path / "cat.csv", header or ["id", "u", "g", "r", "i", "z"], rows)
    return str(folder), str(tmp_path / "cat.csv"), str(tmp_path / "ds")


def test_missing_cutouts_are_counted_and_named(tmp_path, galaxies):
    folder, cat, out = _small(tmp_path, galaxies, list(range(6)), rows_ids=list(range(10)))
    with pytest.raises(DataError, match=r"cat\.csv: 4 catalogue row\(s\) have no cutout in .*: 6, 7, 8, 9$"):
        convert_cutouts(folder, cat, out)
    assert not os.path.exists(out)


def test_cutouts_without_a_row_are_refused(tmp_path, galaxies):
    folder, cat, out = _small(tmp_path, galaxies, list(range(9)), rows_ids=[0, 1])
    with pytest.raises(DataError, match=r"7 cutout\(s\) have no row in the catalogue .*: 2\.npy, 3\.npy, 4\.npy, "
                                        r"5\.npy, 6\.npy \.\.\. \(7 in all\); add their rows"):
        convert_cutouts(folder, cat, out)


def test_duplicate_ids_and_unparsable_names(tmp_path, galaxies):
    folder, cat, out = _small(tmp_path, galaxies, [1, 2, 3], rows_ids=[1, 2, 2, 3])
    with pytest.raises(DataError, match=r"1 id\(s\) appear more than once in column 'id': 2$"):
        convert_cutouts(folder, cat, out)
    np.save(os.path.join(folder, "extra_galaxy.npy"), galaxies.images[0])
    _write_csv(cat, ["id", "u", "g", "r", "i", "z"], [[i, *galaxies.magnitudes[0].tolist()] for i in (1, 2, 3)])
    with pytest.raises(DataError, match=r"1 cutout name\(s\) are not '<id>\.npy'.*extra_galaxy\.npy.*'file' column"):
        convert_cutouts(folder, cat, out)


def test_bad_cutout_shape_and_string_column(tmp_path, galaxies):
    folder, cat, out = _small(tmp_path, galaxies, [1, 2], header=["id", "u", "g", "r", "i", "z"])
    np.save(os.path.join(folder, "2.npy"), np.moveaxis(galaxies.images[1], 0, -1))
    with pytest.raises(DataError, match=r"2\.npy: cutout has shape \[32, 32, 5\].*transpose it to \[5, 32, 32\]"):
        convert_cutouts(folder, cat, out)
    np.save(os.path.join(folder, "2.npy"), galaxies.images[1])
    _write_csv(cat, ["id", "u", "g", "r", "i", "z", "name"],
               [[i, *galaxies.magnitudes[0].tolist(), f"NGC {i}"] for i in (1, 2)])
    with pytest.raises(DataError, match=r"column 'name' holds text; only numeric columns can be carried"):
        convert_cutouts(folder, cat, out, columns=["name"])
    with pytest.raises(DataError, match=r"no column 'ra' \(--columns\)"):
        convert_cutouts(folder, cat, out, columns=["ra"])


def test_cli_errors_are_one_line(tmp_path, galaxies, capsys):
    folder, cat, out = _small(tmp_path, galaxies, [1, 2])
    assert main(["data", "convert", folder, "--columns", "ra", "--out", out]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "--columns and --id-column go with --catalog" in err
    assert main(["data", "convert", folder, "--out", out]) == 2  # cutouts without their catalogue
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and f"cai data convert {folder} --catalog CATALOG --out DATASET" in err
    assert main(["data", "convert", folder, "--catalog", str(tmp_path / "nope.csv"), "--out", out]) == 2
    assert "nope.csv: no such file" in capsys.readouterr().err


def test_units_warnings_once_naming_the_file(tmp_path, galaxies, capsys):
    ids = list(range(6))
    folder = tmp_path / "counts"
    folder.mkdir()
    for k in ids:  # raw counts: whole numbers in the thousands, sky not subtracted
        np.save(folder / f"{k}.npy", np.round(galaxies.images[k] * 300 + 1200).astype(np.int32))
    flux = 10 ** (-0.4 * (galaxies.magnitudes[:6] - 22.5))  # nanomaggies in place of magnitudes
    _write_csv(tmp_path / "cat.csv", ["id", "u", "g", "r", "i", "z"], [[k, *flux[k].tolist()] for k in ids])
    convert_cutouts(str(folder), str(tmp_path / "cat.csv"), str(tmp_path / "ds"), partition_size=str(2 * 20_508))
    err = capsys.readouterr().err.splitlines()
    assert len(err) == 3, err
    assert any(line.startswith(f"cai: warning: {folder / '0.npy'}: pixel values look like raw counts") for line in err)
    assert any(f"{folder / '0.npy'}: every pixel is above" in line and "sky (or a bias) not subtracted" in line
               for line in err)
    assert any(f"{tmp_path / 'cat.csv'}: magnitudes look like fluxes such as nanomaggies" in line for line in err)
    # a bulk file whose magnitudes are all in 0..1 (maggies): one warning naming it
    np.savez(tmp_path / "m.npz", images=galaxies.images[:4], magnitudes=flux[:4] / 1e9)
    assert main(["data", "convert", str(tmp_path / "m.npz"), "--out", str(tmp_path / "ds2"), "--quiet"]) == 0
    err = capsys.readouterr().err.splitlines()
    assert len(err) == 1 and "m.npz: magnitudes look like fluxes in maggies (every value between 0 and 1)" in err[0]


def test_run_on_convertible_input_names_the_convert_command(tmp_path, galaxies, capsys):
    from cosmicai.data.partition import list_partitions

    np.savez(tmp_path / "d.npz", images=galaxies.images[:2], magnitudes=galaxies.magnitudes[:2])
    (tmp_path / "d.h5").write_bytes(b"\x89HDF\r\n\x1a\n")
    npy = tmp_path / "arrays"
    npy.mkdir()
    np.save(npy / "images.npy", galaxies.images[:2])
    cut = _npy_folder(tmp_path, galaxies, [1, 2])
    fitsdir = tmp_path / "fitsdir"
    fitsdir.mkdir()
    (fitsdir / "a.fits").write_bytes(b"SIMPLE")
    expect = {str(tmp_path / "d.npz"): f"a .npz file, not a dataset; convert it first: cai data convert "
                                       f"{tmp_path / 'd.npz'} --out DATASET, then run on DATASET",
              str(tmp_path / "d.h5"): "a .h5 file, not a dataset; convert it first",
              str(npy): f"a folder of .npy arrays, not a dataset; convert it first: cai data convert {npy} --out",
              str(cut): f"look like per-galaxy cutouts, not a dataset; convert them with their catalogue first: "
                        f"cai data convert {cut} --catalog CATALOG --out DATASET",
              str(fitsdir): "1 FITS file(s), not a dataset"}
    for url, text in expect.items():
        with pytest.raises(DataError, match=None) as info:
            list_partitions(url)
        assert text in str(info.value) and "\n" not in str(info.value)
    out = tmp_path / "res"
    assert main(["run", "--data", str(cut), "--result", str(out), "--quiet"]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "--catalog CATALOG --out DATASET" in err
    # the same folder or file given where the run config goes
    for given in (str(cut), str(tmp_path / "d.npz")):
        assert main(["run", given, "--result", str(out), "--quiet"]) == 2
        err = capsys.readouterr().err
        assert err.count("\n") == 1 and "cai data convert" in err and "give data with --data" in err, err
    assert not out.exists()
    with pytest.raises(DataError, match="empty dataset"):
        (tmp_path / "empty").mkdir()
        list_partitions(str(tmp_path / "empty"))


def test_replace_and_same_folder_are_checked(tmp_path, galaxies):
    folder, cat, _ = _small(tmp_path, galaxies, [1, 2])
    with pytest.raises(ConfigError, match="must differ from the cutouts folder"):
        convert_cutouts(folder, cat, folder)
