"""The model layer's vocabulary: prediction modes and inference engines, and the one place an engine is chosen.
Needs no torch (``cosmicai.config`` validates a run's ``mode`` against :data:`MODES`)."""

from __future__ import annotations

import os

from ..errors import ModelError

#: ``exact``: fp32; ``fast``: int8 matrix products where they were measured harmless (docs/model.md).
MODES = ("exact", "fast")

#: ``auto`` = ONNX Runtime for a model registered with that engine, on CPU, when onnxruntime is installed and
#: torch.compile is not asked for; else torch.
ENGINES = ("auto", "torch", "onnxruntime")


class EngineUnavailable(ModelError):
    """An engine cannot run here (the weights are fine: another engine of the model may run them)."""


def check_mode(mode: str) -> str:
    """``mode``, or ModelError naming the modes."""
    if mode not in MODES:
        raise ModelError(f"mode '{mode}' is not known; choose one of {', '.join(MODES)}")
    return mode


def requested_engine(engine: str | None = None) -> str:
    """The engine asked for: ``engine``, else ``$CAI_ENGINE``, else ``auto``."""
    return engine or os.environ.get("CAI_ENGINE") or "auto"


def compile_requested(compile: bool | None = None) -> bool:
    """Whether torch.compile is asked for: ``compile``, else ``$CAI_COMPILE`` (set and not 0/false/no)."""
    if compile is not None:
        return bool(compile)
    return os.environ.get("CAI_COMPILE", "") not in ("", "0", "false", "no")


def onnxruntime_available() -> bool:
    """Whether onnxruntime can be imported (all its engine needs at run time)."""
    try:
        import onnxruntime  # noqa: F401
    except ImportError:
        return False
    return True


def resolve_engine(engine: str | None, device_type: str, onnx: bool = True, compile: bool = False,
                   model_kind: str = "AstroMAE") -> str:
    """The engine (``torch`` or ``onnxruntime``) for ``engine`` (default ``$CAI_ENGINE`` or ``auto``) on
    ``device_type``, for a model that has an ONNX Runtime engine (``onnx``) or not; an unknown or impossible
    choice raises ModelError."""
    engine = requested_engine(engine)
    if engine not in ENGINES:
        raise ModelError(f"engine '{engine}' is not known; choose one of {', '.join(ENGINES)}")
    if engine == "torch":
        return "torch"
    fits = device_type == "cpu" and onnx
    if engine == "onnxruntime":
        if not fits:
            raise ModelError("engine 'onnxruntime' runs AstroMAE on CPU only (use engine 'torch' for "
                             f"{model_kind} on {device_type})")
        if not onnxruntime_available():
            raise ModelError("engine 'onnxruntime' needs the onnxruntime package (pip install onnxruntime)")
        return "onnxruntime"
    return "onnxruntime" if fits and not compile and onnxruntime_available() else "torch"
