"""The AstroMAE redshift metrics against hand-computed values."""

from __future__ import annotations

import math

import numpy as np
import pytest

from cosmicai.pipeline.metrics import redshift_metrics


def test_metrics_hand_computed():
    zt = np.array([0.0, 0.5, 1.0, 0.2])
    zp = np.array([0.1, 0.5, 1.4, 0.14])
    m = redshift_metrics(zp, zt)
    err = np.array([0.1, 0.0, 0.4, -0.06])
    dz = err / (1 + zt)                      # 0.1, 0, 0.2, -0.05
    assert m["n"] == 4 and m["n_excluded"] == 0
    assert m["MAE"] == pytest.approx(0.56 / 4)
    assert m["MSE"] == pytest.approx((0.01 + 0.16 + 0.0036) / 4)
    assert m["Bias"] == pytest.approx(0.25 / 4)
    med = 0.05                               # median of (-0.05, 0, 0.1, 0.2)
    assert m["Precision"] == pytest.approx(1.48 * np.median(np.abs(dz - med)))
    ss_tot = np.sum((zt - zt.mean()) ** 2)
    assert m["R2"] == pytest.approx(1 - np.sum(err ** 2) / ss_tot)
    assert m["outlier_fraction"] == pytest.approx(0.25)   # only dz = 0.2 exceeds 0.15


def test_nan_predictions_are_excluded_and_counted():
    zt = np.array([0.1, 0.2, 0.3, 0.4], dtype=np.float32)
    zp = np.array([0.1, np.nan, 0.3, 0.5], dtype=np.float32)
    m = redshift_metrics(zp, zt)
    ref = redshift_metrics(zp[[0, 2, 3]], zt[[0, 2, 3]])
    assert m["n"] == 3 and m["n_excluded"] == 1
    assert m["MAE"] == pytest.approx(ref["MAE"]) and m["MAE"] == pytest.approx(0.1 / 3, rel=1e-5)


def test_perfect_and_empty():
    z = np.linspace(0, 1, 11)
    m = redshift_metrics(z, z)
    assert m["MAE"] == 0 and m["R2"] == 1 and m["outlier_fraction"] == 0 and m["Precision"] == 0
    empty = redshift_metrics([np.nan], [0.2])
    assert empty["n"] == 0 and empty["n_excluded"] == 1 and math.isnan(empty["MAE"])
    with pytest.raises(ValueError, match="3 rows but z_true has 2"):
        redshift_metrics([1, 2, 3], [1, 2])


def test_flagged_rows_are_excluded_and_counted():
    """Rows flagged for out-of-range inputs keep their (finite, untrustworthy) prediction but are not scored."""
    from cosmicai.pipeline.metrics import MetricsAccumulator

    zt = np.array([0.1, 0.2, 0.3, 0.4, -1.0, 0.5], dtype=np.float32)
    zp = np.array([0.1, 1e30, 0.3, np.nan, 0.2, 0.45], dtype=np.float32)
    flag = np.array([False, True, False, True, True, False])
    m = redshift_metrics(zp, zt, flag)
    ref = redshift_metrics(zp[[0, 2, 5]], zt[[0, 2, 5]])
    assert m["n"] == 3 and m["n_excluded"] == 3
    assert m["n_out_of_range"] == 1 and m["n_nonfinite_pred"] == 1 and m["n_unknown_z"] == 1
    assert m["MAE"] == ref["MAE"] and m["MAE"] == pytest.approx(0.05 / 3, rel=1e-5)
    acc = MetricsAccumulator()
    acc.add(zp[:3], zt[:3], flag[:3])
    acc.add(zp[3:], zt[3:], flag[3:])
    got = acc.result()
    assert {k: got[k] for k in ("n", "n_excluded", "n_out_of_range", "n_nonfinite_pred")} == \
        {"n": 3, "n_excluded": 3, "n_out_of_range": 1, "n_nonfinite_pred": 1}
    assert got["MAE"] == pytest.approx(ref["MAE"], rel=1e-12) and got["Precision"] == ref["Precision"]
    assert redshift_metrics(zp, zt)["n_out_of_range"] == 0  # no flag given: nothing counted as out of range
    with pytest.raises(ValueError, match="flag has 2 rows but z_pred has 6"):
        redshift_metrics(zp, zt, [True, False])
