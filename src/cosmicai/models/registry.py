"""Model selection by name and the :class:`Predictor` every stage calls.

Names:

* ``astromae-demo`` — the shipped demo weights (``weights/astromae-demo.safetensors``, trained on synthetic
  galaxies; NOT the paper's SDSS weights), loaded in fp32.
* ``astromae`` — AstroMAE with your weights: ``weights=`` a URL (any storage URL) of a safetensors file
  (``cai model import-cai`` makes one from the original checkpoint), a plain ``.pt`` state dict, or the
  original pickled checkpoint (read with the restricted unpickler).
* ``astromae-random`` — seeded random initialisation, for tests and benchmarks only (predictions are meaningless).
* ``package.module:factory`` or a name registered in the ``cosmicai.models`` entry-point group: the factory is
  called as ``factory(weights=..., device=..., mode=..., threads=...)`` and returns an object with
  ``predict(images, magnitudes, batch_size)`` or an ``nn.Module`` taking ``(images, magnitudes)``.
"""

from __future__ import annotations

import importlib
import os
from collections.abc import Callable
from importlib import resources
from typing import Any

import numpy as np
import torch
from torch import nn

from ..errors import ModelError
from . import BUILTIN
from .astromae import build_astromae, count_params
from .fast import MODES, prepare
from .weights_io import Normalized, as_numpy_f32, load_into

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
        self.name = name
        self.device = device
        self.mode = mode
        self.module = module.eval()
        self.n_params = count_params(module)
        self.last_flagged = np.zeros(0, dtype=np.int64)
        self.weights_sha256: str | None = None  # of the weights file read, when there was one
        self._torch_device = torch.device(device)
        self.engine, self._run = prepare(module, mode, self._torch_device, compile=compile, engine=engine,
                                         threads=threads or torch.get_num_threads())
        # CUDA: predictions go through the feed (pinned staging, async copies on a side stream, large forwards,
        # optional CUDA graphs, one synchronisation per call); see cuda_feed.py. None on CPU.
        self._feed = None
        if self.engine == "torch" and self._torch_device.type == "cuda":
            from .cuda_feed import feed_for

            self._feed = feed_for(self._run, self._torch_device, mode)

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
        bad = ~np.isfinite(images.reshape(n, -1)).all(axis=1) | ~np.isfinite(magnitudes).all(axis=1)
        self.last_flagged = np.flatnonzero(bad).astype(np.int64)
        rows = np.flatnonzero(~bad) if bad.any() else None
        # On CPU the torch engine computes in cache-sized chunks (same numbers, fewer cache misses on the
        # [chunk, 17, 768] activations; the ONNX Runtime engine chunks inside); batch_size stays the unit of I/O
        # and of the per-rank record.
        step = batch_size
        if self.engine == "torch" and self._torch_device.type == "cpu":
            step = min(batch_size, CPU_CHUNK.get(self.mode, batch_size))
        with torch.inference_mode():
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


def _tensor(arr: np.ndarray) -> torch.Tensor:
    """Zero-copy tensor of ``arr``; read-only arrays (memory-mapped partitions) are copied instead."""
    return torch.from_numpy(arr) if arr.flags.writeable else torch.tensor(arr)


class _ExternalPredictor(Predictor):
    """Wraps a plug-in model object that already has ``predict``."""

    def __init__(self, name: str, obj: Any, device: str, mode: str):
        self.name, self.device, self.mode, self._obj = name, device, mode, obj
        self.engine = "plugin"
        self.n_params = int(getattr(obj, "n_params", 0))
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
    """Set torch's intra-op threads (default: the CPUs this process may run on); returns the count."""
    if threads is None:
        try:
            threads = len(os.sched_getaffinity(0))
        except AttributeError:  # not on Linux
            threads = os.cpu_count() or 1
    if threads < 1:
        raise ModelError(f"threads must be >= 1, got {threads}")
    if torch.get_num_threads() != threads:
        torch.set_num_threads(threads)
    return threads


def astromae_from_weights(data: bytes, source: str) -> Normalized:
    """AstroMAE loaded (fp32) from safetensors bytes, a plain state dict .pt, or the original checkpoint."""
    from .convert import state_from_bytes

    state, norm = state_from_bytes(data, source)
    net = build_astromae()
    load_into(net, state, source)
    return Normalized(net, norm).eval()


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
    if name == "astromae-random":
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
        pred = Predictor(name, astromae_from_weights(data, weights), device, mode, compile, engine, threads)
        pred.weights_sha256 = now
        return pred
    return _load_plugin(name, weights, device, mode, threads)


def _load_plugin(name: str, weights: str | None, device: str, mode: str, threads: int | None) -> Predictor:
    factory = _find_factory(name)
    obj = factory(weights=weights, device=device, mode=mode, threads=threads)
    if isinstance(obj, Predictor):
        return obj
    if isinstance(obj, nn.Module):
        return Predictor(name, obj, device, mode)
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
