"""Photometric-redshift metrics as the AstroMAE authors define them."""

from __future__ import annotations

from typing import Any

import numpy as np

OUTLIER_DZ = 0.15


def redshift_metrics(z_pred: Any, z_true: Any) -> dict[str, float | int]:
    """MAE, MSE, Bias, Precision, R2 and outlier fraction of ``z_pred`` against ``z_true``.

    With dz = (zp - z) / (1 + z): Bias = mean(dz), Precision = 1.48 * median(|dz - median(dz)|), outliers are
    |dz| > 0.15. Rows whose prediction or truth is NaN (flagged, non-finite inputs) are excluded and counted in
    ``n_excluded``; ``n`` is the number of rows scored. With no scorable rows the metrics are NaN.
    """
    zp = np.asarray(z_pred, dtype=np.float64).ravel()
    zt = np.asarray(z_true, dtype=np.float64).ravel()
    if zp.shape != zt.shape:
        raise ValueError(f"z_pred has {zp.size} rows but z_true has {zt.size}")
    ok = np.isfinite(zp) & np.isfinite(zt)
    zp, zt = zp[ok], zt[ok]
    out: dict[str, float | int] = {"n": int(ok.sum()), "n_excluded": int((~ok).sum())}
    if zp.size == 0:
        out.update(dict.fromkeys(("MAE", "MSE", "Bias", "Precision", "R2", "outlier_fraction"), float("nan")))
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
