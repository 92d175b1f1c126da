"""Converters: FITS, HDF5, npz, a folder of npy files -> native, bit-exact; each bad input has its error."""

from __future__ import annotations

import h5py
import numpy as np
import pytest
from astropy.io import fits

from cosmicai.data.sources import open_source
from cosmicai.data.formats import Partition, read_manifest
from cosmicai.data.partition import list_partitions, read_partition
from cosmicai.data.split import split
from cosmicai.errors import DataError


def read_all(url: str) -> Partition:
    return Partition.concat([read_partition(r.url) for r in list_partitions(url)])


def check_converted(src: str, out: str, part: Partition, ids=None) -> None:
    report = split(src, out, partition_size=3 * 20_508)  # 3 rows per partition
    assert report.manifest.total_rows == len(part)
    assert [p.rows for p in read_manifest(out).partitions] == [3, 3, 1]
    got = read_all(out)
    assert np.array_equal(got.images, part.images)
    assert np.array_equal(got.magnitudes, part.magnitudes)
    assert np.array_equal(got.redshift, part.redshift)
    assert np.array_equal(got.object_id, part.object_id if ids is None else ids)


def write_fits(path, part: Partition, vector=True, ids=True, extname="CATALOG") -> None:
    cols = []
    if vector:
        cols.append(fits.Column(name="magnitudes", format="5E", array=part.magnitudes))
    else:
        cols += [fits.Column(name=b, format="E", array=part.magnitudes[:, i]) for i, b in enumerate("ugriz")]
    cols.append(fits.Column(name="redshift", format="E", array=part.redshift))
    if ids:
        cols.append(fits.Column(name="object_id", format="K", array=part.object_id))
    table = fits.BinTableHDU.from_columns(cols, name=extname)
    fits.HDUList([fits.PrimaryHDU(), fits.ImageHDU(part.images, name="IMAGES"), table]).writeto(path)


def test_fits_vector_and_band_columns(tmp_path, random_partition):
    part = random_partition(7, seed=1, first_id=500)
    write_fits(tmp_path / "a.fits", part)
    check_converted(str(tmp_path / "a.fits"), str(tmp_path / "out_a"), part)
    write_fits(tmp_path / "b.fits", part, vector=False, ids=False)
    check_converted(str(tmp_path / "b.fits"), str(tmp_path / "out_b"), part, ids=np.arange(7))


def test_hdf5(tmp_path, random_partition):
    part = random_partition(7, seed=2, first_id=10)
    with h5py.File(tmp_path / "d.h5", "w") as h5:
        for key in ("images", "magnitudes", "redshift", "object_id"):
            h5[key] = getattr(part, key)
    check_converted(str(tmp_path / "d.h5"), str(tmp_path / "out"), part)


def test_npz_and_npy_folder(tmp_path, random_partition):
    part = random_partition(7, seed=3, first_id=20)
    np.savez(tmp_path / "d.npz", images=part.images, magnitudes=part.magnitudes.astype(np.float64),
             redshift=part.redshift, object_id=part.object_id)
    check_converted(str(tmp_path / "d.npz"), str(tmp_path / "out1"), part)
    folder = tmp_path / "npy"
    folder.mkdir()
    for key in ("images", "magnitudes", "redshift"):
        np.save(folder / f"{key}.npy", getattr(part, key))
    assert open_source(str(folder)).kind == "npy-folder"
    check_converted(str(folder), str(tmp_path / "out2"), part, ids=np.arange(7))


def test_folder_of_mixed_files_in_numeric_order(tmp_path, random_partition):
    a, b = random_partition(4, seed=4, first_id=0), random_partition(3, seed=5, first_id=4)
    src = tmp_path / "src"
    src.mkdir()
    np.savez(src / "10.npz", images=b.images, magnitudes=b.magnitudes, redshift=b.redshift, object_id=b.object_id)
    with h5py.File(src / "2.h5", "w") as h5:
        for key in ("images", "magnitudes", "redshift", "object_id"):
            h5[key] = getattr(a, key)
    check_converted(str(src), str(tmp_path / "out"), Partition.concat([a, b]))


def test_bad_inputs_each_have_a_clear_error(tmp_path, random_partition):
    part = random_partition(3)
    out = str(tmp_path / "out")
    np.save(tmp_path / "images.npy", part.images)
    with pytest.raises(DataError, match=r"images\.npy: a single \.npy file holds one array"):
        split(str(tmp_path / "images.npy"), out)
    (tmp_path / "cat.csv").write_text("a,b\n1,2\n")
    with pytest.raises(DataError, match=r"cat\.csv: unsupported format '\.csv'"):
        split(str(tmp_path / "cat.csv"), out)
    (tmp_path / "empty.h5").write_bytes(b"")
    with pytest.raises(DataError, match=r"empty\.h5: empty file"):
        split(str(tmp_path / "empty.h5"), out)
    with pytest.raises(DataError, match=r"missing\.fits: source not found"):
        split(str(tmp_path / "missing.fits"), out)
    np.savez(tmp_path / "bands.npz", images=part.images[:, :4], magnitudes=part.magnitudes)
    with pytest.raises(DataError, match=r"bands\.npz: 'images' has shape \[3, 4, 32, 32\].*4 bands, expected 5"):
        split(str(tmp_path / "bands.npz"), out)
    np.savez(tmp_path / "ints.npz", images=(part.images * 100).astype(np.int16), magnitudes=part.magnitudes)
    with pytest.raises(DataError, match=r"ints\.npz: 'images' has dtype int16, expected floating point"):
        split(str(tmp_path / "ints.npz"), out)
    np.savez(tmp_path / "mags.npz", images=part.images, magnitudes=part.magnitudes[:, :3])
    with pytest.raises(DataError, match=r"mags\.npz: 'magnitudes' has shape \[3, 3\], expected \[3, 5\]"):
        split(str(tmp_path / "mags.npz"), out)
    np.savez(tmp_path / "nomag.npz", images=part.images)
    with pytest.raises(DataError, match=r"nomag\.npz: missing array\(s\) \['magnitudes'\]"):
        split(str(tmp_path / "nomag.npz"), out)
    np.savez(tmp_path / "len.npz", images=part.images, magnitudes=part.magnitudes, redshift=part.redshift[:2])
    with pytest.raises(DataError, match=r"len\.npz: arrays have different row counts: images 3, redshift 2"):
        split(str(tmp_path / "len.npz"), out)
    np.savez(tmp_path / "obj.npz", images=part.images, magnitudes=np.array([[object()] * 5] * 3, dtype=object))
    with pytest.raises(DataError, match=r"obj\.npz: .*pickle"):
        split(str(tmp_path / "obj.npz"), out)
    (tmp_path / "junk.h5").write_bytes(b"not an hdf5 file at all")
    with pytest.raises(DataError, match=r"junk\.h5: not a readable HDF5 file"):
        split(str(tmp_path / "junk.h5"), out)
    fits.HDUList([fits.PrimaryHDU(part.images[:, 0])]).writeto(tmp_path / "flat.fits")
    with pytest.raises(DataError, match=r"flat\.fits: no image HDU of shape \[N, 5, 32, 32\]"):
        split(str(tmp_path / "flat.fits"), out)
    notes = tmp_path / "notes"
    notes.mkdir()
    (notes / "readme.txt").write_text("hi")
    with pytest.raises(DataError, match=r"notes: no supported files in the folder \(found \.txt"):
        split(str(notes), out)
    assert read_manifest(out) is None
