"""The factories of the shipped AstroMAE models (registered in ``__init__.py``) and reading AstroMAE weights."""

from __future__ import annotations

import os
from typing import TYPE_CHECKING, Any

import numpy as np

from ...errors import ModelError
from ..registry import Predictor, has_torch, need_torch, parse_training_range, read_weights, weights_card
from ..weights_io import NORM_KEY, InputNorm, file_kind, load_safetensors, refuse_kind
from .files import demo_weights_path

if TYPE_CHECKING:
    from .weights_torch import Normalized


def load_random(weights: str | None = None, device: str = "cpu", mode: str = "exact", threads: int | None = None,
                *, engine: str = "torch", compile: bool = False, sha256: str | None = None) -> Predictor:
    """``astromae-random``: seeded random initialisation (``weights`` is ignored)."""
    need_torch("model 'astromae-random'")
    from .network import build_astromae
    from .weights_torch import Normalized

    return Predictor("astromae-random", Normalized(build_astromae(seed=0)), device, mode, compile, engine, threads)


def load_weights(weights: str | None = None, device: str = "cpu", mode: str = "exact", threads: int | None = None,
                 *, engine: str = "torch", compile: bool = False, sha256: str | None = None) -> Predictor:
    """AstroMAE with the weights at URL ``weights`` (safetensors, a plain .pt state dict or the authors'
    checkpoint), checked against ``sha256`` when given; on ONNX Runtime (numpy weights bound to the shipped graph
    template, no torch) or torch."""
    if weights is None:
        raise ModelError("AstroMAE needs weights=URL of a safetensors file")
    name = "astromae"
    data, digest = read_weights(weights, sha256)
    if engine == "onnxruntime":
        raw, norm = read_weights_numpy(data, weights)
        pred: Predictor = OrtAstroMAE(name, raw, norm, mode, threads or 1, weights)
    else:
        need_torch(f"engine 'torch' (device {device}, compile={bool(compile)})")
        pred = Predictor(name, astromae_from_weights(data, weights), device, mode, compile, "torch", threads)
    pred.weights_sha256 = digest
    pred.card = weights_card(name, weights, data, digest)
    pred.training_range = parse_training_range(pred.card.get("training_range"), weights)
    return pred


def load_demo(weights: str | None = None, device: str = "cpu", mode: str = "exact", threads: int | None = None,
              **options: Any) -> Predictor:
    """``astromae-demo``: :func:`load_weights` with the shipped demo weights (or ``weights``)."""
    weights = weights or demo_weights_path()
    if weights == demo_weights_path() and not os.path.exists(weights):
        raise ModelError(f"demo weights {weights} are missing; train them with `cai model train-demo`")
    return load_weights(weights, device, mode, threads, **options)


class OrtAstroMAE(Predictor):
    """AstroMAE on ONNX Runtime from numpy weights (``raw``: its state dict), with no torch at all; ``module``
    (the plain torch module) is built only when asked for."""

    def __init__(self, name: str, raw: dict[str, np.ndarray], norm: InputNorm, mode: str = "exact",
                 threads: int = 1, source: str = "weights"):
        from .ort_engine import runner_for_weights, shipped_template

        self._weights = (raw, norm, source)
        self._init_common(name, "cpu", mode, "onnxruntime", shipped_template().n_params)
        self._run = runner_for_weights(raw, norm, mode, threads, source)

    def __getattr__(self, name: str) -> Any:
        if name == "module" and "_weights" in self.__dict__:
            import torch

            from .network import build_astromae
            from .weights_torch import Normalized, load_into

            raw, norm, source = self._weights
            net = build_astromae()
            load_into(net, {k: torch.from_numpy(np.array(v)) for k, v in raw.items()}, source)
            self.module = Normalized(net, norm).eval()
            return self.module
        raise AttributeError(f"{type(self).__name__!r} object has no attribute {name!r}")


def astromae_from_weights(data: bytes, source: str) -> Normalized:
    """AstroMAE loaded (fp32) from safetensors bytes, a plain state dict .pt, or the original checkpoint."""
    from .checkpoint import state_from_bytes
    from .network import build_astromae
    from .weights_torch import Normalized, load_into

    state, norm = state_from_bytes(data, source)
    net = build_astromae()
    load_into(net, state, source)
    return Normalized(net, norm).eval()


def read_weights_numpy(data: bytes, source: str = "weights") -> tuple[dict[str, np.ndarray], InputNorm]:
    """AstroMAE weights as numpy arrays (our safetensors names) and their input normalisation. Our safetensors
    files are read with numpy alone; anything else (the original checkpoint, a .pt state dict, safetensors in the
    authors' naming) goes through ``checkpoint.state_from_bytes``, which needs torch."""
    from .ort_engine import shipped_template

    kind = file_kind(data)
    refuse_kind(kind, data, source)
    if kind == "safetensors":
        tensors, meta = load_safetensors(data, source)
        if set(tensors) == set(shipped_template().state_shapes):
            return tensors, InputNorm.from_json(meta.get(NORM_KEY), source)
    if not has_torch():
        what = "safetensors weights in another naming" if kind == "safetensors" else "a torch checkpoint"
        raise ModelError(f"{source}: {what}; reading it needs torch, which this install does not have (convert "
                         "it once where torch is installed with `cai model import-cai`, which writes the "
                         "safetensors a worker reads)")
    from .checkpoint import state_from_bytes

    state, norm = state_from_bytes(data, source)
    return {k: v.detach().cpu().numpy() for k, v in state.items()}, norm

