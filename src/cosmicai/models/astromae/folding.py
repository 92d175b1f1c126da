"""The inference rewrites of AstroMAE's weights, in numpy (no torch): what both engines run.

* ``fold_conv_bn``: an eval-mode BatchNorm folded into the convolution before it (fp32, as torch computes it).
* ``fold_linear``: two Linear layers with no activation between them merged into one (products in float64);
  ``fold_into_columns`` the branch outputs into the fusion layer (weight products in float32: see there).
* ``prepared_state``: a whole AstroMAE state dict with every fold applied (the layout of ``fast.prepare``'s
  module), plus the input normalisation as tensors.
* ``quantize_int8``: per-tensor symmetric int8 weights, the scheme of onnxruntime's dynamic quantiser (the
  ``fast`` ONNX graph's MatMul and Attention weights).

torch's ``fast.fold_batchnorm`` / ``fold_linear_chains`` call the same functions, so both engines see
bit-identical prepared weights.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import TYPE_CHECKING

import numpy as np

if TYPE_CHECKING:
    from ..weights_io import InputNorm

#: BatchNorm2d's default eps (AstroMAE's Inception blocks use it).
BN_EPS = 1e-5

#: The Linear chains ``fold_linear_chains`` merges, as (inner, outer) and the branch outputs folded into
#: ``fusion.0``, in the order of the concatenation.
HEAD_CHAIN = ("head", "vit_mlp.0")
BRANCH_OUTPUTS = ("vit_mlp.2", "mix.inception_mlp.2", "mix.mag_mlp.8")
FUSION = "fusion.0"


def fold_conv_bn(weight: np.ndarray, bias: np.ndarray | None, gamma: np.ndarray, beta: np.ndarray,
                 mean: np.ndarray, var: np.ndarray, eps: float = BN_EPS) -> tuple[np.ndarray, np.ndarray]:
    """``(weight, bias)`` of the convolution that equals conv followed by eval-mode BatchNorm (float32)."""
    f32 = np.float32
    scale = gamma.astype(f32) / np.sqrt(var.astype(f32) + f32(eps))
    w = weight.astype(f32) * scale.reshape(-1, *([1] * (weight.ndim - 1)))
    b = bias.astype(f32) if bias is not None else np.zeros_like(mean, dtype=f32)
    return w.astype(f32), ((b - mean.astype(f32)) * scale + beta.astype(f32)).astype(f32)


def fold_linear(outer_w: np.ndarray, outer_b: np.ndarray, inner_w: np.ndarray,
                inner_b: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """``outer(inner(x))`` as one Linear layer ``(weight, bias)``, computed in float64, returned as float32."""
    ow = outer_w.astype(np.float64)
    w = ow @ inner_w.astype(np.float64)
    b = ow @ inner_b.astype(np.float64) + outer_b.astype(np.float64)
    return w.astype(np.float32), b.astype(np.float32)


def fold_into_columns(outer_w: np.ndarray, outer_b: np.ndarray,
                      parts: list[tuple[np.ndarray, np.ndarray]]) -> tuple[np.ndarray, np.ndarray]:
    """``outer(concat(l1(x1), l2(x2), ...))`` as one Linear on ``concat(x1, x2, ...)``: each ``(weight, bias)`` of
    ``parts`` folded into its block of ``outer``'s columns.

    The weight products are float32 (sgemm): for AstroMAE's fusion layer they are 3.5 GMAC, 0.04 s in float32
    against 0.3 s in float64 on 2 cores, once per process, which is most of a cold start. They differ from the
    float64 products by < 5e-7 of the largest weight, the rounding an unfolded fp32 forward makes anyway. The
    biases (matrix-vector) stay float64."""
    wf, bias = np.asarray(outer_w, np.float32), outer_b.astype(np.float64)
    blocks, col = [], 0
    for w, b in parts:
        block = wf[:, col:col + w.shape[0]]
        col += w.shape[0]
        blocks.append(block @ np.asarray(w, np.float32))
        bias = bias + block.astype(np.float64) @ b.astype(np.float64)
    return np.concatenate(blocks, axis=1).astype(np.float32), bias.astype(np.float32)


def prepared_state(state: Mapping[str, np.ndarray], prefix: str = "net.") -> dict[str, np.ndarray]:
    """AstroMAE weights (``state``: its state dict, keys as in our safetensors files) with every fold applied,
    keyed as the prepared module's state dict (``prefix`` + name); float32, C-contiguous."""
    out = {k: np.asarray(v) for k, v in state.items() if not k.endswith(".num_batches_tracked")}
    for key in [k for k in out if k.endswith(".bn.running_var")]:
        block = key[: -len(".bn.running_var")]
        bn = {p: out.pop(f"{block}.bn.{p}") for p in ("weight", "bias", "running_mean", "running_var")}
        w, b = fold_conv_bn(out[f"{block}.conv.weight"], out.get(f"{block}.conv.bias"), bn["weight"], bn["bias"],
                            bn["running_mean"], bn["running_var"])
        out[f"{block}.conv.weight"], out[f"{block}.conv.bias"] = w, b

    def take(name: str) -> tuple[np.ndarray, np.ndarray]:
        return out.pop(f"{name}.weight"), out.pop(f"{name}.bias")

    inner, outer = HEAD_CHAIN
    inner_wb, outer_wb = take(inner), take(outer)
    out[f"{outer}.weight"], out[f"{outer}.bias"] = fold_linear(*outer_wb, *inner_wb)
    parts = [take(name) for name in BRANCH_OUTPUTS]
    fusion = take(FUSION)
    out[f"{FUSION}.weight"], out[f"{FUSION}.bias"] = fold_into_columns(*fusion, parts)
    return {prefix + k: np.require(v, np.float32, "C") for k, v in out.items()}


def norm_state(norm: InputNorm) -> dict[str, np.ndarray]:
    """The input normalisation as the tensors ``weights_io.Normalized`` holds (float32)."""
    f32 = np.float32
    return {
        "img_off": np.asarray(norm.image_offset, f32).reshape(1, 5, 1, 1),
        "img_inv": (f32(1.0) / np.asarray(norm.image_scale, f32)).reshape(1, 5, 1, 1),
        "mag_off": np.asarray(norm.mag_offset, f32).reshape(1, 5),
        "mag_inv": (f32(1.0) / np.asarray(norm.mag_scale, f32)).reshape(1, 5),
        "out_scale": np.asarray(norm.z_scale, f32),
        "out_offset": np.asarray(norm.z_offset, f32),
    }


def quantize_int8(weight: np.ndarray) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """``(int8 weights, scale, zero point)`` of per-tensor symmetric int8 quantisation, bit for bit what
    onnxruntime's ``quantize_dynamic`` (QInt8 weights) computes: scale = max|w| / 127 (rounded from float64),
    q = clip(round(w / scale), -128, 127), zero point 0. ``onnx_export.build_template`` checks the equality."""
    w = np.asarray(weight, dtype=np.float32)
    rmin = np.minimum(w.min(), np.float32(0))
    rmax = np.maximum(w.max(), np.float32(0))
    absmax = np.maximum(np.abs(rmin), np.abs(rmax))
    scale64 = (np.float64(absmax) - np.float64(-absmax)) / (np.float64(127) - np.float64(-127))
    scale = np.float32(1.0) if scale64 < np.finfo(np.float32).tiny else np.float32(scale64)
    q = np.round(w / scale)
    np.clip(q, -128, 127, out=q)
    return q.astype(np.int8), np.asarray(scale, np.float32), np.asarray(0, np.int8)
