"""Models by name through one door (``catalog.register_model``, as timm's), the worker's model state
(``worker.py``) and AstroMAE (``astromae/``). ``load_model`` is imported lazily so ``import cosmicai.models``
stays light (no torch, no numpy model code)."""

from __future__ import annotations

from typing import Any

from .catalog import available_models, check_model_name, register_model
from .modes import ENGINES, MODES
from . import astromae  # noqa: E402,F401 - registers the shipped models, through register_model like a plug-in

__all__ = ["ENGINES", "MODES", "available_models", "check_model_name", "load_model", "register_model"]


def __getattr__(name: str) -> Any:
    if name == "load_model":
        from .registry import load_model

        return load_model
    raise AttributeError(name)
