"""The built-in model names and the inference engine choice (no torch needed); re-exported by ``cosmicai.models``."""

from __future__ import annotations

#: Models that need no plug-in lookup (see registry.py).
BUILTIN = ("astromae-demo", "astromae", "astromae-random")

#: ``auto`` = ONNX Runtime for AstroMAE on CPU when it is installed (and torch.compile is not asked for), else torch.
ENGINES = ("auto", "torch", "onnxruntime")


def requested_engine(engine: str | None = None) -> str:
    """The engine asked for: ``engine``, else ``$CAI_ENGINE``, else ``auto``."""
    import os

    return engine or os.environ.get("CAI_ENGINE") or "auto"


def compile_requested(compile: bool | None = None) -> bool:
    """Whether torch.compile is asked for: ``compile``, else ``$CAI_COMPILE`` (set and not 0/false/no)."""
    import os

    if compile is not None:
        return bool(compile)
    return os.environ.get("CAI_COMPILE", "") not in ("", "0", "false", "no")


def resolve_engine(engine: str | None, device_type: str, is_astromae: bool = True, compile: bool = False,
                   model_kind: str = "AstroMAE") -> str:
    """The engine (``torch`` or ``onnxruntime``) for ``engine`` (default ``$CAI_ENGINE`` or ``auto``) on
    ``device_type``; an unknown or impossible choice raises ModelError. Needs no torch."""
    from ..errors import ModelError
    from .ort_engine import available

    engine = requested_engine(engine)
    if engine not in ENGINES:
        raise ModelError(f"engine '{engine}' is not known; choose one of {', '.join(ENGINES)}")
    if engine == "torch":
        return "torch"
    fits = device_type == "cpu" and is_astromae
    if engine == "onnxruntime":
        if not fits:
            raise ModelError("engine 'onnxruntime' runs AstroMAE on CPU only (use engine 'torch' for "
                             f"{model_kind} on {device_type})")
        if not available():
            raise ModelError("engine 'onnxruntime' needs the onnxruntime package (pip install onnxruntime)")
        return "onnxruntime"
    return "onnxruntime" if fits and not compile and available() else "torch"
