"""Warnings for data that look like they are in other units than cosmicai expects (see docs/data.md, Units).

Pixels are sky-subtracted fluxes in nanomaggies (AB zero point 22.5) and magnitudes are AB magnitudes. Data
that look otherwise are still converted; one line on stderr per kind of doubt names the file and what it looks
like. The checks are cheap reductions (a max and a min per row; whole-number tests only on rows that are
already suspicious).
"""

from __future__ import annotations

import sys
import warnings
from typing import Iterable, Iterator, Sequence

import numpy as np

#: A cutout whose pixels are all whole numbers and reach this many is taken for raw counts (ADU).
COUNTS_MAX = 1000.0
#: A cutout whose every pixel exceeds this still holds the sky (sky-subtracted nanomaggies centre on 0).
SKY_MIN = 100.0
#: Median AB magnitude of a galaxy catalogue is well inside this range (SDSS: about 14 to 25).
MAG_RANGE = (5.0, 40.0)
DOCS = "see 'Units' in docs/data.md"


class UnitsCheck:
    """Checks chunks of images and magnitudes; warns at most once per kind of doubt."""

    def __init__(self, stream=None) -> None:
        self.stream = stream
        self.warned: set[str] = set()

    def _warn(self, kind: str, text: str) -> None:
        if kind in self.warned:
            return
        self.warned.add(kind)
        print(f"cai: warning: {text}", file=self.stream or sys.stderr, flush=True)

    def images(self, images: np.ndarray, names: Sequence[str] | str) -> None:
        """Check images [N,5,32,32]; ``names`` gives each row's file (or one name for all rows)."""
        if len(images) == 0 or {"counts", "sky"} <= self.warned:
            return
        flat = images.reshape(len(images), -1)
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", RuntimeWarning)  # an all-NaN row: the writer reports it
            top, low = np.nanmax(flat, axis=1), np.nanmin(flat, axis=1)
        name = (lambda i: names) if isinstance(names, str) else (lambda i: names[i])
        for i in np.flatnonzero(top > COUNTS_MAX):
            row = flat[i][np.isfinite(flat[i])]
            if np.array_equal(row, np.round(row)):
                self._warn("counts", f"{name(i)}: pixel values look like raw counts (whole numbers up to "
                           f"{top[i]:,.0f}), not calibrated fluxes; cosmicai expects sky-subtracted fluxes in "
                           f"nanomaggies ({DOCS})")
                break
        sky = np.flatnonzero(low > SKY_MIN)
        if sky.size:
            i = int(sky[0])
            self._warn("sky", f"{name(i)}: every pixel is above {low[i]:,.1f}, which looks like an image with the "
                       f"sky (or a bias) not subtracted; cosmicai expects sky-subtracted fluxes in nanomaggies, "
                       f"whose background is near 0 ({DOCS})")

    def magnitudes(self, mags: np.ndarray, where: str) -> None:
        """Check a block of magnitudes [N,5] read from ``where`` (a file, maybe with its column names)."""
        values = np.asarray(mags, dtype=np.float64)
        values = values[np.isfinite(values)]
        if values.size == 0 or "magnitudes" in self.warned:
            return
        median = float(np.median(values))
        if values.min() >= 0 and values.max() <= 1:
            looks = "fluxes in maggies (every value between 0 and 1)"
        elif median > MAG_RANGE[1]:
            looks = f"fluxes such as nanomaggies (median {median:,.4g})"
        elif median < MAG_RANGE[0]:
            looks = f"something other than magnitudes (median {median:.4g})"
        else:
            return
        self._warn("magnitudes", f"{where}: magnitudes look like {looks}; cosmicai expects AB magnitudes "
                   f"(galaxies: about 14 to 25; magnitude = 22.5 - 2.5 log10(flux in nanomaggies)) ({DOCS})")


def checked_chunks(chunks: Iterable, check: UnitsCheck | None = None) -> Iterator:
    """Pass :class:`~cosmicai.data.sources.Chunk` objects through, checking each one's units on the way."""
    check = check or UnitsCheck()
    for chunk in chunks:
        check.images(chunk.part.images, chunk.source)
        check.magnitudes(chunk.part.magnitudes, chunk.source)
        yield chunk
