"""Import of the original AstroMAE checkpoint without executing it.

The original ``Mixed_Inception_z_VITAE_Base_Img_Full_New_Full.pt`` is a whole model pickled by ``torch.save``
inside ``torch.nn.DataParallel``. We read the zip ourselves and unpickle ``data.pkl`` with a restricted
unpickler: only the original model classes (``blocks.model_vit_inception.ViT_Astro``, ``blocks.photoz.*``),
timm 0.4.12's ViT parts, ``torch.nn`` module classes, torch's tensor/storage rebuild functions and a few
builtins are allowed, and every class is replaced by a neutral stand-in that only collects its state. Any
other global raises :class:`~cosmicai.errors.UnsafePickleError` naming it, before anything is executed.

The state dict is then taken from the stand-ins (the same walk ``nn.Module.state_dict`` does), ``module.`` is
stripped, and keys are mapped onto ours: equal names directly (the ViT keeps timm's names), the rest in
order where the shapes agree.
"""

from __future__ import annotations

import io
import pickle
import zipfile
from collections import OrderedDict
from typing import Any

import torch

from ..errors import ModelError, UnsafePickleError
from .weights_io import InputNorm, load_safetensors

#: The original model's own classes, and timm 0.4.12 classes it contains (module -> class names).
ORIGINAL_CLASSES: dict[str, set[str]] = {
    "blocks.model_vit_inception": {"ViT_Astro"},
    "blocks.photoz": {"Input_Mix_Model", "InceptionBlock", "ConvBlock"},
    "timm.models.vision_transformer": {"Block", "Attention", "Mlp", "VisionTransformer"},
    "timm.models.layers.patch_embed": {"PatchEmbed"},
    "timm.models.layers.mlp": {"Mlp"},
    "timm.models.layers.drop": {"DropPath"},
}

_STORAGE_DTYPES = {
    "FloatStorage": torch.float32, "DoubleStorage": torch.float64, "HalfStorage": torch.float16,
    "BFloat16Storage": torch.bfloat16, "LongStorage": torch.int64, "IntStorage": torch.int32,
    "ShortStorage": torch.int16, "CharStorage": torch.int8, "ByteStorage": torch.uint8, "BoolStorage": torch.bool,
}


class StandIn:
    """Neutral replacement for a pickled class: records the class path and the pickled state only."""

    _cls_path = "?"

    def __init__(self, *args: Any, **kwargs: Any):
        self._args = args

    def __setstate__(self, state: Any) -> None:
        if isinstance(state, tuple) and len(state) == 2:  # (dict state, slot state)
            state = {**(state[0] or {}), **(state[1] or {})}
        if isinstance(state, dict):
            self.__dict__.update(state)
        else:
            self._state = state

    def __repr__(self) -> str:
        return f"<stand-in {self._cls_path}>"


_stand_ins: dict[str, type] = {}


def _stand_in(module: str, name: str) -> type:
    path = f"{module}.{name}"
    if path not in _stand_ins:
        _stand_ins[path] = type(name, (StandIn,), {"_cls_path": path})
    return _stand_ins[path]


def _is_torch_module_class(module: str, name: str) -> bool:
    if not (module.startswith("torch.nn.modules.") or module == "torch.nn.parallel.data_parallel"):
        return False
    obj = getattr(torch.nn, name, None)
    return isinstance(obj, type) and issubclass(obj, torch.nn.Module) and obj.__module__ == module


def _rebuild_tensor(storage: torch.Tensor, offset: int, size: tuple, stride: tuple, *unused: Any) -> torch.Tensor:
    return torch.as_strided(storage, size, stride, offset).clone()


def _rebuild_parameter(data: torch.Tensor, *unused: Any) -> torch.Tensor:
    return data


def _device(*args: Any) -> str:
    return ":".join(str(a) for a in args)


class _RestrictedUnpickler(pickle.Unpickler):
    def __init__(self, data: bytes, load_storage: Any, source: str):
        super().__init__(io.BytesIO(data))
        self._load_storage = load_storage
        self._source = source

    def find_class(self, module: str, name: str) -> Any:
        if name in ORIGINAL_CLASSES.get(module, ()) or _is_torch_module_class(module, name):
            return _stand_in(module, name)
        if module == "torch._utils" and name in ("_rebuild_tensor_v2", "_rebuild_tensor"):
            return _rebuild_tensor
        if module == "torch._utils" and name in ("_rebuild_parameter", "_rebuild_parameter_with_state"):
            return _rebuild_parameter
        if module == "torch" and name in _STORAGE_DTYPES:
            return _STORAGE_DTYPES[name]
        if module == "torch" and name == "device":
            return _device
        if module == "collections" and name == "OrderedDict":
            return OrderedDict
        if module in ("builtins", "__builtin__") and name in ("set", "frozenset", "dict", "list", "tuple"):
            return {"set": set, "frozenset": frozenset, "dict": dict, "list": list, "tuple": tuple}[name]
        raise UnsafePickleError(f"{self._source}: refusing to unpickle global '{module}.{name}' "
                                "(not one of the original AstroMAE classes, torch.nn modules or tensor rebuilds)")

    def persistent_load(self, pid: Any) -> Any:
        if not (isinstance(pid, tuple) and pid and pid[0] == "storage"):
            raise UnsafePickleError(f"{self._source}: unsupported persistent id {pid!r:.80}")
        _, dtype, key, _location, numel = pid
        if not isinstance(dtype, torch.dtype):
            raise UnsafePickleError(f"{self._source}: unsupported storage type {dtype!r:.80}")
        return self._load_storage(str(key), dtype, int(numel))


def unpickle_checkpoint(data: bytes, source: str = "checkpoint") -> Any:
    """Unpickle a torch.save zip archive with the restricted unpickler; returns the stand-in object tree."""
    try:
        zf = zipfile.ZipFile(io.BytesIO(data))
        names = zf.namelist()
    except zipfile.BadZipFile as exc:
        raise ModelError(f"{source}: not a torch zip checkpoint ({exc}); legacy non-zip checkpoints are not "
                         "supported, re-save it with torch >= 1.6") from exc
    pkl = [n for n in names if n.endswith("/data.pkl") or n == "data.pkl"]
    if not pkl:
        raise ModelError(f"{source}: no data.pkl inside the checkpoint archive")
    prefix = pkl[0][: -len("data.pkl")]
    cache: dict[str, torch.Tensor] = {}

    def load_storage(key: str, dtype: torch.dtype, numel: int) -> torch.Tensor:
        if key not in cache:
            try:
                raw = zf.read(f"{prefix}data/{key}")
            except KeyError as exc:
                raise ModelError(f"{source}: storage '{key}' is missing from the archive") from exc
            flat = torch.frombuffer(bytearray(raw), dtype=dtype) if raw else torch.empty(0, dtype=dtype)
            if flat.numel() != numel:
                raise ModelError(f"{source}: storage '{key}' holds {flat.numel()} elements, expected {numel}")
            cache[key] = flat
        return cache[key]

    try:
        return _RestrictedUnpickler(zf.read(pkl[0]), load_storage, source).load()
    except (UnsafePickleError, ModelError):
        raise
    except Exception as exc:
        raise ModelError(f"{source}: cannot read the pickled checkpoint: {type(exc).__name__}: {exc}") from exc


def stand_in_state_dict(obj: Any, prefix: str = "") -> OrderedDict[str, torch.Tensor]:
    """The state dict of a stand-in module tree (parameters, persistent buffers, children, in order)."""
    out: OrderedDict[str, torch.Tensor] = OrderedDict()
    if not isinstance(obj, StandIn) or not hasattr(obj, "_modules"):
        raise ModelError(f"checkpoint holds a {type(obj).__name__}, not a pickled torch module")
    skip = set(getattr(obj, "_non_persistent_buffers_set", ()) or ())
    for name, t in (getattr(obj, "_parameters", {}) or {}).items():
        if t is not None:
            out[prefix + name] = t
    for name, t in (getattr(obj, "_buffers", {}) or {}).items():
        if t is not None and name not in skip:
            out[prefix + name] = t
    for name, child in (obj._modules or {}).items():
        if child is not None:
            out.update(stand_in_state_dict(child, f"{prefix}{name}."))
    return out


def strip_module_prefix(state: dict[str, torch.Tensor]) -> OrderedDict[str, torch.Tensor]:
    """Remove DataParallel's ``module.`` prefix from every key that has it."""
    return OrderedDict((k.removeprefix("module."), v) for k, v in state.items())


def map_keys(state: dict[str, torch.Tensor], target: dict[str, torch.Tensor], source: str = "checkpoint"
             ) -> OrderedDict[str, torch.Tensor]:
    """Map ``state`` keys onto ``target``'s: equal names first, then the rest pairwise in order if shapes agree.

    Raises ModelError listing the missing and unexpected keys when they cannot be paired.
    """
    state = strip_module_prefix(state)
    out: OrderedDict[str, torch.Tensor] = OrderedDict()
    for k in target:
        if k in state and tuple(state[k].shape) == tuple(target[k].shape):
            out[k] = state[k]
    rest_src = [k for k in state if k not in out]
    rest_dst = [k for k in target if k not in out]
    paired = len(rest_src) == len(rest_dst) and all(
        tuple(state[a].shape) == tuple(target[b].shape) for a, b in zip(rest_src, rest_dst))
    if not paired:
        raise ModelError(f"{source}: checkpoint keys do not fit AstroMAE: {len(rest_dst)} missing key(s): "
                         f"{', '.join(rest_dst[:20])}; {len(rest_src)} unexpected key(s): {', '.join(rest_src[:20])}")
    for a, b in zip(rest_src, rest_dst):
        out[b] = state[a]
    return OrderedDict((k, out[k]) for k in target)


def _is_zip(data: bytes) -> bool:
    return data[:4] == b"PK\x03\x04"


def state_from_bytes(data: bytes, source: str = "weights") -> tuple[dict[str, torch.Tensor], InputNorm]:
    """State dict (our key names) and input normalisation from safetensors, a plain .pt state dict, or the
    original pickled full-model checkpoint."""
    from .astromae import AstroMAE

    if not _is_zip(data):
        from .weights_io import NORM_KEY

        tensors, meta = load_safetensors(data, source)
        return strip_module_prefix(tensors), InputNorm.from_json(meta.get(NORM_KEY), source)
    obj = None
    try:
        obj = torch.load(io.BytesIO(data), map_location="cpu", weights_only=True)
    except Exception:  # noqa: BLE001 - any failure here falls through to the restricted reader
        obj = None  # not a plain tensor container: try the restricted full-model reader below
    if isinstance(obj, dict) and "state_dict" in obj and isinstance(obj["state_dict"], dict):
        obj = obj["state_dict"]
    elif isinstance(obj, dict) and "model" in obj and isinstance(obj["model"], dict):
        obj = obj["model"]
    if obj is None:
        obj = unpickle_checkpoint(data, source)
        if isinstance(obj, StandIn):
            obj = stand_in_state_dict(obj)
    if not isinstance(obj, dict) or not all(isinstance(v, torch.Tensor) for v in obj.values()):
        raise ModelError(f"{source}: holds a {type(obj).__name__}, not a model or a state dict of tensors")
    return map_keys(obj, AstroMAE().state_dict(), source), InputNorm()


def import_checkpoint(data: bytes, source: str = "checkpoint") -> bytes:
    """Convert the original checkpoint (or a .pt state dict) into our safetensors weights (fp32)."""
    from .astromae import build_astromae
    from .weights_io import load_into, save_weights

    state, norm = state_from_bytes(data, source)
    net = build_astromae()
    load_into(net, state, source)
    return save_weights(net.state_dict(), norm, extra_meta={"imported_from": source})
