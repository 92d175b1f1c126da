"""Model selection by name and the :class:`Predictor` every stage calls.

Names:

* ``astromae-demo`` — the shipped demo weights (``weights/astromae-demo.safetensors``, trained on synthetic
  galaxies; NOT the paper's SDSS weights), loaded in fp32. Their card ``weights/astromae-demo.json`` says what
  they were trained on and the redshift range of their training labels.
* ``astromae`` — AstroMAE with your weights: ``weights=`` a URL (any storage URL) of a safetensors file
  (``cai model import-cai`` makes one from the original checkpoint), a plain ``.pt`` state dict, or the
  original pickled checkpoint (read with the restricted unpickler).
* ``astromae-random`` — seeded random initialisation, for tests and benchmarks only (predictions are meaningless).
* ``package.module:factory`` or a name registered in the ``cosmicai.models`` entry-point group: the factory is
  called as ``factory(weights=..., device=..., mode=..., threads=...)`` and returns an object with
  ``predict(images, magnitudes, batch_size)`` or an ``nn.Module`` taking ``(images, magnitudes)``.

Every loaded predictor carries ``card`` (:func:`weights_card`: which weights, what they were trained on, any
caveat) and ``training_range`` (``(z_min, z_max)`` of the training labels, or None when the weights do not say).
"""

from __future__ import annotations

import contextlib
import importlib
import json
import math
import os
import sys
import warnings
from collections.abc import Callable
from importlib import resources
from typing import TYPE_CHECKING, Any

import numpy as np

from ..config import MODES
from ..errors import CaiError
from ..errors import ModelError
from .engines import BUILTIN, compile_requested, requested_engine, resolve_engine
from .weights_io import NORM_KEY, InputNorm, as_numpy_f32, file_kind, load_safetensors, refuse_kind

if TYPE_CHECKING:
    import torch
    from torch import nn

    from .weights_torch import Normalized

DEMO_NAME = "astromae-demo"
DEMO_FILE = "astromae-demo.safetensors"
ENTRY_POINT_GROUP = "cosmicai.models"


def demo_weights_path() -> str:
    """Path of the shipped demo weights file (it may not exist in a fresh checkout)."""
    return str(resources.files("cosmicai.models").joinpath("weights", DEMO_FILE))


class Predictor:
    """A loaded model: ``predict(images [N,5,32,32], magnitudes [N,5]) -> float32 redshift [N]``.

    Rows whose image or magnitudes contain NaN/inf are not fed to the network: they come back as NaN and
    their row indices are in ``last_flagged`` (an int64 array, empty when every row was finite).
    """

    def __init__(self, name: str, module: nn.Module, device: str = "cpu", mode: str = "exact",
                 compile: bool | None = None, engine: str | None = None, threads: int | None = None):
        import torch

        from .astromae import count_params
        from .fast import prepare

        self.name = name
        self.device = device
        self.mode = mode
        self.module = module.eval()
        self.n_params = count_params(module)
        self.last_flagged = np.zeros(0, dtype=np.int64)
        self.weights_sha256: str | None = None  # of the weights file read, when there was one
        self.card: dict[str, Any] = builtin_card(name)
        self.training_range: tuple[float, float] | None = None
        self._torch_device = torch.device(device)
        self.engine, self._run = prepare(module, mode, self._torch_device, compile=compile, engine=engine,
                                         threads=threads or torch.get_num_threads())
        # CUDA: predictions go through the feed (pinned staging, async copies on a side stream, large forwards,
        # optional CUDA graphs, one synchronisation per call); see cuda_feed.py. None on CPU.
        self._feed = None
        if self.engine == "torch" and self._torch_device.type == "cuda":
            from .cuda_feed import feed_for

            self._feed = feed_for(self._run, self._torch_device, mode)

    @classmethod
    def from_weights(cls, name: str, raw: dict[str, np.ndarray], norm: InputNorm, mode: str = "exact",
                     threads: int = 1, source: str = "weights") -> Predictor:
        """AstroMAE on ONNX Runtime from numpy weights (``raw``: its state dict), with no torch at all."""
        from .ort_engine import runner_for_weights, shipped_template

        self = cls.__new__(cls)
        self.name, self.device, self.mode = name, "cpu", mode
        self._weights = (raw, norm, source)  # for ``module``, built only when asked for
        self.engine = "onnxruntime"
        self.n_params = shipped_template().n_params
        self.last_flagged = np.zeros(0, dtype=np.int64)
        self.weights_sha256 = None
        self.card = builtin_card(name)
        self.training_range = None
        self._torch_device = None
        self._feed = None
        self._run = runner_for_weights(raw, norm, mode, threads, source)
        return self

    def __getattr__(self, name: str) -> Any:
        if name == "module" and "_weights" in self.__dict__:  # from_weights: the plain torch module, on demand
            from .astromae import build_astromae
            from .weights_torch import Normalized, load_into

            import torch

            raw, norm, source = self._weights
            net = build_astromae()
            load_into(net, {k: torch.from_numpy(np.array(v)) for k, v in raw.items()}, source)
            self.module = Normalized(net, norm).eval()
            return self.module
        raise AttributeError(f"{type(self).__name__!r} object has no attribute {name!r}")

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
        self.name, self.device, self.mode, self._obj = name, device, mode, obj
        self.engine = "plugin"
        self.n_params = int(getattr(obj, "n_params", 0))
        self.weights_sha256 = None
        self.training_range = parse_training_range(getattr(obj, "training_range", None), f"model '{name}'")
        self.card = {**builtin_card(name), "training_range": _range_json(self.training_range)}
        self.last_flagged = np.zeros(0, dtype=np.int64)

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
    torch = _torch(f"device '{device}'")
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


def _torch(what: str):
    """torch, or a ModelError saying that ``what`` needs the full install."""
    try:
        import torch
    except ImportError as exc:
        raise ModelError(f"{what} needs torch, which this install does not have (the worker install runs AstroMAE "
                         "on ONNX Runtime, on CPU): pip install 'cosmicai[full]'") from exc
    return torch


def astromae_from_weights(data: bytes, source: str) -> Normalized:
    """AstroMAE loaded (fp32) from safetensors bytes, a plain state dict .pt, or the original checkpoint."""
    from .astromae import build_astromae
    from .convert import state_from_bytes
    from .weights_torch import Normalized, load_into

    state, norm = state_from_bytes(data, source)
    net = build_astromae()
    load_into(net, state, source)
    return Normalized(net, norm).eval()


def read_weights_numpy(data: bytes, source: str = "weights") -> tuple[dict[str, np.ndarray], InputNorm]:
    """AstroMAE weights as numpy arrays (our safetensors names) and their input normalisation. Our safetensors
    files are read with numpy alone; anything else (the original checkpoint, a .pt state dict, safetensors in the
    authors' naming) goes through ``convert.read_checkpoint``, which needs torch."""
    from .ort_engine import shipped_template

    kind = file_kind(data)
    refuse_kind(kind, data, source)
    if kind == "safetensors":
        tensors, meta = load_safetensors(data, source)
        if set(tensors) == set(shipped_template().state_shapes):
            return tensors, InputNorm.from_json(meta.get(NORM_KEY), source)
    if not _has_torch():
        what = "safetensors weights in another naming" if kind == "safetensors" else "a torch checkpoint"
        raise ModelError(f"{source}: {what}; reading it needs torch, which this install does not have (convert "
                         "it once where torch is installed with `cai model import-cai`, which writes the "
                         "safetensors a worker reads)")
    from .convert import state_from_bytes

    state, norm = state_from_bytes(data, source)
    return {k: v.detach().cpu().numpy() for k, v in state.items()}, norm


def weights_url(name: str, weights: str | None) -> str | None:
    """The weights file model ``name`` reads (the shipped demo file for ``astromae-demo``), or None."""
    if weights is None and name == DEMO_NAME:
        return demo_weights_path()
    return weights


def weights_sha256(name: str, weights: str | None) -> str | None:
    """sha256 of the weights model ``name`` would load (None for models without a weights file); a missing or
    unreadable file raises ModelError naming it."""
    import hashlib

    from .. import storage

    url = weights_url(name, weights)
    if url is None or name == "astromae-random":
        return None
    try:
        return hashlib.sha256(storage.read_bytes(url)).hexdigest()
    except Exception as exc:
        raise ModelError(f"cannot read weights '{url}': {exc}") from exc


def load_model(name: str = DEMO_NAME, weights: str | None = None, device: str = "cpu", mode: str = "exact",
               threads: int | None = None, compile: bool | None = None, engine: str | None = None,
               sha256: str | None = None) -> Predictor:
    """Load model ``name`` (see the module docstring) on ``device`` in ``mode`` ('exact' or 'fast').

    ``engine``: 'auto' (default, or ``$CAI_ENGINE``): ONNX Runtime for AstroMAE on CPU, torch otherwise;
    'torch' or 'onnxruntime' to force one. ``threads``: CPU threads (default: every CPU this process may use).
    ``sha256``: the weights file must have this digest (a run's plan records it, so weights rewritten in place
    mid-run are refused instead of mixing two models in one result)."""
    if mode not in MODES:
        raise ModelError(f"mode '{mode}' is not known; choose one of {', '.join(MODES)}")
    device = resolve_device(device)
    threads = set_threads(threads)
    compile = compile_requested(compile)
    requested = requested_engine(engine)
    chosen = resolve_engine(requested, device.split(":")[0], True, compile)
    if name == "astromae-random":
        from .astromae import build_astromae
        from .weights_torch import Normalized

        _torch(f"model '{name}'")
        return Predictor(name, Normalized(build_astromae(seed=0)), device, mode, compile, engine, threads)
    if name in (DEMO_NAME, "astromae"):
        if weights is None:
            if name == "astromae":
                raise ModelError("model 'astromae' needs weights=URL of a safetensors file "
                                 "(make one from the original checkpoint with `cai model import-cai`)")
            weights = demo_weights_path()
            if not os.path.exists(weights):
                raise ModelError(f"demo weights {weights} are missing; train them with `cai model train-demo`")
        from .. import storage

        try:
            data = storage.read_bytes(weights)
        except Exception as exc:
            raise ModelError(f"cannot read weights '{weights}': {exc}") from exc
        import hashlib

        now = hashlib.sha256(data).hexdigest()
        if sha256 is not None and now != sha256:
            raise ModelError(f"weights '{weights}' changed since the run was planned (sha256 {now[:12]}, the plan "
                             f"has {sha256[:12]}): restore them, or rerun with --overwrite to predict everything "
                             "with the new weights")
        pred = None
        if chosen == "onnxruntime":  # numpy weights bound to the shipped graph template: no torch needed
            from .ort_engine import OrtUnavailable

            raw, norm = read_weights_numpy(data, weights)
            try:
                pred = Predictor.from_weights(name, raw, norm, mode, threads, weights)
            except OrtUnavailable as exc:
                if requested != "auto" or not _has_torch():
                    raise
                warnings.warn(f"ONNX Runtime engine unavailable ({exc}); running on torch instead", RuntimeWarning,
                              stacklevel=2)
        if pred is None:
            _torch(f"engine 'torch' (device {device}, compile={bool(compile)})")
            pred = Predictor(name, astromae_from_weights(data, weights), device, mode, compile, "torch", threads)
        pred.weights_sha256 = now
        pred.card = weights_card(name, weights, data, now)
        pred.training_range = parse_training_range(pred.card.get("training_range"), weights)
        return pred
    _torch(f"model '{name}'")
    return _load_plugin(name, weights, device, mode, threads)


def _has_torch() -> bool:
    try:
        import torch  # noqa: F401
    except ImportError:
        return False
    return True


def _load_plugin(name: str, weights: str | None, device: str, mode: str, threads: int | None) -> Predictor:
    from torch import nn

    factory = _find_factory(name)
    obj = factory(weights=weights, device=device, mode=mode, threads=threads)
    if isinstance(obj, Predictor):
        return obj
    if isinstance(obj, nn.Module):
        pred = Predictor(name, obj, device, mode)
        pred.training_range = parse_training_range(getattr(obj, "training_range", None), f"model '{name}'")
        pred.card["training_range"] = _range_json(pred.training_range)
        return pred
    if callable(getattr(obj, "predict", None)):
        return _ExternalPredictor(name, obj, device, mode)
    raise ModelError(f"model factory '{name}' returned {type(obj).__name__}, which has no predict() and is not "
                     "an nn.Module")


def _find_factory(name: str) -> Callable[..., Any]:
    if ":" in name:
        module_name, _, attr = name.partition(":")
        try:
            module = importlib.import_module(module_name)
        except ImportError as exc:
            raise ModelError(f"model '{name}': cannot import module '{module_name}': {exc}") from exc
        factory = getattr(module, attr, None)
        if not callable(factory):
            raise ModelError(f"model '{name}': module '{module_name}' has no callable '{attr}'")
        return factory
    from importlib.metadata import entry_points

    for ep in entry_points(group=ENTRY_POINT_GROUP):
        if ep.name == name:
            return ep.load()
    known = list(BUILTIN) + sorted(ep.name for ep in entry_points(group=ENTRY_POINT_GROUP))
    raise ModelError(f"model '{name}' is not known; choose one of {', '.join(known)} or give 'package.module:factory'")


#: Keys of a weights card (:func:`weights_card`) read from the weights' safetensors metadata or their JSON card.
CARD_KEYS = ("trained_on", "caveat", "training_range")


def builtin_card(name: str) -> dict[str, Any]:
    """The card of a model without a weights file (``astromae-random``, a plug-in that brings its own)."""
    card: dict[str, Any] = {"model": name, "file": "built-in", "url": None, "sha256": None, "origin": "built-in",
                            "trained_on": None, "caveat": None, "training_range": None}
    if name == "astromae-random":
        card.update(origin="seeded random initialisation", trained_on="nothing (untrained)",
                    caveat="random weights for tests and benchmarks: the predictions are meaningless")
    return card


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
    demo = name == DEMO_NAME or os.path.abspath(url) == os.path.abspath(demo_weights_path())
    if demo:
        origin = "the demo weights shipped with cosmicai"
    elif meta.get("imported_from"):
        origin = f"imported from the authors' checkpoint {storage.basename(str(meta['imported_from']))}"
    else:
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
