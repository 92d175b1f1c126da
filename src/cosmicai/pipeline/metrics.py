"""Photometric-redshift metrics as the AstroMAE authors define them.

:func:`redshift_metrics` scores whole arrays; :class:`MetricsAccumulator` gives the same numbers for data that
arrives in chunks (summarize feeds it one rank at a time), without whole-column float64 copies.
"""

from __future__ import annotations

from typing import Any

import numpy as np

OUTLIER_DZ = 0.15
METRIC_NAMES = ("MAE", "MSE", "Bias", "Precision", "R2", "outlier_fraction")


def _as_column(values: Any) -> np.ndarray:
    return np.asarray(values, dtype=np.float64).ravel()


def _known_truth(zt: np.ndarray) -> np.ndarray:
    """True where the true redshift is known: finite and >= 0 (a negative redshift, e.g. -1, means unknown)."""
    with np.errstate(invalid="ignore"):
        return np.isfinite(zt) & (zt >= 0)


def _flags(flag: Any, n: int) -> np.ndarray | None:
    if flag is None:
        return None
    flag = np.asarray(flag, dtype=bool).ravel()
    if flag.size != n:
        raise ValueError(f"flag has {flag.size} rows but z_pred has {n}")
    return flag if flag.any() else None


def _counts(zp: np.ndarray, zt: np.ndarray, flag: np.ndarray | None = None) -> tuple[np.ndarray, int, int, int]:
    """(rows to score, rows of unknown truth, rows of known truth whose prediction is not finite, rows of known
    truth and finite prediction that are flagged)."""
    if zp.shape != zt.shape:
        raise ValueError(f"z_pred has {zp.size} rows but z_true has {zt.size}")
    known = _known_truth(zt)
    finite = np.isfinite(zp)
    ok = known & finite
    flagged = 0
    if flag is not None:
        flagged = int(np.count_nonzero(ok & flag))
        ok &= ~flag
    return ok, int(zt.size - np.count_nonzero(known)), int(np.count_nonzero(known & ~finite)), flagged


def redshift_metrics(z_pred: Any, z_true: Any, flag: Any = None) -> dict[str, float | int]:
    """MAE, MSE, Bias, Precision, R2 and outlier fraction of ``z_pred`` against ``z_true``.

    With dz = (zp - z) / (1 + z): Bias = mean(dz), Precision = 1.48 * median(|dz - median(dz)|), outliers are
    |dz| > 0.15. Rows are excluded from the metrics when the true redshift is unknown (negative, e.g. the
    common -1, or NaN/inf: counted in ``n_unknown_z``) or the prediction is not finite (NaN for flagged,
    non-finite inputs, or an overflow: counted in ``n_nonfinite_pred``), or the row is ``flag``-ged with a finite
    prediction (inputs out of range: predicted, but not to be trusted; counted in ``n_out_of_range``);
    ``n_excluded`` is all of them together and ``n`` the number of rows scored. With no scorable rows the
    metrics are NaN.
    """
    zp, zt = _as_column(z_pred), _as_column(z_true)
    ok, unknown, nonfinite, flagged = _counts(zp, zt, _flags(flag, zp.size))
    out: dict[str, float | int] = {"n": int(ok.sum()), "n_excluded": int((~ok).sum()), "n_unknown_z": unknown,
                                   "n_nonfinite_pred": nonfinite, "n_out_of_range": flagged}
    zp, zt = zp[ok], zt[ok]
    if zp.size == 0:
        out.update(dict.fromkeys(METRIC_NAMES, float("nan")))
        return out
    err = zp - zt
    dz = err / (1.0 + zt)
    ss_tot = float(np.sum((zt - zt.mean()) ** 2))
    out.update({
        "MAE": float(np.mean(np.abs(err))),
        "MSE": float(np.mean(err ** 2)),
        "Bias": float(np.mean(dz)),
        "Precision": float(1.48 * np.median(np.abs(dz - np.median(dz)))),
        "R2": float(1.0 - np.sum(err ** 2) / ss_tot) if ss_tot > 0 else float("nan"),
        "outlier_fraction": float(np.mean(np.abs(dz) > OUTLIER_DZ)),
    })
    return out


class _Sum:
    """A compensated (Neumaier) running sum of float64 chunk sums: the error does not grow with the chunks."""

    def __init__(self) -> None:
        self.total = 0.0
        self.comp = 0.0

    def add(self, x: float) -> None:
        t = self.total + x
        if abs(self.total) >= abs(x):
            self.comp += (self.total - t) + x
        else:
            self.comp += (x - t) + self.total
        self.total = t

    @property
    def value(self) -> float:
        return self.total + self.comp


def append_grown(buffer: np.ndarray, used: int, values: np.ndarray) -> np.ndarray:
    """``values`` written into ``buffer`` after its first ``used`` entries; returns the buffer, or a larger copy
    (at least twice the size) when it is full. Keeps one array per column instead of a list of chunks."""
    n = used + values.size
    if n > buffer.size:
        grown = np.empty(max(n, 2 * buffer.size), dtype=buffer.dtype)
        grown[:used] = buffer[:used]
        buffer = grown
    buffer[used:n] = values
    return buffer


class MetricsAccumulator:
    """:func:`redshift_metrics` over data fed in chunks (``add(z_pred, z_true)``), then ``result()``.

    Memory: each chunk is converted to float64 on its own; across chunks only running sums are kept, plus one
    float64 array of dz for the scored rows (8 bytes a row: 420 MB for 52 M rows), because the two medians of
    Precision need every dz. Keeping dz in float64 makes Precision, Bias and the outlier fraction bit-for-bit
    those of :func:`redshift_metrics` on the concatenated chunks (same values in the same order, the medians
    taken in place); MAE, MSE and R2 come from compensated float64 sums and the pairwise (Chan) merge of the
    true redshifts' mean and squared deviations, equal to it within ~1e-15 relative.

    ``capacity`` (rows expected) sizes the dz array once; more rows grow it.
    """

    def __init__(self, capacity: int = 0) -> None:
        self._dz = np.empty(max(int(capacity), 0), dtype=np.float64)
        self._n = 0
        self._excluded = 0
        self._unknown = 0
        self._nonfinite = 0
        self._flagged = 0
        self._outliers = 0
        self._abs_err = _Sum()
        self._sq_err = _Sum()
        self._zt_mean = 0.0
        self._zt_m2 = 0.0
        self._result: dict[str, float | int] | None = None

    def add(self, z_pred: Any, z_true: Any, flag: Any = None) -> None:
        """Score one chunk of rows (order matters only for the bit-exact medians' inputs, not their values);
        rows where ``flag`` is set are not scored (see :func:`redshift_metrics`)."""
        if self._result is not None:
            raise RuntimeError("MetricsAccumulator.add after result()")
        zp, zt = _as_column(z_pred), _as_column(z_true)
        ok, unknown, nonfinite, flagged = _counts(zp, zt, _flags(flag, zp.size))
        self._unknown += unknown
        self._nonfinite += nonfinite
        self._flagged += flagged
        self._excluded += int(zp.size - np.count_nonzero(ok))
        if not ok.all():
            zp, zt = zp[ok], zt[ok]
        m = zp.size
        if m == 0:
            return
        err = zp - zt
        dz = err / (1.0 + zt)
        self._abs_err.add(float(np.sum(np.abs(err))))
        self._sq_err.add(float(np.sum(err ** 2)))
        self._outliers += int(np.count_nonzero(np.abs(dz) > OUTLIER_DZ))
        mean_b = float(zt.mean())
        m2_b = float(np.sum((zt - mean_b) ** 2))
        n_a, n = self._n, self._n + m
        delta = mean_b - self._zt_mean
        self._zt_mean += delta * m / n
        self._zt_m2 += m2_b + delta * delta * n_a * m / n
        self._dz = append_grown(self._dz, n_a, dz)
        self._n = n

    def result(self) -> dict[str, float | int]:
        """The metrics, keyed as :func:`redshift_metrics`; computed once (the dz array is then released)."""
        if self._result is not None:
            return dict(self._result)
        n = self._n
        out: dict[str, float | int] = {"n": n, "n_excluded": self._excluded, "n_unknown_z": self._unknown,
                                       "n_nonfinite_pred": self._nonfinite, "n_out_of_range": self._flagged}
        if n == 0:
            out.update(dict.fromkeys(METRIC_NAMES, float("nan")))
        else:
            dz = self._dz[:n]
            bias = float(np.mean(dz))
            # Precision with the medians taken in place: no copy of dz (np.median would partition a copy).
            med = np.median(dz, overwrite_input=True)
            np.subtract(dz, med, out=dz)
            np.abs(dz, out=dz)
            precision = float(1.48 * np.median(dz, overwrite_input=True))
            sse = self._sq_err.value
            out.update({
                "MAE": self._abs_err.value / n,
                "MSE": sse / n,
                "Bias": bias,
                "Precision": precision,
                "R2": float(1.0 - sse / self._zt_m2) if self._zt_m2 > 0 else float("nan"),
                "outlier_fraction": self._outliers / n,
            })
        self._dz = np.empty(0, dtype=np.float64)
        self._result = out
        return dict(out)

