"""The one door for models: a name -> :class:`ModelSpec` table, filled by :func:`register_model` (as timm's
``register_model``) and by the ``cosmicai.models`` entry-point group, resolved through the same table.

The shipped models register themselves exactly as a plug-in does (``cosmicai/models/astromae/__init__.py``,
imported by ``cosmicai/models/__init__.py``, so any import of the model layer has them); a third-party package either calls :func:`register_model` or names its factory in its ``pyproject.toml``::

    [project.entry-points."cosmicai.models"]
    my-model = "my_package.model:factory"

A factory is called as ``factory(weights=..., device=..., mode=..., threads=...)`` and returns an object with
``predict(images, magnitudes, batch_size)``, an ``nn.Module`` taking ``(images, magnitudes)``, or a
``registry.Predictor``. A model registered with ``engines`` also gets ``engine=`` (the one chosen for it),
``compile=`` and ``sha256=`` (the digest its weights must have). Needs no torch.
"""

from __future__ import annotations

import importlib
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

from ..errors import ModelError

#: Entry-point group of plug-in models.
ENTRY_POINT_GROUP = "cosmicai.models"


@dataclass(frozen=True)
class ModelSpec:
    """What a registration carries: the factory (a callable or ``"package.module:attr"``, imported on first use)
    and the data the loader needs about the model.

    ``weights``: the weights URL used when none is given (None: none). ``needs_weights``: what to give when a
    model cannot run without weights (None: it can). ``reads_weights``: whether the model reads a weights file at
    all (False: ``weights=`` is ignored and no digest is recorded). ``weights_origin``: how a card describes
    ``weights``. ``card``: fixed card fields (``origin``, ``trained_on``, ``caveat``) of a model without a
    weights file. ``engines``: the engines the model runs on (``torch``, ``onnxruntime``); empty for a plug-in
    that runs itself."""

    name: str
    factory: Callable[..., Any] | str
    weights: str | None = None
    needs_weights: str | None = None
    reads_weights: bool = True
    weights_origin: str | None = None
    card: dict[str, Any] = field(default_factory=dict)
    engines: tuple[str, ...] = ()

    def load_factory(self) -> Callable[..., Any]:
        """The factory, importing ``package.module:attr`` now; ModelError when it cannot be had."""
        if callable(self.factory):
            return self.factory
        return _import_factory(self.name, self.factory)


_TABLE: dict[str, ModelSpec] = {}


def register_model(name: str | Callable[..., Any], factory: Callable[..., Any] | str | None = None,
                   **spec: Any) -> Any:
    """Register model ``name``; as a call (``register_model("m", factory, ...)``) it returns the
    :class:`ModelSpec`, as a decorator (``@register_model`` or ``@register_model("m", weights=...)``) the
    function. ``spec``: the :class:`ModelSpec` fields. A name registered again replaces the earlier one."""
    if callable(name) and factory is None and not spec:  # bare @register_model: the function's name
        fn = name
        register_model(fn.__name__.replace("_", "-"), fn)
        return fn
    if not isinstance(name, str) or not name or ":" in name:
        raise ModelError(f"model name {name!r} must be a non-empty string without ':'")
    if factory is None:
        def decorate(fn: Callable[..., Any]) -> Callable[..., Any]:
            register_model(name, fn, **spec)
            return fn

        return decorate
    try:
        entry = ModelSpec(name=name, factory=factory, **spec)
    except TypeError as exc:
        raise ModelError(f"register_model('{name}'): {exc}") from exc
    _TABLE[name] = entry
    return entry


def _entry_points() -> dict[str, Any]:
    from importlib.metadata import entry_points

    return {ep.name: ep for ep in entry_points(group=ENTRY_POINT_GROUP)}


def available_models(entry_points: bool = True) -> list[str]:
    """Every registered name (in registration order), then the entry-point names not registered in code (sorted);
    ``entry_points=False``: only the names registered in code."""
    names = list(_TABLE)
    if entry_points:
        names += sorted(set(_entry_points()) - set(_TABLE))
    return names


def get_spec(name: str) -> ModelSpec:
    """The registration of ``name``: registered in code, an entry point (registered now), or
    ``package.module:factory``; anything else is one ModelError listing the names."""
    if name in _TABLE:
        return _TABLE[name]
    if ":" in name:
        return ModelSpec(name=name, factory=_import_factory(name, name))
    ep = _entry_points().get(name)
    if ep is not None:
        return register_model(name, ep.value)
    raise ModelError(f"model '{name}' is not known; choose one of {', '.join(available_models())} or give "
                     "'package.module:factory'")


def find_spec(name: str) -> ModelSpec | None:
    """The registration of ``name`` made in code or from an entry point so far, or None (imports nothing)."""
    return _TABLE.get(name)


def registered_specs() -> list[ModelSpec]:
    """Every registration made so far (the shipped ones included)."""
    return list(_TABLE.values())


def check_model_name(name: str) -> None:
    """Raise ModelError when ``name`` is not a model (cheap for registered names: no factory is imported)."""
    get_spec(name)


def _import_factory(name: str, target: str) -> Callable[..., Any]:
    module_name, _, attr = target.partition(":")
    try:
        module = importlib.import_module(module_name)
    except ImportError as exc:
        raise ModelError(f"model '{name}': cannot import module '{module_name}': {exc}") from exc
    factory = getattr(module, attr, None)
    if not callable(factory):
        raise ModelError(f"model '{name}': module '{module_name}' has no callable '{attr}'")
    return factory
