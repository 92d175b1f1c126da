"""Synthetic SDSS-like galaxies rendered with galsim (the generative model is in docs/synthetic-data.md).

Each galaxy is a sheared Sersic profile with a red or blue colour track that reddens with redshift,
a flux from a luminosity function and the Planck18 luminosity distance, a size from a physical
size-luminosity relation and the Planck18 angular-diameter distance, convolved with a per-band Moffat
PSF on a 32x32 stamp at 0.396 arcsec/pixel, plus sky and object shot noise. Images are in nanomaggies
(sky-subtracted, zero-mean background); the catalogue magnitude of a band is
``22.5 - 2.5 log10(flux of the noiseless model inside the stamp, in nanomaggies)``.

Galaxy ``k`` (object id ``first_id + k``) is drawn from its own random stream seeded by
``(seed, object id)``, so the result depends only on the seed and the ids, never on the worker count
or on how the ids are split into calls.
"""

from __future__ import annotations

import functools
import math
import os
from dataclasses import dataclass
from typing import Iterator

import numpy as np

from ..errors import ConfigError
from .formats import BANDS, IMAGE_SHAPE, Partition

PIXEL_SCALE = 0.396  # arcsec per pixel (SDSS)
STAMP = IMAGE_SHAPE[1]
#: AB zero point of the image unit (nanomaggies) in every band.
ZERO_POINT = 22.5
R_FAINT = 17.77  # SDSS main-sample r-band (Petrosian) limit
R_BRIGHT = 14.0  # brighter galaxies are saturated/shredded in SDSS and left out
Z_MIN, Z_MAX, Z0 = 0.01, 0.40, 0.08  # dN/dz ~ z^2 exp(-(z/Z0)^1.5) on [Z_MIN, Z_MAX]: peak 0.097, mean 0.12
RED_FRACTION = 0.4
#: Sky brightness (AB mag/arcsec^2) and electrons per nanomaggy (gain x counts/nmgy), typical SDSS values.
SKY_MAG = np.array([22.1, 21.8, 20.9, 20.2, 18.9])
E_PER_NMGY = np.array([160.0, 1100.0, 940.0, 730.0, 160.0])
#: Sky-noise sigma per pixel in nanomaggies: sqrt(sky per pixel / electrons per nmgy).
SKY_SIGMA = np.sqrt(10 ** (-0.4 * (SKY_MAG - ZERO_POINT)) * PIXEL_SCALE ** 2 / E_PER_NMGY)
#: PSF FWHM in each band relative to r (seeing is worse in the blue).
PSF_BAND_FACTOR = np.array([1.10, 1.05, 1.00, 0.97, 0.95])
PSF_BETA = 3.0
SEEING_RANGE = (1.2, 1.6)  # r-band PSF FWHM, arcsec
HLR_RANGE = (0.25, 6.0)  # clip on the half-light radius, arcsec
SERSIC_TRUNC = 4.0  # profiles truncated at this many half-light radii (SDSS model fits truncate too)
COLOUR_SCATTER = 0.03  # mag, independent per colour
_KPC_PER_RAD_TO_ARCSEC = 206264.806


@dataclass(frozen=True)
class GalaxyType:
    """One galaxy population: luminosity function, colour track, k-correction, size and shape."""

    name: str
    m_star: float  # Schechter M* (r band, AB, h = 0.677)
    alpha: float
    k_r: float  # r-band k-correction K_r(z) = k_r * z
    colours: tuple[tuple[float, ...], ...]  # (u-g, g-r, r-i, i-z) at _TRACK_Z
    r0_kpc: float  # half-light radius at M_r = -21
    size_slope: float  # d log10 R / d(-0.4 M)
    size_scatter: float  # dex
    sersic_n: tuple[float, float, float, float]  # mean, sd, min, max
    q_range: tuple[float, float]  # axis-ratio range


_TRACK_Z = np.array([0.0, 0.1, 0.2, 0.3, 0.4])
RED = GalaxyType(
    "red", m_star=-21.45, alpha=-0.6, k_r=1.2,
    colours=((1.75, 1.95, 2.15, 2.30, 2.40), (0.75, 0.90, 1.15, 1.45, 1.70),
             (0.38, 0.42, 0.47, 0.53, 0.65), (0.30, 0.33, 0.36, 0.38, 0.40)),
    r0_kpc=2.2, size_slope=0.56, size_scatter=0.12, sersic_n=(3.5, 0.5, 2.0, 4.5), q_range=(0.5, 1.0))
BLUE = GalaxyType(
    "blue", m_star=-21.0, alpha=-1.3, k_r=0.45,
    colours=((1.05, 1.18, 1.32, 1.45, 1.55), (0.40, 0.52, 0.68, 0.86, 1.05),
             (0.22, 0.29, 0.35, 0.40, 0.44), (0.12, 0.18, 0.24, 0.29, 0.33)),
    r0_kpc=3.0, size_slope=0.26, size_scatter=0.15, sersic_n=(1.0, 0.3, 0.5, 2.0), q_range=(0.2, 1.0))
TYPES = (RED, BLUE)


@dataclass(frozen=True)
class Tables:
    """Precomputed grids (distances, sampling CDFs) so workers need no astropy calls per galaxy."""

    z: np.ndarray  # redshift grid
    dist_mod: np.ndarray  # distance modulus (Planck18 luminosity distance)
    da_kpc: np.ndarray  # angular-diameter distance, kpc
    z_cdf: np.ndarray  # CDF of dN/dz on the grid
    mag_grid: np.ndarray  # absolute magnitude grid for the luminosity functions
    lf_cdf: tuple[np.ndarray, ...]  # CDF from the bright end, one per type


@functools.lru_cache(maxsize=1)
def tables() -> Tables:
    """Distance and sampling tables from astropy's Planck18 (computed once per process)."""
    from astropy.cosmology import Planck18

    z = np.linspace(0.0, Z_MAX + 0.02, 861)
    zz = np.maximum(z, 1e-4)
    dist_mod = np.asarray(Planck18.distmod(zz).value)
    da_kpc = np.asarray(Planck18.angular_diameter_distance(zz).to_value("kpc"))
    pdf = np.where((z >= Z_MIN) & (z <= Z_MAX), z ** 2 * np.exp(-((z / Z0) ** 1.5)), 0.0)
    z_cdf = np.concatenate([[0.0], np.cumsum(0.5 * (pdf[1:] + pdf[:-1]) * np.diff(z))])
    z_cdf /= z_cdf[-1]
    mag = np.linspace(-26.0, -10.0, 3201)
    cdfs = []
    for t in TYPES:
        x = 10 ** (-0.4 * (mag - t.m_star))
        lf = x ** (t.alpha + 1) * np.exp(-x)
        cdf = np.concatenate([[0.0], np.cumsum(0.5 * (lf[1:] + lf[:-1]) * np.diff(mag))])
        cdfs.append(cdf)  # strictly increasing: the LF is positive (>1e-44) over the whole grid
    return Tables(z, dist_mod, da_kpc, z_cdf, mag, tuple(cdfs))


def _sample_z(u: float, tab: Tables) -> float:
    # The CDF is flat outside [Z_MIN, Z_MAX]; invert only over its rising part.
    inside = (tab.z >= Z_MIN) & (tab.z <= Z_MAX)
    return float(np.interp(u, tab.z_cdf[inside], tab.z[inside]))


def galaxy_params(seed: int, object_id: int, tab: Tables | None = None) -> dict:
    """Draw one galaxy's parameters from the stream seeded by ``(seed, object_id)``.

    Returns a dict with redshift, type, total magnitudes ugriz (whole profile, not just the stamp),
    r-band absolute magnitude, half-light radius (arcsec and kpc), Sersic n, axis ratio, position angle
    (rad), sub-pixel offset (pixels), PSF FWHM per band (arcsec), sky sigma per band (nanomaggies) and
    ``rng``, the galaxy's generator, from which :func:`add_noise` then draws the noise.
    """
    tab = tab or tables()
    rng = np.random.default_rng(np.random.SeedSequence(seed, spawn_key=(object_id,)))
    z = _sample_z(rng.random(), tab)
    ti = 0 if rng.random() < RED_FRACTION else 1
    t = TYPES[ti]
    colours = np.array([np.interp(z, _TRACK_Z, c) for c in t.colours]) + rng.normal(0.0, COLOUR_SCATTER, 4)
    shift = float(np.interp(z, tab.z, tab.dist_mod)) + t.k_r * z  # m_r - M_r
    cdf = tab.lf_cdf[ti]
    lo, hi = np.interp([R_BRIGHT - shift, R_FAINT - shift], tab.mag_grid, cdf)
    abs_mag = float(np.interp(lo + (hi - lo) * rng.random(), cdf, tab.mag_grid))
    r = abs_mag + shift
    ug, gr, ri, iz = colours
    g = r + gr
    i = r - ri
    mags = np.array([g + ug, g, r, i, i - iz])
    log_r = math.log10(t.r0_kpc) + t.size_slope * (-0.4) * (abs_mag + 21.0) + rng.normal(0.0, t.size_scatter)
    r_kpc = 10 ** log_r
    hlr = r_kpc / float(np.interp(z, tab.z, tab.da_kpc)) * _KPC_PER_RAD_TO_ARCSEC
    mu, sd, nmin, nmax = t.sersic_n
    n = round(float(np.clip(rng.normal(mu, sd), nmin, nmax)) * 20) / 20  # 0.05 steps: galsim caches per n
    q = rng.uniform(*t.q_range)
    beta = rng.uniform(0.0, math.pi)
    offset = rng.uniform(-0.5, 0.5, 2)
    seeing = rng.uniform(*SEEING_RANGE)
    fwhm = seeing * PSF_BAND_FACTOR * (1.0 + rng.normal(0.0, 0.03, 5))
    sky_sigma = SKY_SIGMA * (1.0 + rng.normal(0.0, 0.05, 5))
    return {"redshift": z, "type": t.name, "total_magnitudes": mags, "abs_mag_r": abs_mag,
            "hlr_arcsec": float(np.clip(hlr, *HLR_RANGE)), "hlr_kpc": r_kpc, "sersic_n": n, "q": q,
            "beta": beta, "offset": offset, "psf_fwhm": fwhm, "sky_sigma": sky_sigma, "rng": rng}


@functools.lru_cache(maxsize=512)
def _unit_sersic(n: float):
    """Unit half-light-radius truncated Sersic, cached per n: galsim computes its k-range only once."""
    import galsim

    return galsim.Sersic(n=n, half_light_radius=1.0, trunc=SERSIC_TRUNC)


@functools.lru_cache(maxsize=1)
def _unit_moffat():
    """Unit-FWHM Moffat PSF truncated at 4 FWHM; each band's PSF is a dilation of it (cheap k-range)."""
    import galsim

    return galsim.Moffat(beta=PSF_BETA, fwhm=1.0, trunc=4.0)


def draw_model(params: dict) -> np.ndarray:
    """The noiseless float64 [5, 32, 32] model (nanomaggies) of a galaxy from :func:`galaxy_params`."""
    import galsim

    gal = _unit_sersic(params["sersic_n"]).dilate(params["hlr_arcsec"])
    gal = gal.shear(q=params["q"], beta=params["beta"] * galsim.radians)
    fluxes = 10 ** (-0.4 * (params["total_magnitudes"] - ZERO_POINT))
    out = np.empty(IMAGE_SHAPE, dtype=np.float64)
    offset = galsim.PositionD(*params["offset"])
    for b in range(len(BANDS)):
        psf = _unit_moffat().dilate(params["psf_fwhm"][b])
        img = galsim.Convolve(gal.withFlux(fluxes[b]), psf).drawImage(
            nx=STAMP, ny=STAMP, scale=PIXEL_SCALE, offset=offset)
        out[b] = img.array
    return out


def add_noise(model: np.ndarray, params: dict) -> np.ndarray:
    """``model`` plus Gaussian sky noise and object shot noise (from the galaxy's generator), as float32."""
    var = params["sky_sigma"][:, None, None] ** 2 + np.maximum(model, 0.0) / E_PER_NMGY[:, None, None]
    return (model + np.sqrt(var) * params["rng"].standard_normal(model.shape)).astype(np.float32)


def stamp_magnitudes(model: np.ndarray) -> np.ndarray:
    """Catalogue magnitudes: ``22.5 - 2.5 log10`` of the noiseless model's flux inside the stamp, per band."""
    flux = model.reshape(model.shape[0], -1).sum(axis=1)
    return ZERO_POINT - 2.5 * np.log10(np.maximum(flux, 1e-30))


def make_galaxy(seed: int, object_id: int, tab: Tables | None = None) -> tuple[np.ndarray, np.ndarray, float]:
    """One galaxy: (image float32 [5, 32, 32] with noise, catalogue magnitudes [5], redshift)."""
    params = galaxy_params(seed, object_id, tab)
    model = draw_model(params)
    return add_noise(model, params), stamp_magnitudes(model), params["redshift"]


_WORKER_TABLES: Tables | None = None


def _init_worker(tab: Tables) -> None:
    global _WORKER_TABLES
    _WORKER_TABLES = tab


def _render_range(task: tuple[int, int, int], tab: Tables | None = None) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    seed, start, stop = task
    tab = tab or _WORKER_TABLES or tables()
    count = stop - start
    images = np.empty((count, *IMAGE_SHAPE), dtype=np.float32)
    mags = np.empty((count, len(BANDS)), dtype=np.float32)
    z = np.empty(count, dtype=np.float32)
    for k in range(count):
        images[k], mags[k], z[k] = make_galaxy(seed, start + k, tab)
    return images, mags, z


def _check_int(name: str, value: object, minimum: int) -> int:
    if isinstance(value, bool) or not isinstance(value, (int, np.integer)):
        raise ConfigError(f"synthesize: '{name}' must be an integer, got {value!r}")
    if value < minimum:
        raise ConfigError(f"synthesize: '{name}' must be >= {minimum}, got {value}")
    return int(value)


def iter_synthesize(n: int, seed: int = 0, chunk: int = 10_000, workers: int | None = None,
                    first_id: int = 0, progress: bool = False) -> Iterator[Partition]:
    """Yield ``n`` synthetic galaxies as Partitions of ``chunk`` rows (the last may be shorter).

    ``workers`` processes (spawn start method; default every core, 1 renders in this process) each
    render blocks of galaxies; the rows come back in object-id order and are identical for any worker
    count. Object ids run from ``first_id`` to ``first_id + n - 1``. The worker processes do not re-import the
    calling script, so it needs no ``if __name__ == "__main__":`` guard.
    """
    n = _check_int("n", n, 0)
    seed = _check_int("seed", seed, 0)
    chunk = _check_int("chunk", chunk, 1)
    first_id = _check_int("first_id", first_id, 0)
    workers = (os.cpu_count() or 1) if workers is None else _check_int("workers", workers, 1)
    return _generate(n, seed, chunk, workers, first_id, progress)


def _generate(n: int, seed: int, chunk: int, workers: int, first_id: int, progress: bool,
              skip: frozenset[int] = frozenset()) -> Iterator[Partition | None]:
    """The ``chunk``-row Partitions of ids ``first_id`` ... ``first_id + n - 1`` in order; for a chunk index in
    ``skip`` (0-based) nothing is rendered and None is yielded in its place."""
    from tqdm import tqdm

    tab = tables()
    stop = first_id + n
    block = max(1, min(64, chunk, math.ceil(n / (4 * workers)) if n else 1))
    bounds = [(lo, min(stop, lo + chunk)) for lo in range(first_id, stop, chunk)]
    per_chunk = [[] if c in skip else [(seed, s, min(s + block, hi)) for s in range(lo, hi, block)]
                 for c, (lo, hi) in enumerate(bounds)]
    tasks = [t for ts in per_chunk for t in ts]
    bar = tqdm(total=n - sum(hi - lo for c, (lo, hi) in enumerate(bounds) if c in skip), unit="galaxy",
               disable=not progress)
    pool = None
    try:
        if workers > 1 and len(tasks) > 1:
            from ..processes import spawn_context

            # workers start without re-importing the caller's script: no main guard needed
            pool = spawn_context().Pool(min(workers, len(tasks)), _init_worker, (tab,))
            results = _ordered(pool, tasks, window=4 * workers)
        else:
            results = (_render_range(t, tab) for t in tasks)
        for (lo, _hi), ts in zip(bounds, per_chunk):
            if not ts:
                yield None
                continue
            got = [next(results) for _ in ts]
            bar.update(sum(len(g[2]) for g in got))
            part, _, _ = _take(got, sum(len(g[2]) for g in got), lo)
            yield part
    finally:
        bar.close()
        if pool is not None:
            pool.terminate()
            pool.join()


def _ordered(pool, tasks: list, window: int) -> Iterator[tuple[np.ndarray, np.ndarray, np.ndarray]]:
    """Results in task order with at most ``window`` tasks in flight (bounded memory for huge ``n``)."""
    from collections import deque

    todo, flight = iter(tasks), deque()
    for task in todo:
        flight.append(pool.apply_async(_render_range, (task,)))
        if len(flight) >= window:
            break
    while flight:
        yield flight.popleft().get()
        task = next(todo, None)
        if task is not None:
            flight.append(pool.apply_async(_render_range, (task,)))


def _take(pending: list, rows: int, first: int) -> tuple[Partition, list, int]:
    images, mags, z = (np.concatenate([p[i] for p in pending]) for i in range(3))
    part = Partition(images[:rows], mags[:rows], np.arange(first, first + rows, dtype=np.int64), z[:rows])
    rest = [(images[rows:], mags[rows:], z[rows:])] if rows < len(z) else []
    return part.validate("synthesize"), rest, len(z) - rows


def synthesize(n: int, seed: int = 0, workers: int | None = None, first_id: int = 0,
               progress: bool = False) -> Partition:
    """``n`` synthetic SDSS-like galaxies as one Partition (images, magnitudes, redshift, object_id).

    Deterministic for a seed whatever ``workers`` is; see :func:`iter_synthesize`.
    """
    parts = list(iter_synthesize(n, seed=seed, chunk=max(n, 1), workers=workers, first_id=first_id,
                                 progress=progress))
    if not parts:
        return Partition(np.empty((0, *IMAGE_SHAPE), np.float32), np.empty((0, len(BANDS)), np.float32),
                         np.empty(0, np.int64), np.empty(0, np.float32))
    return parts[0]
