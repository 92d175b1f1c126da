"""AstroMAE and the model registry. ``load_model`` is imported lazily so ``import cosmicai.models`` stays light."""

from __future__ import annotations

from typing import Any

__all__ = ["load_model"]


def __getattr__(name: str) -> Any:
    if name == "load_model":
        from .registry import load_model

        return load_model
    raise AttributeError(name)
