"""The torch side of AstroMAE weights: the :class:`Normalized` module, writing safetensors, loading a module."""

from __future__ import annotations

import json
from typing import Any

import torch
from torch import nn

from ..weights_io import NORM_KEY, InputNorm, check_state


class Normalized(nn.Module):
    """Wraps a network with :class:`InputNorm`: ``forward(raw images, raw magnitudes) -> redshift``."""

    def __init__(self, net: nn.Module, norm: InputNorm | None = None):
        super().__init__()
        norm = norm or InputNorm()
        self.net = net
        self.norm = norm
        self.register_buffer("img_off", torch.tensor(norm.image_offset, dtype=torch.float32).view(1, 5, 1, 1), False)
        self.register_buffer("img_inv", 1.0 / torch.tensor(norm.image_scale, dtype=torch.float32).view(1, 5, 1, 1),
                             False)
        self.register_buffer("mag_off", torch.tensor(norm.mag_offset, dtype=torch.float32).view(1, 5), False)
        self.register_buffer("mag_inv", 1.0 / torch.tensor(norm.mag_scale, dtype=torch.float32).view(1, 5), False)
        # 0-d tensors, not Python floats, so that an exported graph takes them as named initializers.
        self.register_buffer("out_scale", torch.tensor(norm.z_scale, dtype=torch.float32), False)
        self.register_buffer("out_offset", torch.tensor(norm.z_offset, dtype=torch.float32), False)
        self.identity = norm == InputNorm()

    def forward(self, images: torch.Tensor, magnitudes: torch.Tensor) -> torch.Tensor:
        if self.identity:
            return self.net(images, magnitudes)
        return self.regress(self.image_features(images), magnitudes)

    def image_features(self, images: torch.Tensor) -> torch.Tensor:
        """Raw images -> the network's ``image_features`` (needs an AstroMAE-like ``net``)."""
        if not self.identity:
            images = (images - self.img_off) * self.img_inv
            if self.norm.image_asinh:
                images = torch.asinh(images)
        return self.net.image_features(images)

    def regress(self, features: torch.Tensor, magnitudes: torch.Tensor) -> torch.Tensor:
        """``image_features`` + raw magnitudes -> redshift in the catalogue's units."""
        if self.identity:
            return self.net.regress(features, magnitudes)
        out = self.net.regress(features, (magnitudes - self.mag_off) * self.mag_inv)
        return out * self.out_scale + self.out_offset


def save_weights(state: dict[str, torch.Tensor], norm: InputNorm | None = None, dtype: torch.dtype | None = None,
                 extra_meta: dict[str, Any] | None = None) -> bytes:
    """Serialise a state dict to safetensors bytes; floating tensors are cast to ``dtype`` when given."""
    from safetensors.torch import save

    out = {}
    for key, t in state.items():
        t = t.detach().cpu()
        if dtype is not None and t.is_floating_point():
            if dtype == torch.float16 and t.abs().max().item() > 6e4:
                t = t.to(torch.float32)  # would overflow fp16
            else:
                t = t.to(dtype)
        out[key] = t.contiguous()
    meta = {NORM_KEY: (norm or InputNorm()).to_json(), "format": "cosmicai-model"}
    for k, v in (extra_meta or {}).items():
        meta[k] = v if isinstance(v, str) else json.dumps(v)
    return save(out, metadata=meta)


def load_into(model: nn.Module, state: dict[str, torch.Tensor], source: str = "weights") -> None:
    """Load ``state`` into ``model`` strictly; missing/unexpected keys or shape mismatches raise ModelError."""
    own = model.state_dict()
    check_state({k: tuple(v.shape) for k, v in own.items()}, state, source)
    model.load_state_dict({k: v.to(own[k].dtype) for k, v in state.items()}, strict=True)
