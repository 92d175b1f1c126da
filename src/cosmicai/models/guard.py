"""The fast-mode guard: before a run predicts in ``fast`` mode, fast and exact are compared on the weights
actually loaded, on a calibration sample of the run's own data.

Fast mode's error depends on the weights: 9e-6 with the demo weights, but 8e-3 (ONNX Runtime int8) to 3e-2
(torch int8) with random ones. The guard measures max |dz| = max |z_fast - z_exact| / (1 + z_exact) on
``CALIBRATION_ROWS`` finite rows. Over :data:`FAST_TOLERANCE`, policy ``fallback`` (the default) warns and predicts
in exact mode instead, ``strict`` refuses the run, ``off`` skips the check (recorded as unchecked).
"""

from __future__ import annotations

import time
from dataclasses import asdict, dataclass
from typing import Any

import numpy as np

from ..errors import ModelError

#: The documented fast-mode tolerance on |dz| against exact mode (docs/model.md).
FAST_TOLERANCE = 2e-3
#: Rows of the first partition a worker uses to calibrate.
CALIBRATION_ROWS = 256
POLICIES = ("fallback", "strict", "off")


@dataclass
class FastCheck:
    """Outcome of one calibration: rows compared, the measured max |dz|, and the mode predictions will use."""

    rows: int
    max_dz: float | None
    tolerance: float
    policy: str
    passed: bool
    mode_used: str
    seconds: float
    sample: str

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


def max_dz(z_fast: np.ndarray, z_exact: np.ndarray) -> float:
    """max |z_fast - z_exact| / |1 + z_exact| over rows where both are finite (0.0 when none are)."""
    z_fast = np.asarray(z_fast, dtype=np.float64)
    z_exact = np.asarray(z_exact, dtype=np.float64)
    ok = np.isfinite(z_fast) & np.isfinite(z_exact)
    if not ok.any():
        return 0.0
    denom = np.maximum(np.abs(1.0 + z_exact[ok]), 1e-6)
    return float(np.max(np.abs(z_fast[ok] - z_exact[ok]) / denom))


def calibrate(fast: Any, exact: Any, images: np.ndarray, magnitudes: np.ndarray, *, policy: str = "fallback",
              sample: str = "calibration sample", tolerance: float = FAST_TOLERANCE,
              rows: int = CALIBRATION_ROWS, batch_size: int = 512, load_seconds: float = 0.0) -> FastCheck:
    """Compare predictors ``fast`` and ``exact`` on the first ``rows`` rows; raise ModelError under ``strict``
    when max |dz| exceeds ``tolerance``. ``load_seconds`` (loading the exact model) counts in the cost."""
    if policy not in POLICIES:
        raise ModelError(f"fast_guard '{policy}' is not known; choose one of {', '.join(POLICIES)}")
    t0 = time.perf_counter()
    images, magnitudes = images[:rows], magnitudes[:rows]
    dz = max_dz(fast.predict(images, magnitudes, batch_size), exact.predict(images, magnitudes, batch_size))
    passed = dz <= tolerance
    seconds = time.perf_counter() - t0 + load_seconds
    check = FastCheck(rows=int(len(images)), max_dz=dz, tolerance=tolerance, policy=policy, passed=passed,
                      mode_used="fast" if passed else "exact", seconds=seconds, sample=sample)
    if not passed and policy == "strict":
        raise ModelError(f"fast mode deviates from exact mode by max |dz| {dz:.2e} on {check.rows} rows of "
                         f"{sample}, over the tolerance {tolerance:g} for these weights; run with --mode exact, or "
                         "--fast-guard fallback to predict in exact mode automatically")
    return check


def unchecked(policy: str = "off") -> FastCheck:
    """The record of a fast-mode run whose guard was switched off."""
    return FastCheck(rows=0, max_dz=None, tolerance=FAST_TOLERANCE, policy=policy, passed=False, mode_used="fast",
                     seconds=0.0, sample="")
