"""Import of the original AstroMAE checkpoint without executing it.

The original ``Mixed_Inception_z_VITAE_Base_Img_Full_New_Full.pt`` is a whole model pickled by ``torch.save``
inside ``torch.nn.DataParallel``. We read the zip ourselves and unpickle ``data.pkl`` with a restricted
unpickler: only the original model classes (``blocks.model_vit_inception.ViT_Astro``, ``blocks.photoz.*``),
timm 0.4.12's ViT parts, ``torch.nn`` module classes, torch's tensor/storage rebuild functions and a few
builtins are allowed, and every class is replaced by a neutral stand-in that only collects its state. Any
other global raises :class:`~cosmicai.errors.UnsafePickleError` naming it, before anything is executed.

The state dict is then taken from the stand-ins (the same walk ``nn.Module.state_dict`` does), ``module.`` is
stripped, and every key is mapped onto ours BY NAME (:func:`map_state_dict`; the table is in docs/model.md):
the ViT keeps timm's names, ``vit_block`` -> ``vit_mlp``, ``concat_block`` -> ``fusion``,
``inception_model.*`` -> ``mix.*``. Only the tensors AstroMAE has no place for are dropped, and named: the 5x5
branch the authors' last Inception block builds but never runs, and ``vis_inception.0``, a second name of
``conv2d_init``. Anything else missing, extra or of the wrong shape is refused; nothing is paired by order.
"""

from __future__ import annotations

import io
import pickle
import re
import zipfile
from collections import OrderedDict
from dataclasses import dataclass, field
from typing import Any

import torch
from torch import nn

from ...errors import ModelError, UnsafePickleError
from ..weights_io import USE_WEIGHTS as _USE
from ...torchzip import check_zip_sizes, read_member
from ..weights_io import InputNorm, file_kind, load_safetensors, refuse_kind

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
    "UntypedStorage": torch.uint8,
}
#: A checkpoint's tensors may hold at most this many times AstroMAE's fp32 weights (room for float64 copies,
#: the authors' duplicate and unused tensors, optimizer moments); checked before anything is inflated.
CHECKPOINT_SIZE_FACTOR = 4


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
                info = zf.getinfo(f"{prefix}data/{key}")
            except KeyError as exc:
                raise ModelError(f"{source}: storage '{key}' is missing from the archive") from exc
            need = numel * torch.empty(0, dtype=dtype).element_size()
            if info.file_size != need:
                raise ModelError(f"{source}: storage '{key}' inflates to {info.file_size:,} bytes but its tensors "
                                 f"declare {need:,}; refused before inflating it")
            raw = read_member(zf, info)
            flat = torch.frombuffer(bytearray(raw), dtype=dtype) if raw else torch.empty(0, dtype=dtype)
            if flat.numel() != numel:
                raise ModelError(f"{source}: storage '{key}' holds {flat.numel()} elements, expected {numel}")
            cache[key] = flat
        return cache[key]

    try:
        return _RestrictedUnpickler(read_member(zf, zf.getinfo(pkl[0])), load_storage, source).load()
    except (UnsafePickleError, ModelError):
        raise
    except Exception as exc:
        raise ModelError(f"{source}: cannot read the pickled checkpoint: {type(exc).__name__}: {exc}") from exc


def check_declared_sizes(data: bytes, source: str, limit: int) -> None:
    """Before anything in a torch zip checkpoint is inflated: its members may declare at most ``limit`` bytes in
    all, and each storage the pickle names must declare exactly the bytes its tensors need. The pickle is walked
    by the restricted unpickler with storages on torch's ``meta`` device (nothing allocated); a pickle it
    refuses is left to the readers below, still within ``limit``."""
    zf = check_zip_sizes(data, source, limit, f"{CHECKPOINT_SIZE_FACTOR}x AstroMAE's fp32 weights, the most an "
                         f"AstroMAE checkpoint holds", error=ModelError)
    pkl = [i for i in zf.infolist() if i.filename.endswith("/data.pkl") or i.filename == "data.pkl"]
    if not pkl:
        return
    prefix = pkl[0].filename[: -len("data.pkl")]

    def declare(key: str, dtype: torch.dtype, numel: int) -> torch.Tensor:
        need = numel * torch.empty(0, dtype=dtype).element_size()
        try:
            size = zf.getinfo(f"{prefix}data/{key}").file_size
        except KeyError:
            raise ModelError(f"{source}: storage '{key}' is missing from the archive") from None
        if size != need:
            raise ModelError(f"{source}: storage '{key}' inflates to {size:,} bytes but its tensors declare "
                             f"{need:,}; refused before inflating it")
        return torch.empty(numel, dtype=dtype, device="meta")

    try:
        _RestrictedUnpickler(read_member(zf, pkl[0]), declare, source).load()
    except ModelError as exc:
        if "refused before inflating" in str(exc) or "is missing from the archive" in str(exc):
            raise
    except Exception:  # noqa: BLE001 - globals it refuses, or a pickle it cannot walk: the readers decide
        pass


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


# --------------------------------------------------------------------------- the authors' names -> ours

#: (our name, the authors' name) as full-match regex and substitution; the first pattern that matches wins. The
#: ViT (cls_token, pos_embed, patch_embed, blocks.N, fc_norm, head) keeps timm 0.4.12's names on both sides.
_OURS_TO_AUTHORS: list[tuple[str, str]] = [
    (r"mix\.inception\.0\.(weight|bias)", r"inception_model.conv2d_init.\1"),
    (r"mix\.inception\.(\d+)\.branch1x1\.(.+)", r"inception_model.vis_inception.\1.branch1.\2"),
    (r"mix\.inception\.(\d+)\.branch3x3\.(.+)", r"inception_model.vis_inception.\1.branch2.\2"),
    (r"mix\.inception\.(\d+)\.branch5x5\.(.+)", r"inception_model.vis_inception.\1.branch3.\2"),
    (r"mix\.inception\.(\d+)\.branch_pool\.(.+)", r"inception_model.vis_inception.\1.branch4.\2"),
    (r"mix\.inception_mlp\.0\.(.+)", r"inception_model.vis_inception.10.\1"),
    (r"mix\.inception_mlp\.2\.(.+)", r"inception_model.vis_inception.12.\1"),
    (r"mix\.mag_mlp\.(\d+)\.(.+)", r"inception_model.magnitude_block.\1.\2"),
    (r"vit_mlp\.(\d+)\.(.+)", r"vit_block.\1.\2"),
    (r"fusion\.(\d+)\.(.+)", r"concat_block.\1.\2"),
    (r"(cls_token|pos_embed|patch_embed\..+|blocks\.\d+\..+|fc_norm\..+|head\..+)", r"\1"),
]

#: Prefixes that only the authors' layout has (a checkpoint with any of them is read in their names).
AUTHORS_PREFIXES = ("inception_model.", "vit_block.", "concat_block.")

DUPLICATE_REASON = ("the same Conv2d as inception_model.conv2d_init: the authors register one module under both "
                    "names, so the checkpoint stores it twice")
UNUSED_REASON = ("built by the authors' last Inception block (is_custom) but skipped by its forward, so it never "
                 "affects a prediction")


def authors_name(ours: str) -> str:
    """The authors' state-dict name (without ``module.``) of one of our state-dict keys."""
    for pattern, repl in _OURS_TO_AUTHORS:
        if re.fullmatch(pattern, ours):
            return re.sub(pattern, repl, ours)
    raise KeyError(f"no authors' name for '{ours}'")


def known_unused(net: nn.Module) -> dict[str, str]:
    """Regex (authors' names) -> reason, for the tensors their checkpoint holds that AstroMAE has no place for."""
    from .network import AstroMAE, InceptionBlock

    model = next(m for m in net.modules() if isinstance(m, AstroMAE))
    out = {r"inception_model\.vis_inception\.0\.(weight|bias)": DUPLICATE_REASON}
    for i, block in enumerate(model.mix.inception):
        if isinstance(block, InceptionBlock) and block.branch5x5 is None:
            out[rf"inception_model\.vis_inception\.{i}\.branch3\..+"] = UNUSED_REASON
    return out


@dataclass
class ImportReport:
    """What an import did: the naming scheme read, tensors mapped, and tensors dropped with the reason."""

    scheme: str  # 'authors' (ViT_Astro names) or 'cosmicai' (ours)
    mapped: int = 0
    dropped: dict[str, str] = field(default_factory=dict)

    def summary(self) -> str:
        text = f"read {self.mapped} tensor(s) in the {self.scheme} naming"
        if self.dropped:
            by_reason: dict[str, list[str]] = {}
            for name, reason in self.dropped.items():
                by_reason.setdefault(reason, []).append(name)
            text += "; dropped " + "; ".join(f"{len(v)} tensor(s) {', '.join(v)} ({r})" for r, v in by_reason.items())
        return text


def _group_missing(keys: list[str], depth: int) -> list[str]:
    """Missing keys, with whole ViT blocks shown as one entry."""
    by_block: dict[int, list[str]] = {}
    rest = []
    for k in keys:
        m = re.fullmatch(r"blocks\.(\d+)\..+", k)
        if m:
            by_block.setdefault(int(m.group(1)), []).append(k)
        else:
            rest.append(k)
    whole = sorted(b for b, ks in by_block.items() if len(ks) == _BLOCK_TENSORS)
    out = []
    if whole:
        out.append(f"ViT block(s) {', '.join(map(str, whole))} (blocks.N.*, {_BLOCK_TENSORS} tensors each; "
                   f"AstroMAE has {depth} blocks, blocks.0 to blocks.{depth - 1})")
    for b, ks in sorted(by_block.items()):
        if b not in whole:
            out.extend(ks)
    return out + rest


_BLOCK_TENSORS = 12  # norm1 (2), attn.qkv (2), attn.proj (2), norm2 (2), mlp.fc1 (2), mlp.fc2 (2)


def map_state_dict(state: dict[str, torch.Tensor], net: nn.Module, source: str = "checkpoint"
                   ) -> tuple[OrderedDict[str, torch.Tensor], ImportReport]:
    """Map ``state`` onto ``net``'s state-dict names, by name only (never by order or shape).

    ``state`` may be in the authors' names (``ViT_Astro``: ``inception_model.*``, ``vit_block.*``,
    ``concat_block.*``) or ours, with or without DataParallel's ``module.`` prefix. Only the known-unused tensors
    of the authors' checkpoint are dropped (named in the report). Any missing, unexpected or wrong-shape tensor
    raises ModelError naming every one and what was expected."""
    state = strip_module_prefix(state)
    target = net.state_dict()
    authors = any(k.startswith(AUTHORS_PREFIXES) for k in state)
    report = ImportReport("authors" if authors else "cosmicai")
    expected = {authors_name(k) if authors else k: k for k in target}  # checkpoint name -> our name
    unused = known_unused(net) if authors else {}
    out: OrderedDict[str, torch.Tensor] = OrderedDict()
    unexpected, wrong = [], []
    for name, tensor in state.items():
        ours = expected.get(name)
        if ours is None:
            reason = next((r for pat, r in unused.items() if re.fullmatch(pat, name)), None)
            if reason is None:
                unexpected.append(name)
            else:
                report.dropped[name] = reason
            continue
        if tuple(tensor.shape) != tuple(target[ours].shape):
            wrong.append(f"{name} {tuple(tensor.shape)} (expected {tuple(target[ours].shape)})")
        out[ours] = tensor
    if authors:
        _check_duplicate(state, out, report, source)
    missing = [name for name, ours in expected.items() if ours not in out]
    problems = []
    if missing:
        depth = sum(1 for k in target if re.fullmatch(r"blocks\.\d+\.norm1\.weight", k))
        problems.append(f"{len(missing)} missing tensor(s): {', '.join(_group_missing(missing, depth))}")
    if unexpected:
        problems.append(f"{len(unexpected)} unexpected tensor(s) (no such name in the "
                        f"{'authors' if authors else 'cosmicai'} AstroMAE): {', '.join(unexpected)}")
    if wrong:
        problems.append(f"{len(wrong)} tensor(s) with the wrong shape: {', '.join(wrong)}")
    if problems:
        kind = "the authors' ViT_Astro" if authors else "cosmicai's AstroMAE"
        raise ModelError(f"{source}: checkpoint does not fit AstroMAE (read in {kind} names): " + "; ".join(problems))
    report.mapped = len(out)
    return OrderedDict((k, out[k]) for k in target), report


def _check_duplicate(state: dict[str, torch.Tensor], out: dict[str, torch.Tensor], report: ImportReport,
                     source: str) -> None:
    """``conv2d_init`` and ``vis_inception.0`` are one module in the authors' model: they must hold equal tensors.
    A checkpoint with only one of the two names is read from the one it has."""
    for suffix in ("weight", "bias"):
        init, seq = f"inception_model.conv2d_init.{suffix}", f"inception_model.vis_inception.0.{suffix}"
        if init in state and seq in state:
            if state[init].shape != state[seq].shape or not torch.equal(state[init], state[seq]):
                raise ModelError(f"{source}: {seq} differs from {init}; in the authors' model they are one tensor, "
                                 "so this checkpoint was not saved from their code (or was edited)")
        elif seq in state:
            out[f"mix.inception.0.{suffix}"] = state[seq]
            report.dropped.pop(seq, None)


def read_checkpoint(data: bytes, source: str = "weights"
                    ) -> tuple[OrderedDict[str, torch.Tensor], InputNorm, ImportReport]:
    """State dict (our names), input normalisation and import report, from safetensors weights, a plain ``.pt``
    state dict (ours or the authors', with or without ``module.``), or the authors' pickled full-model
    checkpoint (read with the restricted unpickler). Damaged or foreign files raise ModelError saying what
    the file is and what to do."""
    from .network import build_astromae
    from ..weights_io import NORM_KEY

    kind = file_kind(data)
    refuse_kind(kind, data, source)
    net = build_astromae()
    if kind == "safetensors":
        tensors, meta = load_safetensors(data, source, framework="torch")
        state, report = map_state_dict(tensors, net, source)
        return state, InputNorm.from_json(meta.get(NORM_KEY), source), report
    check_declared_sizes(data, source, CHECKPOINT_SIZE_FACTOR * 4 * sum(t.numel() for t in net.state_dict().values()))
    try:
        zipfile.ZipFile(io.BytesIO(data)).testzip()
    except (zipfile.BadZipFile, EOFError, OSError, ValueError) as exc:  # testzip re-reads and CRC-checks members
        raise ModelError(f"{source}: a damaged or truncated torch checkpoint (its zip archive cannot be read: "
                         f"{exc}); the copy is incomplete or corrupt: fetch it again") from exc
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
        raise ModelError(f"{source}: holds a {type(obj).__name__}, not a model or a state dict of tensors; {_USE}")
    state, report = map_state_dict(obj, net, source)
    return state, InputNorm(), report


def state_from_bytes(data: bytes, source: str = "weights") -> tuple[dict[str, torch.Tensor], InputNorm]:
    """:func:`read_checkpoint` without the report."""
    state, norm, _ = read_checkpoint(data, source)
    return state, norm


def import_checkpoint(data: bytes, source: str = "checkpoint") -> tuple[bytes, ImportReport]:
    """Convert the authors' checkpoint (or a .pt state dict) into our safetensors weights (fp32); returns the
    bytes and the report naming what was mapped and dropped."""
    from .network import build_astromae
    from .weights_torch import load_into, save_weights

    state, norm, report = read_checkpoint(data, source)
    net = build_astromae()
    load_into(net, state, source)
    meta = {"imported_from": source, "import_scheme": report.scheme, "import_dropped": sorted(report.dropped)}
    return save_weights(net.state_dict(), norm, extra_meta=meta), report
