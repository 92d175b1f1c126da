"""Loading a model by name (:func:`load_model`) and the :class:`Predictor` every stage calls.

Names come from one table (``catalog.py``: ``register_model`` and the ``cosmicai.models`` entry-point group; the
shipped AstroMAE models register in ``astromae/__init__.py`` exactly as a plug-in does), or are
``package.module:factory``. :func:`load_model` validates the mode, resolves the device, threads and engine once,
and calls the factory (see ``catalog.py`` for what it is given and may return).

Every loaded predictor carries ``card`` (:func:`weights_card`: which weights, what they were trained on, any
caveat) and ``training_range`` (``(z_min, z_max)`` of the training labels, or None when the weights do not say).
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import math
import os
import sys
import warnings
from typing import TYPE_CHECKING, Any

import numpy as np

from ..errors import CaiError, ModelError
from .catalog import ModelSpec, find_spec, get_spec, registered_specs
from .modes import EngineUnavailable, check_mode, compile_requested, requested_engine, resolve_engine
from .weights_io import as_numpy_f32, file_kind

if TYPE_CHECKING:
    import torch
    from torch import nn

#: The model a run uses when none is named.
DEFAULT_MODEL = "astromae-demo"


class Predictor:
    """A loaded model: ``predict(images [N,5,32,32], magnitudes [N,5]) -> float32 redshift [N]``.

    Rows whose image or magnitudes contain NaN/inf are not fed to the network: they come back as NaN and
    their row indices are in ``last_flagged`` (an int64 array, empty when every row was finite).
    """

    def __init__(self, name: str, module: nn.Module, device: str = "cpu", mode: str = "exact",
                 compile: bool | None = None, engine: str = "torch", threads: int | None = None):
        """``module`` run on ``engine`` (already chosen by :func:`load_model`: ``torch``, or ``onnxruntime`` for
        an AstroMAE module on CPU); an ONNX Runtime that cannot take it raises ``EngineUnavailable``."""
        import torch

        from .astromae.fast import prepare
        from .astromae.network import count_params

        self._init_common(name, device, mode, engine, count_params(module))
        self.module = module.eval()
        self._torch_device = torch.device(device)
        self._run = prepare(module, mode, self._torch_device, compile=compile_requested(compile), engine=engine,
                            threads=threads or torch.get_num_threads())
        # CUDA: predictions go through the feed (pinned staging, async copies on a side stream, large forwards,
        # optional CUDA graphs, one synchronisation per call); see astromae/cuda_feed.py. None on CPU.
        if self.engine == "torch" and self._torch_device.type == "cuda":
            from .astromae.cuda_feed import feed_for

            self._feed = feed_for(self._run, self._torch_device, mode)

    def _init_common(self, name: str, device: str, mode: str, engine: str, n_params: int) -> None:
        self.name, self.device, self.mode, self.engine = name, device, mode, engine
        self.n_params = int(n_params)
        self.last_flagged = np.zeros(0, dtype=np.int64)
        self.weights_sha256: str | None = None  # of the weights file read, when there was one
        self.card: dict[str, Any] = static_card(name)
        self.training_range: tuple[float, float] | None = None
        self._torch_device = None
        self._feed = None

    @property
    def forward_rows(self) -> int | None:
        """Rows per forward pass on CUDA (None on CPU, where ``batch_size`` and CPU_CHUNK decide)."""
        return self._feed.rows if getattr(self, "_feed", None) is not None else None

    def set_forward_rows(self, rows: int) -> None:
        """Override the CUDA forward size chosen from free memory (or ``CAI_CUDA_ROWS``); ignored on CPU."""
        if rows < 1:
            raise ModelError(f"forward rows must be >= 1, got {rows}")
        if getattr(self, "_feed", None) is not None:
            self._feed.rows = int(rows)

    def __repr__(self) -> str:
        return (f"Predictor(name={self.name!r}, device={self.device!r}, mode={self.mode!r}, "
                f"engine={self.engine!r}, n_params={self.n_params})")

    def predict(self, images: np.ndarray, magnitudes: np.ndarray, batch_size: int = 512) -> np.ndarray:
        """Redshifts for raw (un-normalised) inputs, in row order; non-finite rows -> NaN (see ``last_flagged``)."""
        images, magnitudes = check_inputs(images, magnitudes)
        if batch_size < 1:
            raise ModelError(f"batch_size must be >= 1, got {batch_size}")
        if getattr(self, "_feed", None) is not None:  # CUDA: forwards of ``forward_rows``, not batch_size
            out, self.last_flagged = self._feed.predict(images, magnitudes)
            return out
        n = images.shape[0]
        out = np.full(n, np.nan, dtype=np.float32)
        bad = ~np.isfinite(images.reshape(n, int(np.prod(images.shape[1:])))).all(axis=1) | ~np.isfinite(magnitudes).all(axis=1)
        self.last_flagged = np.flatnonzero(bad).astype(np.int64)
        rows = np.flatnonzero(~bad) if bad.any() else None
        # On CPU the torch engine computes in cache-sized chunks (same numbers, fewer cache misses on the
        # [chunk, 17, 768] activations; the ONNX Runtime engine chunks inside); batch_size stays the unit of I/O
        # and of the per-rank record.
        step = batch_size
        if self.engine == "torch" and self._torch_device.type == "cpu":
            step = min(batch_size, CPU_CHUNK.get(self.mode, batch_size))
        with _inference_mode(self.engine):
            for start in range(0, n if rows is None else rows.size, step):
                sel = slice(start, start + step) if rows is None else rows[start:start + step]
                img, mag = images[sel], magnitudes[sel]
                if self.engine == "onnxruntime":
                    out[sel] = self._run(np.ascontiguousarray(img), np.ascontiguousarray(mag))
                    continue
                x = _tensor(img).to(self._torch_device)
                m = _tensor(mag).to(self._torch_device)
                out[sel] = self._run(x, m).float().cpu().numpy()
        return out


#: Rows per forward pass on CPU, by mode: measured fastest on a 2-core AVX-512 machine (benchmarks/model_speed.py):
#: exact 534/s at 128 vs 451/s at 512; fast (int8 linears) is fastest at 512.
CPU_CHUNK = {"exact": 128, "fast": 512}


def _inference_mode(engine: str):
    if engine != "torch":
        return contextlib.nullcontext()
    import torch

    return torch.inference_mode()


def _tensor(arr: np.ndarray) -> torch.Tensor:
    """Zero-copy tensor of ``arr``; read-only arrays (memory-mapped partitions) are copied instead."""
    import torch

    return torch.from_numpy(arr) if arr.flags.writeable else torch.tensor(arr)


class _ExternalPredictor(Predictor):
    """Wraps a plug-in model object that already has ``predict``."""

    def __init__(self, name: str, obj: Any, device: str, mode: str):
        self._init_common(name, device, mode, "plugin", int(getattr(obj, "n_params", 0)))
        self._obj = obj
        self.training_range = parse_training_range(getattr(obj, "training_range", None), f"model '{name}'")
        self.card["training_range"] = _range_json(self.training_range)

    def predict(self, images: np.ndarray, magnitudes: np.ndarray, batch_size: int = 512) -> np.ndarray:
        images, magnitudes = check_inputs(images, magnitudes)
        out = np.asarray(self._obj.predict(images, magnitudes, batch_size=batch_size), dtype=np.float32)
        if out.shape != (images.shape[0],):
            raise ModelError(f"model '{self.name}' returned shape {out.shape}, expected [{images.shape[0]}]")
        self.last_flagged = np.asarray(getattr(self._obj, "last_flagged", np.flatnonzero(np.isnan(out))),
                                       dtype=np.int64)
        return out


def check_inputs(images: Any, magnitudes: Any) -> tuple[np.ndarray, np.ndarray]:
    """Validate and convert model inputs to float32 arrays; bad shapes raise ModelError naming the field."""
    images = as_numpy_f32(images, "images")
    magnitudes = as_numpy_f32(magnitudes, "magnitudes")
    if images.ndim != 4:
        raise ModelError(f"'images' has shape {tuple(images.shape)}, expected [N, 5, 32, 32]")
    if images.shape[1] != 5:
        raise ModelError(f"'images' has {images.shape[1]} bands (shape {tuple(images.shape)}), expected 5 (ugriz)")
    if images.shape[2:] != (32, 32):
        raise ModelError(f"'images' are {images.shape[2]}x{images.shape[3]} pixels, expected 32x32")
    if magnitudes.shape != (images.shape[0], 5):
        raise ModelError(f"'magnitudes' has shape {tuple(magnitudes.shape)}, expected [{images.shape[0]}, 5]")
    return images, magnitudes


def resolve_device(device: str) -> str:
    """Validate ``device``; an unknown or unavailable device raises ModelError naming it."""
    if device == "cpu":
        return device
    torch = need_torch(f"device '{device}'")
    try:
        dev = torch.device(device)
    except (RuntimeError, TypeError) as exc:
        raise ModelError(f"device '{device}' is not a valid torch device: {exc}") from exc
    if dev.type == "cuda" and not torch.cuda.is_available():
        raise ModelError(f"device '{device}' is not available (torch {torch.__version__} sees no CUDA GPU)")
    if dev.type == "cuda" and dev.index is not None and dev.index >= torch.cuda.device_count():
        raise ModelError(f"device '{device}' is not available ({torch.cuda.device_count()} CUDA device(s))")
    if dev.type not in ("cpu", "cuda"):
        raise ModelError(f"device '{device}' is not supported (use 'cpu' or 'cuda')")
    return device


def set_threads(threads: int | None) -> int:
    """Threads for the model (default: the CPUs this process may run on), set as torch's intra-op threads when
    torch is loaded; returns the count."""
    if threads is None:
        try:
            threads = len(os.sched_getaffinity(0))
        except AttributeError:  # not on Linux
            threads = os.cpu_count() or 1
    if threads < 1:
        raise ModelError(f"threads must be >= 1, got {threads}")
    torch = sys.modules.get("torch")  # set only where torch is loaded (the ONNX Runtime engine never loads it)
    if torch is not None and torch.get_num_threads() != threads:
        torch.set_num_threads(threads)
    return threads


def need_torch(what: str):
    """torch, or a ModelError saying that ``what`` needs the full install."""
    try:
        import torch
    except ImportError as exc:
        raise ModelError(f"{what} needs torch, which this install does not have (the worker install runs AstroMAE "
                         "on ONNX Runtime, on CPU): pip install 'cosmicai[full]'") from exc
    return torch


def weights_url(name: str, weights: str | None) -> str | None:
    """The weights file model ``name`` reads: ``weights``, else the one its registration names (None: none, or a
    model that reads no weights file)."""
    spec = get_spec(name)
    if not spec.reads_weights:
        return None
    return weights if weights is not None else spec.weights


def weights_sha256(name: str, weights: str | None) -> str | None:
    """sha256 of the weights model ``name`` would load (None for models without a weights file); a missing or
    unreadable file raises ModelError naming it."""
    url = weights_url(name, weights)
    return None if url is None else read_weights(url)[1]


def read_weights(url: str, sha256: str | None = None) -> tuple[bytes, str]:
    """``(bytes, sha256)`` of the weights at ``url``; with ``sha256`` they must still have that digest (a run's
    plan records it, so weights rewritten in place mid-run are refused instead of mixing two models in one
    result). ModelError naming the file otherwise."""
    from .. import storage

    try:
        data = storage.read_bytes(url)
    except Exception as exc:
        raise ModelError(f"cannot read weights '{url}': {exc}") from exc
    now = hashlib.sha256(data).hexdigest()
    if sha256 is not None and now != sha256:
        raise ModelError(f"weights '{url}' changed since the run was planned (sha256 {now[:12]}, the plan "
                         f"has {sha256[:12]}): restore them, or rerun with --overwrite to predict everything "
                         "with the new weights")
    return data, now


def load_model(name: str = DEFAULT_MODEL, weights: str | None = None, device: str = "cpu", mode: str = "exact",
               threads: int | None = None, compile: bool | None = None, engine: str | None = None,
               sha256: str | None = None) -> Predictor:
    """Load model ``name`` (see ``catalog.available_models()``) on ``device`` in ``mode`` ('exact' or 'fast').

    ``engine``: 'auto' (default, or ``$CAI_ENGINE``): ONNX Runtime for a model registered with it (AstroMAE) on
    CPU, torch otherwise; 'torch' or 'onnxruntime' to force one. ``threads``: CPU threads (default: every CPU
    this process may use). ``sha256``: the weights file must have this digest (see :func:`read_weights`)."""
    check_mode(mode)
    spec = get_spec(name)
    device = resolve_device(device)
    threads = set_threads(threads)
    compile = compile_requested(compile)
    requested = requested_engine(engine)
    url = weights_url(name, weights)
    if url is None and spec.needs_weights:
        raise ModelError(f"model '{name}' needs weights=URL of {spec.needs_weights}")
    factory = spec.load_factory()
    options: dict[str, Any] = {"weights": url, "device": device, "mode": mode, "threads": threads}
    if not spec.engines:  # a plug-in that runs itself, or an nn.Module run on torch
        return _as_predictor(spec, factory(**options), device, mode, threads, compile, requested)
    chosen = resolve_engine(requested, device.split(":")[0], "onnxruntime" in spec.engines, compile, name)
    try:
        obj = factory(**options, engine=chosen, compile=compile, sha256=sha256)
    except EngineUnavailable as exc:
        if chosen == "torch" or requested != "auto" or "torch" not in spec.engines or not has_torch():
            raise
        warnings.warn(f"ONNX Runtime engine unavailable ({exc}); running on torch instead", RuntimeWarning,
                      stacklevel=2)
        obj = factory(**options, engine="torch", compile=compile, sha256=sha256)
    return _as_predictor(spec, obj, device, mode, threads, compile, requested)


def has_torch() -> bool:
    """Whether torch can be imported here (the worker install runs AstroMAE without it)."""
    if "torch" in sys.modules:
        return True
    try:
        import torch  # noqa: F401
    except ImportError:
        return False
    return True


def _as_predictor(spec: ModelSpec, obj: Any, device: str, mode: str, threads: int, compile: bool, requested: str
                  ) -> Predictor:
    """The :class:`Predictor` of what factory ``name`` returned: itself, an ``nn.Module`` run on torch (the engine
    resolved here, once), or an object with ``predict``."""
    name = spec.name
    if isinstance(obj, Predictor):
        obj.name = name  # known by the name it was loaded as, with its registration's card when it has no file
        obj.card = {**obj.card, "model": name} if obj.weights_sha256 else {
            **static_card(name), "training_range": obj.card.get("training_range")}
        if spec.weights_origin and obj.card.get("url") and _same_file(obj.card["url"], spec.weights):
            obj.card["origin"] = spec.weights_origin
        return obj
    torch = sys.modules.get("torch")
    if torch is not None and isinstance(obj, torch.nn.Module):
        chosen = resolve_engine(requested, device.split(":")[0], False, compile, type(obj).__name__)
        pred = Predictor(name, obj, device, mode, compile, chosen, threads)
        pred.training_range = parse_training_range(getattr(obj, "training_range", None), f"model '{name}'")
        pred.card["training_range"] = _range_json(pred.training_range)
        return pred
    if callable(getattr(obj, "predict", None)):
        return _ExternalPredictor(name, obj, device, mode)
    raise ModelError(f"model factory '{name}' returned {type(obj).__name__}, which has no predict() and is not "
                     "an nn.Module")


#: Keys of a weights card (:func:`weights_card`) read from the weights' safetensors metadata or their JSON card.
CARD_KEYS = ("trained_on", "caveat", "training_range")


def static_card(name: str) -> dict[str, Any]:
    """The card of a model without a weights file: what its registration says (``card``), else "built-in"."""
    card: dict[str, Any] = {"model": name, "file": "built-in", "url": None, "sha256": None, "origin": "built-in",
                            "trained_on": None, "caveat": None, "training_range": None}
    spec = find_spec(name)
    if spec is not None:
        card.update({k: v for k, v in spec.card.items() if k in card})
    return card


def _registered_origin(url: str) -> str | None:
    """How a registration describes the weights at ``url`` when they are its default weights (the demo's)."""
    for spec in registered_specs():
        if spec.weights_origin and _same_file(url, spec.weights):
            return spec.weights_origin
    return None


def _same_file(url: str, other: str | None) -> bool:
    return bool(other) and os.path.abspath(url) == os.path.abspath(other)


def weights_card(name: str, url: str, data: bytes, sha256: str) -> dict[str, Any]:
    """What a run says about the weights it used: ``{"model", "file", "url", "sha256", "origin", "trained_on",
    "caveat", "training_range"}``.

    ``trained_on``, ``caveat`` and ``training_range`` come from the file's safetensors metadata, else from its
    JSON card beside it (``<stem>.json``, used only when its ``sha256`` is that of ``data``); ``origin`` says
    whether these are the shipped demo weights, weights imported from the authors' checkpoint (named) or other
    weights."""
    from .. import storage
    from .weights_io import read_safetensors_metadata

    meta: dict[str, Any] = {}
    if file_kind(data) == "safetensors":
        with contextlib.suppress(ModelError):
            meta = read_safetensors_metadata(data, url)
    side = _side_card(url, sha256)
    info = {k: meta.get(k) if meta.get(k) not in (None, "") else side.get(k) for k in CARD_KEYS}
    if isinstance(info["training_range"], str):
        with contextlib.suppress(ValueError):
            info["training_range"] = json.loads(info["training_range"])
    origin = _registered_origin(url)
    if origin is None and meta.get("imported_from"):
        origin = f"imported from the authors' checkpoint {storage.basename(str(meta['imported_from']))}"
    elif origin is None:
        origin = "weights from " + url
    return {"model": name, "file": storage.basename(url), "url": url, "sha256": sha256, "origin": origin, **info,
            "training_range": _range_json(parse_training_range(info["training_range"], url))}


def _side_card(url: str, sha256: str) -> dict[str, Any]:
    """The JSON card ``<stem>.json`` beside weights ``url`` when it exists and names these weights' sha256."""
    from .. import storage

    stem, ext = os.path.splitext(url)
    card_url = stem + ".json"
    if ext != ".safetensors":
        return {}
    try:
        if not storage.exists(card_url):
            return {}
        card = json.loads(storage.read_bytes(card_url))
    except (CaiError, ValueError, OSError):
        return {}
    return card if isinstance(card, dict) and card.get("sha256") == sha256 else {}


def parse_training_range(value: Any, source: str) -> tuple[float, float] | None:
    """``(z_min, z_max)`` from ``{"z_min": a, "z_max": b}`` or ``[a, b]`` (None stays None); anything else, or
    a range that is not finite and increasing, is a ModelError naming ``source``."""
    if value is None:
        return None
    try:
        lo, hi = (value["z_min"], value["z_max"]) if isinstance(value, dict) else value
        lo, hi = float(lo), float(hi)
    except (KeyError, TypeError, ValueError) as exc:
        raise ModelError(f"{source}: training_range {value!r} is not {{'z_min': a, 'z_max': b}} or [a, b]") from exc
    if not (math.isfinite(lo) and math.isfinite(hi) and lo < hi):
        raise ModelError(f"{source}: training_range {value!r} must be finite with z_min < z_max")
    return lo, hi


def _range_json(rng: tuple[float, float] | None) -> dict[str, float] | None:
    return None if rng is None else {"z_min": rng[0], "z_max": rng[1]}
