"""The original CAI partitions: ``torch.save(TensorDataset(images, magnitudes, redshift))`` files (``1.pt``, ...).

Layout: ``images`` float32 [N, 5, 32, 32], ``magnitudes`` float64 [N, 5], ``redshift`` float32 [N]
(20,524 bytes of array data per sample). They are read with ``torch.load(weights_only=True)`` and only
``torch.utils.data.TensorDataset`` allow-listed: any other global in the pickle (``os.system``,
``builtins.eval``, ...) is refused with :class:`UnsafePickleError` before anything is executed.

On reading, magnitudes are cast to float32 (the model's input dtype; float64 -> float32 keeps ~7 significant
digits, far beyond photometric precision) and, as the files carry no object ids, ``object_id`` is the row
index within the partition (0..N-1). Converting a legacy dataset renumbers ids to the row's index in the
whole dataset (see ``cosmicai.data.sources``).
"""

from __future__ import annotations

import io
import re

import numpy as np

from ..errors import DataError, UnsafePickleError
from .formats import Partition

TENSOR_DATASET = "torch.utils.data.dataset.TensorDataset"


def _refuse(source: str, names: list[str]) -> UnsafePickleError:
    return UnsafePickleError(f"{source}: refused to unpickle: the file asks for global(s) {', '.join(names)}, "
                             f"only {TENSOR_DATASET} is allowed in a CAI .pt partition (nothing was executed)")


def _scan_globals(data: bytes, source: str) -> None:
    """Refuse a checkpoint whose pickle names any global outside torch's weights-only set + TensorDataset."""
    import torch

    try:
        found = torch.serialization.get_unsafe_globals_in_checkpoint(io.BytesIO(data))
    except Exception:  # noqa: BLE001 - not a zip checkpoint (old format) or corrupt: torch.load decides below
        return
    bad = [name for name in found if name != TENSOR_DATASET]
    if bad:
        raise _refuse(source, bad)


def read_legacy_pt(data: bytes, source: str = "partition.pt", allow_nonfinite: bool = False) -> Partition:
    """Decode an original CAI ``.pt`` partition safely (weights-only unpickler, TensorDataset only)."""
    import pickle

    import torch
    from torch.utils.data import TensorDataset

    if not data:
        raise DataError(f"{source}: empty file - not a CAI .pt partition")
    if data[:4] == b"PK\x03\x04":
        from ..torchzip import check_zip_sizes

        # torch.save stores partitions uncompressed: their tensors cannot inflate beyond the file itself.
        check_zip_sizes(data, source, len(data), "the file's own size (torch saves partitions uncompressed)",
                        error=DataError, damaged="truncated or corrupt .pt file")
    _scan_globals(data, source)
    try:
        # add_safe_globals, not the safe_globals context manager: the context manager edits a process-wide list
        # on entry and exit, so concurrent reads in threads would see TensorDataset vanish mid-load.
        torch.serialization.add_safe_globals([TensorDataset])
        obj = torch.load(io.BytesIO(data), map_location="cpu", weights_only=True)
    except pickle.UnpicklingError as exc:
        match = re.search(r"GLOBAL (\S+)", str(exc))
        if match:
            raise _refuse(source, [match.group(1)]) from None
        raise DataError(f"{source}: not a loadable CAI .pt partition ({str(exc).splitlines()[0][:200]})") from None
    except (RuntimeError, EOFError, ValueError, KeyError, OSError) as exc:
        raise DataError(f"{source}: truncated or corrupt .pt file ({str(exc).splitlines()[0][:200]})") from None
    return _to_partition(obj, source, allow_nonfinite)


def _to_partition(obj: object, source: str, allow_nonfinite: bool) -> Partition:
    import torch
    from torch.utils.data import TensorDataset

    if not isinstance(obj, TensorDataset):
        raise DataError(f"{source}: holds a {type(obj).__name__}, expected a TensorDataset(images, magnitudes, "
                        f"redshift)")
    tensors = obj.tensors
    if len(tensors) not in (2, 3) or not all(isinstance(t, torch.Tensor) for t in tensors):
        raise DataError(f"{source}: TensorDataset has {len(tensors)} item(s), expected 3 tensors "
                        f"(images, magnitudes, redshift) or 2 (images, magnitudes)")
    names = ("images", "magnitudes", "redshift")
    arrays = {}
    for name, tensor in zip(names, tensors):
        if not tensor.dtype.is_floating_point:
            raise DataError(f"{source}: '{name}' has dtype {tensor.dtype}, expected a floating-point tensor")
        arr = tensor.detach().contiguous().numpy()
        arrays[name] = arr if arr.dtype == np.float32 else arr.astype(np.float32)
    n = arrays["images"].shape[0] if arrays["images"].ndim else 0
    part = Partition(images=arrays["images"], magnitudes=arrays["magnitudes"],
                     object_id=np.arange(n, dtype=np.int64), redshift=arrays.get("redshift"))
    return part.validate(source, allow_nonfinite=allow_nonfinite)


def write_legacy_pt(part: Partition) -> bytes:
    """Serialise ``part`` in the original layout (images f32, magnitudes f64, redshift f32); for tests/benchmarks."""
    import torch
    from torch.utils.data import TensorDataset

    if part.redshift is None:
        raise DataError("write_legacy_pt: the original .pt layout needs redshift")
    ds = TensorDataset(torch.from_numpy(np.ascontiguousarray(part.images, dtype=np.float32)),
                       torch.from_numpy(np.ascontiguousarray(part.magnitudes, dtype=np.float64)),
                       torch.from_numpy(np.ascontiguousarray(part.redshift, dtype=np.float32)))
    buf = io.BytesIO()
    torch.save(ds, buf)
    return buf.getvalue()
