"""Reading and writing AstroMAE weights as safetensors, with the input normalisation in the metadata."""

from __future__ import annotations

import json
import struct
from dataclasses import asdict, dataclass, field
from typing import Any

import numpy as np
import torch
from torch import nn

from ..errors import ModelError

NORM_KEY = "cosmicai.input_norm"


@dataclass
class InputNorm:
    """Affine input/output normalisation applied inside the predictor, so users feed raw partitions.

    images -> (images - image_offset[band]) / image_scale[band], then asinh if ``image_asinh``;
    magnitudes -> (magnitudes - mag_offset[band]) / mag_scale[band]; redshift = out * z_scale + z_offset.
    The identity (the default) is what the original AstroMAE checkpoint expects.
    """

    image_offset: list[float] = field(default_factory=lambda: [0.0] * 5)
    image_scale: list[float] = field(default_factory=lambda: [1.0] * 5)
    image_asinh: bool = False
    mag_offset: list[float] = field(default_factory=lambda: [0.0] * 5)
    mag_scale: list[float] = field(default_factory=lambda: [1.0] * 5)
    z_offset: float = 0.0
    z_scale: float = 1.0

    def to_json(self) -> str:
        return json.dumps(asdict(self))

    @classmethod
    def from_json(cls, text: str | None, source: str = "weights") -> InputNorm:
        if not text:
            return cls()
        try:
            data = json.loads(text)
            norm = cls(**data)
        except (ValueError, TypeError) as exc:
            raise ModelError(f"{source}: metadata '{NORM_KEY}' is not a valid input normalisation: {exc}") from exc
        for name in ("image_offset", "image_scale", "mag_offset", "mag_scale"):
            if len(getattr(norm, name)) != 5:
                raise ModelError(f"{source}: metadata '{NORM_KEY}' field '{name}' must have 5 values (one per band)")
        return norm


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
        self.z_offset = float(norm.z_offset)
        self.z_scale = float(norm.z_scale)
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
        return out * self.z_scale + self.z_offset


def read_safetensors_metadata(data: bytes, source: str = "weights") -> dict[str, str]:
    """The ``__metadata__`` of a safetensors blob (empty when absent)."""
    try:
        (n,) = struct.unpack("<Q", data[:8])
        header = json.loads(data[8:8 + n])
    except (struct.error, ValueError) as exc:
        raise ModelError(f"{source}: not a safetensors file ({exc})") from exc
    return dict(header.get("__metadata__") or {})


def load_safetensors(data: bytes, source: str = "weights") -> tuple[dict[str, torch.Tensor], dict[str, str]]:
    """Tensors and metadata of a safetensors blob; a corrupt blob raises ModelError naming ``source``."""
    from safetensors.torch import load

    meta = read_safetensors_metadata(data, source)
    try:
        tensors = load(data)
    except Exception as exc:  # safetensors raises its own SafetensorError
        raise ModelError(f"{source}: cannot read safetensors weights: {exc}") from exc
    return tensors, meta


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
    missing = sorted(set(own) - set(state))
    unexpected = sorted(set(state) - set(own))
    if missing or unexpected:
        raise ModelError(f"{source}: weights do not fit the model: {_keys('missing', missing)}"
                         f"{'; ' if missing and unexpected else ''}{_keys('unexpected', unexpected)}")
    wrong = [f"{k} {tuple(state[k].shape)} (expected {tuple(own[k].shape)})"
             for k in own if tuple(state[k].shape) != tuple(own[k].shape)]
    if wrong:
        raise ModelError(f"{source}: {len(wrong)} weight(s) have the wrong shape: {', '.join(wrong[:10])}")
    bad = [k for k, t in state.items() if t.is_floating_point() and not torch.isfinite(t).all()]
    if bad:
        raise ModelError(f"{source}: weight(s) contain NaN or inf: {', '.join(bad[:10])}")
    model.load_state_dict({k: v.to(own[k].dtype) for k, v in state.items()}, strict=True)


def _keys(kind: str, keys: list[str]) -> str:
    if not keys:
        return ""
    shown = ", ".join(keys[:20]) + (f", ... ({len(keys) - 20} more)" if len(keys) > 20 else "")
    return f"{len(keys)} {kind} key(s): {shown}"


def as_numpy_f32(arr: Any, name: str) -> np.ndarray:
    """``arr`` as a float32 numpy array (copy only when needed)."""
    if isinstance(arr, torch.Tensor):
        arr = arr.detach().cpu().numpy()
    if not isinstance(arr, np.ndarray):
        raise ModelError(f"'{name}' is {type(arr).__name__}, expected a numpy array")
    return np.ascontiguousarray(arr, dtype=np.float32)
