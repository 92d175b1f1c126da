"""Synthetic SDSS-like galaxies (cosmicai.data.synth): determinism, shapes, and physical sanity."""

from __future__ import annotations

import numpy as np
import pytest

from cosmicai.data import synth
from cosmicai.data.formats import Partition, decode_partition, encode_partition
from cosmicai.errors import ConfigError

SEED = 11
N = 150


@pytest.fixture(scope="module")
def galaxies() -> Partition:
    return synth.synthesize(N, seed=SEED, workers=1)


def _same(a: Partition, b: Partition) -> bool:
    return all(np.array_equal(getattr(a, k), getattr(b, k)) for k in ("images", "magnitudes", "redshift", "object_id"))


def _half_light_radius(image: np.ndarray) -> float:
    """Radius (arcsec) around the flux-weighted centroid that holds half of the stamp's flux."""
    yy, xx = np.mgrid[:image.shape[0], :image.shape[1]]
    w = np.clip(image, 0.0, None)
    cx, cy = (w * xx).sum() / w.sum(), (w * yy).sum() / w.sum()
    rad = np.hypot(xx - cx, yy - cy).ravel()
    order = np.argsort(rad)
    cum = np.cumsum(image.ravel()[order].astype(np.float64))
    return float(rad[order][np.searchsorted(cum, 0.5 * cum[-1])] * synth.PIXEL_SCALE)


def test_shapes_dtypes_ids_and_roundtrip(galaxies):
    assert galaxies.images.shape == (N, 5, 32, 32) and galaxies.images.dtype == np.float32
    assert galaxies.magnitudes.shape == (N, 5) and galaxies.magnitudes.dtype == np.float32
    assert galaxies.redshift.shape == (N,) and galaxies.redshift.dtype == np.float32
    np.testing.assert_array_equal(galaxies.object_id, np.arange(N, dtype=np.int64))
    assert np.isfinite(galaxies.images).all() and np.isfinite(galaxies.magnitudes).all()
    assert _same(decode_partition(encode_partition(galaxies)), galaxies)
    # Every galaxy stands out of the noise: the central 4x4 r-band pixels sum to more than 8 sigma.
    assert (galaxies.images[:, 2, 14:18, 14:18].mean(axis=(1, 2)) > 2 * synth.SKY_SIGMA[2]).all()


def test_noise_is_zero_mean_sky_plus_shot_noise(galaxies):
    """image - noiseless model, in units of the stated per-pixel sigma, is a unit Gaussian in each band."""
    pulls = []
    for i in range(6):
        params = synth.galaxy_params(SEED, i)
        model = synth.draw_model(params)
        variance = params["sky_sigma"][:, None, None] ** 2 + np.clip(model, 0, None) / synth.E_PER_NMGY[:, None, None]
        sigma = np.sqrt(variance)
        pulls.append((galaxies.images[i] - model) / sigma)
    pulls = np.stack(pulls, axis=1).reshape(5, -1)
    assert np.abs(pulls.mean(axis=1)).max() < 0.05
    assert np.abs(pulls.std(axis=1) - 1).max() < 0.05
    assert synth.SKY_SIGMA[0] > synth.SKY_SIGMA[2] and synth.SKY_SIGMA[4] == synth.SKY_SIGMA.max()


def test_deterministic_for_seed_and_worker_count(galaxies):
    assert _same(synth.synthesize(12, seed=SEED, workers=1), galaxies.take(slice(0, 12)))
    assert _same(synth.synthesize(12, seed=SEED, workers=2), galaxies.take(slice(0, 12)))
    other = synth.synthesize(3, seed=SEED + 1, workers=1)
    assert not np.array_equal(other.images, galaxies.images[:3])
    assert not np.array_equal(other.redshift, galaxies.redshift[:3])


def test_first_id_and_chunks_give_the_same_galaxies(galaxies):
    tail = synth.synthesize(5, seed=SEED, workers=1, first_id=N - 5)
    np.testing.assert_array_equal(tail.object_id, np.arange(N - 5, N))
    assert _same(tail, galaxies.take(slice(N - 5, N)))
    parts = list(synth.iter_synthesize(10, seed=SEED, chunk=4, workers=1))
    assert [len(p) for p in parts] == [4, 4, 2]
    assert _same(Partition.concat(parts), galaxies.take(slice(0, 10)))


def test_redshift_distribution_like_sdss_main_sample():
    z = np.array([synth.galaxy_params(SEED, i)["redshift"] for i in range(3000)])
    assert z.min() >= synth.Z_MIN and z.max() <= synth.Z_MAX
    assert 0.09 < np.median(z) < 0.13
    counts, edges = np.histogram(z, bins=np.arange(0.0, 0.425, 0.025))
    assert 0.075 <= edges[np.argmax(counts)] <= 0.1  # peak near z = 0.1
    assert (z > 0.3).mean() < 0.02


def test_total_magnitudes_respect_the_main_sample_limits():
    params = [synth.galaxy_params(SEED, i) for i in range(1000)]
    r = np.array([p["total_magnitudes"][2] for p in params])
    assert r.min() >= synth.R_BRIGHT - 1e-6 and r.max() <= synth.R_FAINT + 1e-6
    red = np.array([p["type"] == "red" for p in params])
    assert 0.35 < red.mean() < 0.45
    n = np.array([p["sersic_n"] for p in params])
    assert np.median(n[red]) > 2.5 > np.median(n[~red])


def test_colours_redden_and_sizes_shrink_with_redshift(galaxies):
    z, m = galaxies.redshift, galaxies.magnitudes
    low, high = z < 0.07, z > 0.13
    assert low.sum() >= 15 and high.sum() >= 15
    g_r = m[:, 1] - m[:, 2]
    assert g_r[high].mean() - g_r[low].mean() > 0.15
    hlr = np.array([_half_light_radius(img) for img in galaxies.images[:, 2]])
    assert np.median(hlr[low]) > 1.15 * np.median(hlr[high])


def test_catalogue_magnitudes_match_image_flux(galaxies):
    """Catalogue magnitude vs ``22.5 - 2.5 log10(sum of all 32x32 pixels of the noisy image)`` per band.

    The catalogue magnitude is the noiseless model's flux inside the stamp, so the two differ only by
    the summed (zero-mean) sky and shot noise: for galaxies with catalogue r < 17.5, every galaxy agrees
    within 0.05 mag in g, r and i, and the median difference is within 0.05 mag in all five bands.
    """
    bright = galaxies.magnitudes[:, 2] < 17.5
    assert bright.sum() >= 40
    flux = galaxies.images[bright].astype(np.float64).sum(axis=(2, 3))
    image_mag = synth.ZERO_POINT - 2.5 * np.log10(np.clip(flux, 1e-3, None))
    diff = image_mag - galaxies.magnitudes[bright]
    assert np.abs(diff[:, 1:4]).max() < 0.05
    assert np.abs(np.median(diff, axis=0)).max() < 0.05


def test_redshift_is_recoverable_from_colours_and_magnitudes():
    """A 15-nearest-neighbour fit on catalogue colours, r and size reaches SDSS-like photo-z precision."""
    params = [synth.galaxy_params(SEED + 7, i) for i in range(3000)]
    m = np.array([p["total_magnitudes"] for p in params])
    z = np.array([p["redshift"] for p in params])
    x = np.column_stack([m[:, :-1] - m[:, 1:], m[:, 2] / 5, np.log10([p["hlr_arcsec"] for p in params])])
    x = (x - x.mean(0)) / x.std(0)
    train, test = slice(0, 2500), slice(2500, None)
    dist = ((x[test, None, :] - x[None, train, :]) ** 2).sum(-1)
    zp = np.median(z[train][np.argsort(dist, axis=1)[:, :15]], axis=1)
    dz = (zp - z[test]) / (1 + z[test])
    assert 1.48 * np.median(np.abs(dz - np.median(dz))) < 0.025
    assert 1 - ((zp - z[test]) ** 2).sum() / ((z[test] - z[test].mean()) ** 2).sum() > 0.85


@pytest.mark.parametrize("kwargs, field", [
    ({"n": -1}, "'n'"), ({"n": 2.5}, "'n'"), ({"n": 3, "workers": 0}, "'workers'"),
    ({"n": 3, "seed": -4}, "'seed'"), ({"n": 3, "first_id": "x"}, "'first_id'")])
def test_bad_arguments_are_named(kwargs, field):
    with pytest.raises(ConfigError, match=field):
        synth.synthesize(**kwargs)


def test_zero_galaxies_give_an_empty_partition():
    empty = synth.synthesize(0, workers=1)
    assert len(empty) == 0 and empty.images.shape == (0, 5, 32, 32)
    assert list(synth.iter_synthesize(0, chunk=5, workers=1)) == []
    with pytest.raises(ConfigError, match="'chunk'"):
        synth.iter_synthesize(10, chunk=0)  # checked when called, before any iteration


def test_resumed_synth_renders_only_missing_partitions(tmp_path, monkeypatch, capsys):
    """A resumed `cai data synth` renders only what is not there: counted by spying on make_galaxy."""
    import hashlib
    import os

    from cosmicai.cli import main

    rendered: list[int] = []
    real = synth.make_galaxy

    def spy(seed, object_id, tab=None):
        rendered.append(object_id)
        return real(seed, object_id, tab)

    monkeypatch.setattr(synth, "make_galaxy", spy)
    out = tmp_path / "s"
    args = ["data", "synth", "--galaxies", "10", "--partition-size", str(4 * 20_508), "--workers", "1",
            "--seed", "4", "--out", str(out), "--quiet"]
    assert main(args) == 0
    assert sorted(rendered) == list(range(10))
    names = [f"part-00000{k}.safetensors" for k in (1, 2, 3)]
    digest = {n: hashlib.sha256((out / n).read_bytes()).hexdigest() for n in names}
    manifest = (out / "manifest.json").read_text()
    first_mtime = os.stat(out / names[0]).st_mtime_ns
    # an interrupted write: no manifest yet, partition 2 never written, partition 3 cut short
    (out / "manifest.json").unlink()
    (out / names[1]).unlink()
    data = (out / names[2]).read_bytes()
    (out / names[2]).write_bytes(data[:-100])
    rendered.clear()
    capsys.readouterr()
    assert main(args) == 0
    assert sorted(rendered) == [4, 5, 6, 7, 8, 9]  # partitions 2 and 3 only
    assert "2 written, 1 already present" in capsys.readouterr().out
    assert {n: hashlib.sha256((out / n).read_bytes()).hexdigest() for n in names} == digest
    assert (out / "manifest.json").read_text() == manifest
    assert os.stat(out / names[0]).st_mtime_ns == first_mtime  # kept, not rewritten
    rendered.clear()
    assert main(args) == 0 and rendered == []  # everything present: nothing rendered
    # another seed is another dataset: refused, nothing rendered
    assert main(args[:-4] + ["5", "--out", str(out), "--quiet"]) == 2
    assert rendered == [] and "already holds a dataset" in capsys.readouterr().err
