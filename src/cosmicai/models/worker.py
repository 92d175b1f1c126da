"""Per-process model state, built once per worker process (as Ray Data builds a model once per actor):
the loaded predictors, the worker's thread count and the fast-mode checks it measured.

Backends call ``worker_models().configure(threads=...)`` once in each worker process; the pipeline and
``cosmicai.predict`` take their predictors from :meth:`WorkerModels.get`, so later tasks of a process reuse them.
"""

from __future__ import annotations

import os
import sys
import time
from typing import Any


class WorkerModels:
    """Loaded predictors keyed by ``(model, weights, device, mode, threads)``, this worker's threads, and its
    fast-mode checks (keyed by the caller)."""

    def __init__(self, threads: int | None = None) -> None:
        self.threads = threads
        self._models: dict[tuple, Any] = {}
        self._fast_checks: dict[tuple, Any] = {}

    def configure(self, threads: int | None) -> None:
        """Set this process's model threads (None: the loader's default, every CPU it may use); torch's too,
        where it is loaded (the ONNX Runtime engine never loads it)."""
        self.threads = threads
        torch = sys.modules.get("torch")
        if threads and torch is not None:
            torch.set_num_threads(int(threads))

    def key(self, model: str, weights: str | None, device: str, mode: str, threads: int | None = None) -> tuple:
        """The cache key of a predictor (``threads`` default: the worker's)."""
        return (model, weights, device, mode, self.threads if threads is None else threads)

    def get(self, model: str, weights: str | None, device: str, mode: str, sha256: str | None = None,
            threads: int | None = None) -> tuple[Any, bool, float]:
        """``(predictor, loaded_now, load seconds)``: the cached one, else loaded now. With ``sha256`` the weights
        must still be the ones the plan recorded (a cached model of other weights is reloaded and checked)."""
        threads = self.threads if threads is None else threads
        key = self.key(model, weights, device, mode, threads)
        cached = self._models.get(key)
        if cached is not None and (sha256 is None or getattr(cached, "weights_sha256", None) in (None, sha256)):
            return cached, False, 0.0
        from .registry import load_model

        t0 = time.perf_counter()
        predictor = load_model(model, weights=weights, device=device, mode=mode, threads=threads, sha256=sha256)
        self._models[key] = predictor
        return predictor, True, time.perf_counter() - t0

    def drop(self, model: str, weights: str | None, device: str, mode: str) -> None:
        """Forget one cached predictor (with the worker's threads), freeing its memory."""
        self._models.pop(self.key(model, weights, device, mode), None)

    def fast_check(self, key: tuple) -> Any:
        """The fast-mode check this process stored under ``key``, or None."""
        return self._fast_checks.get(key)

    def keep_fast_check(self, key: tuple, check: Any) -> None:
        """Remember a fast-mode check for later tasks of this process."""
        self._fast_checks[key] = check

    def threads_in_use(self, predictor: Any) -> int:
        """The threads ``predictor`` computes with: torch's, its ONNX Runtime streams, else the worker's."""
        torch = sys.modules.get("torch")
        if getattr(predictor, "engine", None) == "torch" and torch is not None:
            return int(torch.get_num_threads())
        return int(getattr(getattr(predictor, "_run", None), "threads", 0) or self.threads or os.cpu_count() or 1)

    def clear(self) -> None:
        """Forget every cached predictor and fast-mode check (frees memory; tests)."""
        self._models.clear()
        self._fast_checks.clear()


_WORKER = WorkerModels()


def worker_models() -> WorkerModels:
    """This process's :class:`WorkerModels`."""
    return _WORKER
