"""Inference preparation for the two modes, on two engines.

Both modes start from the same rewrites, all mathematically exact: BatchNorm folded into its conv, Linear layers
with no activation between them merged (``fold_linear_chains``), attention through one fused kernel.

* ``exact``: fp32. Within 1e-6 of the straightforward module on either engine (tested).
* ``fast``: the ViT blocks' matrix products in int8 (dynamic quantisation: int8 weights, activations quantised
  per call); everything else fp32. Quantising the magnitude MLP, the fusion layers or the convolutions moved demo
  redshifts by 6e-4 to 2e-2 (and the bias by 6%), the ViT blocks by < 1e-5.

Engines (``choose_engine``): on CPU, AstroMAE runs on ONNX Runtime (``ort_engine.py``: fused attention, streams,
2.0-2.6x / 3.2-4.2x the original loop here) when it is installed; torch (``scaled_dot_product_attention``, channels-last
convolutions, ``torch.ao`` dynamic int8 Linear layers) runs everything else: CUDA (``cuda_feed.py``: exact is
fp32 with TF32 off, ``fast`` fp16 autocast), plug-in modules, and ``compile=True`` / ``CAI_COMPILE=1``
(``torch.compile``: ~40 CPU-seconds per process, worth it only for long-lived workers). ``engine=`` or
``CAI_ENGINE`` forces one. bf16 on CPU was measured 2x *slower* here (no AVX512-BF16/AMX); see docs/model.md for
every alternative measured.
"""

from __future__ import annotations

import copy
import warnings
from collections.abc import Callable

import torch
from torch import nn

from ...errors import ModelError
from . import folding
from ..modes import resolve_engine
from .network import AstroMAE, ConvBlock



def _np(t: torch.Tensor | None):
    return None if t is None else t.detach().cpu().numpy()


def _param(arr, device: torch.device) -> torch.Tensor:
    return torch.from_numpy(arr).to(device)


def fold_batchnorm(model: nn.Module) -> nn.Module:
    """Fold every eval-mode ConvBlock's BatchNorm into its conv (in place, ``folding.fold_conv_bn``); returns
    ``model``."""
    for module in model.modules():
        if isinstance(module, ConvBlock) and isinstance(module.bn, nn.BatchNorm2d):
            conv, bn = module.conv, module.bn
            w, b = folding.fold_conv_bn(_np(conv.weight), _np(conv.bias), _np(bn.weight), _np(bn.bias),
                                        _np(bn.running_mean), _np(bn.running_var), bn.eps)
            fused = nn.Conv2d(conv.in_channels, conv.out_channels, conv.kernel_size, conv.stride, conv.padding,
                              bias=True).to(conv.weight.device)
            with torch.no_grad():
                fused.weight.copy_(_param(w, conv.weight.device))
                fused.bias.copy_(_param(b, conv.weight.device))
            module.conv = fused
            module.bn = nn.Identity()
    return model


def _linear(weight, bias, device: torch.device) -> nn.Linear:
    layer = nn.Linear(weight.shape[1], weight.shape[0]).to(device)
    with torch.no_grad():
        layer.weight.copy_(_param(weight, device))
        layer.bias.copy_(_param(bias, device))
    return layer


def fold_linear_chains(model: nn.Module) -> nn.Module:
    """Merge Linear layers with no activation between them (in place, ``folding.fold_linear`` and
    ``fold_into_columns``); returns ``model``.

    ``head`` is folded into ``vit_mlp[0]``, and the last Linear of each branch (``vit_mlp[2]``,
    ``mix.inception_mlp[2]``, ``mix.mag_mlp[8]``) into the matching columns of ``fusion[0]``: the same maths with
    6.9 MFLOP (3%) less per image and three fewer weight matrices to read."""
    for net in model.modules():
        if not isinstance(net, AstroMAE) or isinstance(net.head, nn.Identity):
            continue
        device = net.head.weight.device
        head, first = net.head, net.vit_mlp[0]
        w, b = folding.fold_linear(_np(first.weight), _np(first.bias), _np(head.weight), _np(head.bias))
        net.vit_mlp[0], net.head = _linear(w, b, device), nn.Identity()
        parts = []
        for seq in (net.vit_mlp, net.mix.inception_mlp, net.mix.mag_mlp):  # the order of the concatenation
            parts.append((_np(seq[-1].weight), _np(seq[-1].bias)))
            seq[-1] = nn.Identity()
        fusion = net.fusion[0]
        w, b = folding.fold_into_columns(_np(fusion.weight), _np(fusion.bias), parts)
        net.fusion[0] = _linear(w, b, device)
    return model


def _set_fused(model: nn.Module, fused: bool) -> None:
    for module in model.modules():
        if isinstance(module, AstroMAE):
            module.set_fused_attention(fused)


def choose_engine(model: nn.Module, device: torch.device, engine: str | None = None, compile: bool = False) -> str:
    """The engine that would run ``model`` (an AstroMAE module has both; anything else runs on torch):
    ``engine`` (default ``$CAI_ENGINE`` or ``auto``) resolved."""
    return resolve_engine(engine, device.type, isinstance(getattr(model, "net", None), AstroMAE), compile,
                          type(getattr(model, "net", model)).__name__)


def prepare(model: nn.Module, mode: str, device: torch.device, compile: bool = False, engine: str = "torch",
            threads: int = 1) -> Callable:
    """The runner of ``mode`` on ``device`` for ``engine`` (already chosen: ``torch`` or ``onnxruntime``), from a
    prepared copy of ``model``.

    The torch runner maps tensors ``(images, magnitudes) -> redshift``; the ONNX Runtime runner maps float32
    numpy arrays and runs on ``threads`` streams. ONNX Runtime failing to take the model raises
    :class:`OrtUnavailable` (the caller may fall back to torch); weights wrong on every engine, ModelError."""
    if engine == "onnxruntime":
        from .ort_engine import OrtUnavailable, runner_for_weights

        try:
            raw = {k: v.detach().cpu().numpy() for k, v in model.net.state_dict().items()}
            return runner_for_weights(raw, model.norm, mode, threads)
        except ModelError:
            raise
        except Exception as exc:
            raise OrtUnavailable(f"engine 'onnxruntime' failed: {exc}") from exc
    model = copy.deepcopy(model).eval().to(device)
    for p in model.parameters():
        p.requires_grad_(False)
    fold_batchnorm(model)
    fold_linear_chains(model)
    _set_fused(model, True)
    # NHWC convolutions and pools: the Inception branch's 3x3 max-pools are ~4x faster (same numbers)
    model = model.to(memory_format=torch.channels_last)
    if device.type == "cuda":
        # exact: fp32 with TF32 off; fast: fp16 (or CAI_CUDA_FAST_DTYPE=bf16) autocast; compile: torch.compile
        # mode "reduce-overhead". The predictor feeds it through cuda_feed.DeviceFeed.
        from .cuda_feed import cuda_runner

        return cuda_runner(model, mode, compile=bool(compile))
    if mode == "exact":
        return torch.compile(model) if compile else model
    model = quantize_linear(model, INT8_PREFIXES)
    return torch.compile(model) if compile else model


#: Sub-modules (of AstroMAE) whose Linear layers ``fast`` runs in int8 on CPU.
INT8_PREFIXES = ("blocks.", "head", "vit_mlp.", "mix.inception_mlp.")


def quantize_linear(model: nn.Module, prefixes: tuple[str, ...]) -> nn.Module:
    """Dynamic int8 quantisation (CPU) of the nn.Linear layers of AstroMAE sub-modules named by ``prefixes``."""
    from torch.ao.quantization import quantize_dynamic

    chosen = set()
    for name, module in model.named_modules():
        if isinstance(module, AstroMAE):
            base = f"{name}." if name else ""
            chosen |= {base + n for n, m in module.named_modules()
                       if isinstance(m, nn.Linear) and n.startswith(prefixes)}
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # torch.ao's deprecation notice; the API still works here
        return quantize_dynamic(model, chosen, dtype=torch.qint8)
