"""Inference preparation for the two modes.

* ``exact``: fp32 eval with mathematically equivalent rewrites only — BatchNorm folded into the preceding
  convolution, attention through ``scaled_dot_product_attention``, channels-last (NHWC) convolutions and
  pooling. Stays within 1e-6 of the
  straightforward module (tested).
* ``fast``: ``exact`` with the image branches' Linear layers (ViT blocks, ``head``, ``vit_mlp``,
  ``mix.inception_mlp``: 85% of the FLOPs) quantised to int8 dynamically (int8 weights, activations
  quantised per batch). The magnitude MLP and the fusion layers stay fp32: quantising them moved demo
  redshifts by up to 8e-3, the image branches by < 1e-3. On CPUs this was the best
  option measured (docs/model.md): bf16 autocast is 2x *slower* on CPUs without native bf16 (no AVX512-BF16 /
  AMX), and ``torch.compile`` costs ~40 CPU-seconds per process. On CUDA, fast is bf16 autocast instead.
  ``torch.compile`` is optional for either mode (``compile=True`` or ``CAI_COMPILE=1``): worth it for
  long-lived workers, not for a Lambda cold start.
"""

from __future__ import annotations

import copy
import os
from collections.abc import Callable

import torch
from torch import nn

from .astromae import AstroMAE, ConvBlock

MODES = ("exact", "fast")


def fold_batchnorm(model: nn.Module) -> nn.Module:
    """Fold every eval-mode ConvBlock's BatchNorm into its conv (in place); returns ``model``."""
    for module in model.modules():
        if isinstance(module, ConvBlock) and isinstance(module.bn, nn.BatchNorm2d):
            conv, bn = module.conv, module.bn
            scale = bn.weight.detach() / torch.sqrt(bn.running_var + bn.eps)
            fused = nn.Conv2d(conv.in_channels, conv.out_channels, conv.kernel_size, conv.stride, conv.padding,
                              bias=True).to(conv.weight.device)
            with torch.no_grad():
                fused.weight.copy_(conv.weight.detach() * scale.view(-1, 1, 1, 1))
                bias = conv.bias.detach() if conv.bias is not None else torch.zeros_like(bn.running_mean)
                fused.bias.copy_((bias - bn.running_mean) * scale + bn.bias.detach())
            module.conv = fused
            module.bn = nn.Identity()
    return model


def _set_fused(model: nn.Module, fused: bool) -> None:
    for module in model.modules():
        if isinstance(module, AstroMAE):
            module.set_fused_attention(fused)


def prepare(model: nn.Module, mode: str, device: torch.device, compile: bool | None = None
            ) -> Callable[[torch.Tensor, torch.Tensor], torch.Tensor]:
    """A callable ``(images, magnitudes) -> redshift`` for ``mode`` on ``device`` (a prepared copy of model)."""
    model = copy.deepcopy(model).eval().to(device)
    for p in model.parameters():
        p.requires_grad_(False)
    fold_batchnorm(model)
    _set_fused(model, True)
    # NHWC convolutions and pools: the Inception branch's 3x3 max-pools are ~4x faster (same numbers)
    model = model.to(memory_format=torch.channels_last)
    if compile is None:
        compile = os.environ.get("CAI_COMPILE", "") not in ("", "0", "false", "no")
    if mode == "exact":
        return torch.compile(model) if compile else model
    if device.type == "cuda":
        runner: Callable = torch.compile(model) if compile else model

        def fast_cuda(images: torch.Tensor, magnitudes: torch.Tensor) -> torch.Tensor:
            with torch.autocast(device_type="cuda", dtype=torch.bfloat16):
                return runner(images, magnitudes).float()

        return fast_cuda
    model = quantize_linear(model, INT8_PREFIXES)
    return torch.compile(model) if compile else model


#: Sub-modules (of AstroMAE) whose Linear layers ``fast`` runs in int8 on CPU.
INT8_PREFIXES = ("blocks.", "head", "vit_mlp.", "mix.inception_mlp.")


def quantize_linear(model: nn.Module, prefixes: tuple[str, ...]) -> nn.Module:
    """Dynamic int8 quantisation (CPU) of the nn.Linear layers of AstroMAE sub-modules named by ``prefixes``."""
    import warnings

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
