"""Reading AstroMAE weights (safetensors, with the input normalisation in the metadata) without torch.

The torch side (the ``Normalized`` module, writing weights, loading into a module) is ``weights_torch.py``.
"""

from __future__ import annotations

import json
import struct
from collections.abc import Mapping
from dataclasses import asdict, dataclass, field
from typing import Any

import numpy as np

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


def read_safetensors_metadata(data: bytes, source: str = "weights") -> dict[str, str]:
    """The ``__metadata__`` of a safetensors blob (empty when absent)."""
    try:
        (n,) = struct.unpack("<Q", data[:8])
        header = json.loads(data[8:8 + n])
    except (struct.error, ValueError) as exc:
        raise ModelError(f"{source}: not a safetensors file ({exc})") from exc
    return dict(header.get("__metadata__") or {})


def load_safetensors(data: bytes, source: str = "weights", framework: str = "numpy"
                     ) -> tuple[dict[str, Any], dict[str, str]]:
    """Tensors and metadata of a safetensors blob, as numpy arrays (``framework="numpy"``) or torch tensors
    (``"torch"``); a corrupt blob raises ModelError naming ``source``."""
    import importlib

    load = importlib.import_module(f"safetensors.{framework}").load
    meta = read_safetensors_metadata(data, source)
    try:
        tensors = load(data)
    except Exception as exc:  # safetensors raises its own SafetensorError
        raise ModelError(f"{source}: cannot read safetensors weights: {exc}") from exc
    return tensors, meta


#: ``torch.save``'s legacy (pre-1.6, non-zip) files start with this number, pickled with protocol 2.
_LEGACY_MAGIC = 0x1950A86A20F9469CFC6C
USE_WEIGHTS = ("give the safetensors file written by `cai model import-cai`, or the authors' .pt checkpoint "
        "(Mixed_Inception_z_VITAE_Base_Img_Full_New_Full.pt)")


def file_kind(data: bytes) -> str:
    """What a weights file is, from its first bytes: 'empty', 'safetensors', 'safetensors-truncated',
    'torch-zip', 'torch-legacy', 'pickle' or 'unknown'."""
    if not data:
        return "empty"
    if data[:4] == b"PK\x03\x04":
        return "torch-zip"
    if data[:4] == b"\x80\x02\x8a\x0a" and int.from_bytes(data[4:14], "little") == _LEGACY_MAGIC:
        return "torch-legacy"
    if len(data) > 1 and data[0] == 0x80 and 2 <= data[1] <= 5:
        return "pickle"
    if len(data) >= 9 and data[8:9] == b"{":
        n = int.from_bytes(data[:8], "little")
        return "safetensors" if n <= len(data) - 8 else "safetensors-truncated"
    return "unknown"


def refuse_kind(kind: str, data: bytes, source: str) -> None:
    """Raise the ModelError that says what the file is and what to do, for kinds that hold no weights."""
    if kind == "empty":
        raise ModelError(f"{source}: the file is empty (0 bytes), not a checkpoint; the copy or download was "
                         "probably interrupted: fetch it again")
    if kind == "safetensors-truncated":
        n = int.from_bytes(data[:8], "little")
        raise ModelError(f"{source}: truncated safetensors file (its header needs {n} bytes, the file has "
                         f"{len(data) - 8} after the length field); the copy is incomplete: fetch it again")
    if kind == "torch-legacy":
        raise ModelError(f"{source}: a legacy (torch < 1.6, non-zip) checkpoint; reading one needs full "
                         "unpickling, which cosmicai never does. In a trusted environment, re-save it in the zip "
                         "format with torch >= 1.6 (torch.save(torch.load(path, weights_only=False), new_path)), "
                         "then import that")
    if kind == "pickle":
        raise ModelError(f"{source}: a raw Python pickle, not a torch checkpoint or safetensors weights; refused "
                         f"unread (nothing was executed); {USE_WEIGHTS}")
    if kind == "unknown":
        raise ModelError(f"{source}: not a checkpoint: neither safetensors weights, a torch zip checkpoint nor a "
                         f"pickle (first bytes {data[:8]!r}); {USE_WEIGHTS}")


def check_state(expected: Mapping[str, tuple[int, ...]], state: Mapping[str, Any], source: str = "weights") -> None:
    """``state`` (name -> tensor or array) must have exactly the names and shapes of ``expected`` and finite
    floating values; otherwise ModelError naming every missing, unexpected or wrong-shape tensor."""
    missing = sorted(set(expected) - set(state))
    unexpected = sorted(set(state) - set(expected))
    if missing or unexpected:
        raise ModelError(f"{source}: weights do not fit the model: {_keys('missing', missing)}"
                         f"{'; ' if missing and unexpected else ''}{_keys('unexpected', unexpected)}")
    wrong = [f"{k} {tuple(state[k].shape)} (expected {tuple(expected[k])})"
             for k in expected if tuple(state[k].shape) != tuple(expected[k])]
    if wrong:
        raise ModelError(f"{source}: {len(wrong)} tensor(s) with the wrong shape: {', '.join(wrong[:10])}")
    bad = [k for k, t in state.items() if _floating(t) and not np.isfinite(_as_array(t)).all()]
    if bad:
        raise ModelError(f"{source}: weight(s) contain NaN or inf: {', '.join(bad[:10])}")


def _floating(t: Any) -> bool:
    return bool(t.is_floating_point()) if hasattr(t, "is_floating_point") else np.issubdtype(t.dtype, np.floating)


def _as_array(t: Any) -> np.ndarray:
    return t.detach().cpu().float().numpy() if hasattr(t, "detach") else np.asarray(t)


def _keys(kind: str, keys: list[str]) -> str:
    if not keys:
        return ""
    shown = ", ".join(keys[:20]) + (f", ... ({len(keys) - 20} more)" if len(keys) > 20 else "")
    return f"{len(keys)} {kind} key(s): {shown}"


def as_numpy_f32(arr: Any, name: str) -> np.ndarray:
    """``arr`` as a float32 numpy array (copy only when needed); torch tensors are accepted."""
    if type(arr).__module__.startswith("torch") and hasattr(arr, "detach"):
        arr = arr.detach().cpu().numpy()
    if not isinstance(arr, np.ndarray):
        raise ModelError(f"'{name}' is {type(arr).__name__}, expected a numpy array")
    return np.ascontiguousarray(arr, dtype=np.float32)
