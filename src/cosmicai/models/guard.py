"""The fast-mode guard: before a run predicts in ``fast`` mode, fast and exact are compared on the weights
actually loaded, on a calibration sample of the run's own data.

Fast mode's error depends on the weights: 9e-6 with the demo weights, but 8e-3 (ONNX Runtime int8) to 3e-2
(torch int8) with random ones. The guard measures max |dz| = max |z_fast - z_exact| / (1 + z_exact) on
``CALIBRATION_ROWS`` finite rows. Over :data:`FAST_TOLERANCE`, policy ``fallback`` (the default) warns and predicts
in exact mode instead, ``strict`` refuses the run, ``off`` skips the check (recorded as unchecked).

Once per run (:func:`shared_calibrate`): the first worker process to measure stores the outcome in a file its
caller names (the run's ``fast_check/<key>.json``, ``results.RunFolder.fast_check``); every later worker process whose key matches (same model, weights
sha256, engine and versions, device, CPU features, dataset) reads it instead of loading the exact model and
predicting twice. Workers on another CPU (a different Lambda or cluster node type) measure for themselves.
"""

from __future__ import annotations

import hashlib
import json
import platform
import time
import warnings
from dataclasses import asdict, dataclass
from typing import Any, Callable

import numpy as np

from ..errors import ModelError

#: The documented fast-mode tolerance on |dz| against exact mode (docs/model.md).
FAST_TOLERANCE = 2e-3
#: Rows of the first partition a worker uses to calibrate.
CALIBRATION_ROWS = 256
POLICIES = ("fallback", "strict", "off")
#: Largest shared-check file read back (it holds a few numbers).
SHARED_MAX_BYTES = 64 * 1024


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
    return enforce(check)


def enforce(check: FastCheck) -> FastCheck:
    """``check``, or ModelError when it failed under policy ``strict``."""
    if not check.passed and check.policy == "strict":
        raise ModelError(f"fast mode deviates from exact mode by max |dz| {check.max_dz:.2e} on {check.rows} rows "
                         f"of {check.sample}, over the tolerance {check.tolerance:g} for these weights; run with "
                         "--mode exact, or --fast-guard fallback to predict in exact mode automatically")
    return check


def cpu_features() -> str:
    """A short digest of this CPU's model and instruction-set flags (int8 kernels depend on them)."""
    text = f"{platform.machine()} {platform.processor()}"
    try:
        with open("/proc/cpuinfo") as fh:
            for line in fh:
                name, _, value = line.partition(":")
                if name.strip() in ("model name", "flags", "Features", "CPU implementer", "CPU part"):
                    text += f"|{name.strip()}:{' '.join(sorted(value.split()))}"
                if name.strip() in ("flags", "Features"):
                    break  # the first processor's description is enough
    except OSError:
        pass
    return hashlib.sha256(text.encode()).hexdigest()[:16]


def _versions() -> dict[str, str]:
    """Installed versions of the inference libraries (whether or not this process has imported them yet)."""
    from importlib.metadata import PackageNotFoundError, version

    found = {}
    for name in ("onnxruntime", "torch", "numpy"):
        try:
            found[name] = version(name)
        except PackageNotFoundError:
            pass
    return found


def shared_key(model: str, weights_sha256: str | None, engine: str, device: str, data: str = "",
               tolerance: float = FAST_TOLERANCE, rows: int = CALIBRATION_ROWS) -> str | None:
    """The key under which a check is shared by worker processes of one run; None (not shared) when the weights'
    sha256 is unknown or the device is not the CPU (a GPU's numbers are its own)."""
    if not weights_sha256 or not str(device).startswith("cpu"):
        return None
    parts = [model, weights_sha256, engine, str(device), data, repr(tolerance), rows, cpu_features(), _versions()]
    return hashlib.sha256(json.dumps(parts, sort_keys=True).encode()).hexdigest()[:32]


def load_shared(url: str, key: str, policy: str) -> FastCheck | None:
    """The check another worker process of this run stored at ``url`` under ``key`` (None if absent, unreadable
    or of another key), with this worker's ``policy`` applied (ModelError under ``strict`` when it failed)."""
    from .. import storage
    from ..errors import CaiError

    try:
        size = storage.size(url)
        if size is None or size > SHARED_MAX_BYTES:
            return None
        stored = json.loads(storage.read_bytes(url))
        check = FastCheck(rows=int(stored["rows"]), max_dz=float(stored["max_dz"]),
                          tolerance=float(stored["tolerance"]), policy=policy, passed=bool(stored["passed"]),
                          mode_used="fast" if stored["passed"] else "exact", seconds=0.0,
                          sample=str(stored["sample"]))
    except (CaiError, OSError, ValueError, KeyError, TypeError):
        return None
    if stored.get("key") != key or check.passed != (check.max_dz <= check.tolerance):
        return None
    return enforce(check)


def save_shared(url: str, key: str, check: FastCheck) -> None:
    """Store ``check`` at ``url`` for the other worker processes of this run (atomically; a failure only costs
    them a measurement of their own)."""
    from .. import storage
    from ..errors import CaiError

    try:
        storage.write_json(url, {**check.to_dict(), "key": key,
                                                          "cpu_features": cpu_features(), "versions": _versions()})
    except (CaiError, OSError) as exc:
        warnings.warn(f"fast-mode check not shared with the run's other workers: {exc}", RuntimeWarning,
                      stacklevel=2)


def shared_calibrate(url: str | None, key: str | None, policy: str,
                     measure: Callable[[], FastCheck]) -> tuple[FastCheck, bool]:
    """``(check, reused)`` under ``policy``: the check another worker process of this run stored at ``url`` under
    ``key`` (:func:`shared_key`), else ``measure()`` (a :func:`calibrate` call with policy ``fallback``, which
    never raises), stored there for the others, failed or not. Without ``url`` or ``key`` it only measures. ModelError under ``strict`` when
    the check failed. A reused check's ``seconds`` is the time spent reading it."""
    if policy not in POLICIES:
        raise ModelError(f"fast_guard '{policy}' is not known; choose one of {', '.join(POLICIES)}")
    if url and key:
        t0 = time.perf_counter()
        found = load_shared(url, key, policy)
        if found is not None:
            found.seconds = time.perf_counter() - t0
            return found, True
    check = measure()
    check.policy = policy
    if url and key:
        save_shared(url, key, check)
    return enforce(check), False


def unchecked(policy: str = "off") -> FastCheck:
    """The record of a fast-mode run whose guard was switched off."""
    return FastCheck(rows=0, max_dz=None, tolerance=FAST_TOLERANCE, policy=policy, passed=False, mode_used="fast",
                     seconds=0.0, sample="")
