"""AstroMAE and the model registry. ``load_model`` is imported lazily so ``import cosmicai.models`` stays light."""

from __future__ import annotations

from typing import Any

from .engines import BUILTIN, ENGINES, resolve_engine

__all__ = ["BUILTIN", "ENGINES", "check_model_name", "load_model", "resolve_engine"]


def check_model_name(name: str) -> None:
    """Raise ModelError when ``name`` is neither built in nor a resolvable plug-in (cheap for built-in names)."""
    if name not in BUILTIN:
        from .registry import _find_factory

        _find_factory(name)


def __getattr__(name: str) -> Any:
    if name == "load_model":
        from .registry import load_model

        return load_model
    raise AttributeError(name)
