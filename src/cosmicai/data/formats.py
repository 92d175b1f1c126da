"""The native partition format and the dataset manifest (see docs/data.md).

A native partition is one safetensors file holding

* ``images``     float32 [N, 5, 32, 32]  (bands u, g, r, i, z)
* ``magnitudes`` float32 [N, 5]
* ``object_id``  int64   [N]
* ``redshift``   float32 [N]  (optional: present when true redshifts are known)

and, optionally, extra per-row catalogue columns as tensors ``catalog.<name>`` (1-D, length N, float32, float64,
int32, int64 or uint64; at most 32), with string metadata ``format`` = ``cosmicai-partition``,
``format_version`` and ``bands``. It decodes
without pickle, zero-copy from bytes or a memory map. ``manifest.json`` beside the partitions lists them.
"""

from __future__ import annotations

import hashlib
import json
import re
from dataclasses import asdict, dataclass, field
from typing import Any

import numpy as np

from ..errors import DataError

FORMAT_NAME = "cosmicai-partition"
FORMAT_VERSION = "1"
BANDS: tuple[str, ...] = ("u", "g", "r", "i", "z")
IMAGE_SHAPE: tuple[int, int, int] = (5, 32, 32)
PARTITION_SUFFIX = ".safetensors"
MANIFEST_NAME = "manifest.json"

#: Prefix of the tensors holding catalogue columns carried through (``catalog.ra``, ``catalog.specobjid``).
COLUMN_PREFIX = "catalog."
#: The most catalogue columns a partition may carry.
MAX_COLUMNS = 32
#: Dtypes a catalogue column may have.
COLUMN_DTYPES: tuple[np.dtype, ...] = tuple(np.dtype(t) for t in ("float32", "float64", "int32", "int64", "uint64"))
_COLUMN_NAME = re.compile(r"[A-Za-z_][A-Za-z0-9_]*\Z")


def column_name_problem(name: str) -> str | None:
    """Why ``name`` cannot be a catalogue column name, or None when it can."""
    if not isinstance(name, str) or not _COLUMN_NAME.match(name):
        return f"column name {name!r} must match [A-Za-z_][A-Za-z0-9_]* (letters, digits, underscore)"
    return None


#: Bytes one sample occupies in a native partition (images + magnitudes + redshift + object_id).
NATIVE_SAMPLE_BYTES = 4 * 5 * 32 * 32 + 4 * 5 + 4 + 8
#: Bytes one sample occupied in the original CAI ``.pt`` partitions (images f32, magnitudes f64, redshift f32).
LEGACY_SAMPLE_BYTES = 20_524
#: Bits of model input per sample (image + magnitudes, float32) used for throughput figures.
INPUT_BITS_PER_SAMPLE = (4 * 5 * 32 * 32 + 4 * 5) * 8


@dataclass
class Partition:
    """One partition's arrays, validated on construction by :meth:`validate`."""

    images: np.ndarray
    magnitudes: np.ndarray
    object_id: np.ndarray
    redshift: np.ndarray | None = None
    #: Catalogue columns carried through, by name (without the ``catalog.`` prefix), each 1-D of length N.
    columns: dict[str, np.ndarray] = field(default_factory=dict)

    def __len__(self) -> int:
        return int(self.images.shape[0])

    @property
    def nbytes(self) -> int:
        """Bytes of array data held (what partition sizes are counted in)."""
        total = self.images.nbytes + self.magnitudes.nbytes + self.object_id.nbytes
        total += sum(c.nbytes for c in self.columns.values())
        return total + (self.redshift.nbytes if self.redshift is not None else 0)

    def validate(self, source: str = "partition", allow_nonfinite: bool = False) -> "Partition":
        """Check shapes, dtypes and finiteness; raise DataError naming ``source`` and the reason."""
        checks = [("images", self.images, np.float32), ("magnitudes", self.magnitudes, np.float32),
                  ("object_id", self.object_id, np.int64)]
        if self.redshift is not None:
            checks.append(("redshift", self.redshift, np.float32))
        for name, arr, dtype in checks:
            if not isinstance(arr, np.ndarray):
                raise DataError(f"{source}: '{name}' is {type(arr).__name__}, expected a numpy array")
            if arr.dtype != dtype:
                raise DataError(f"{source}: '{name}' has dtype {arr.dtype}, expected {np.dtype(dtype)}")
        n = self.images.shape[0] if self.images.ndim else -1
        if self.images.ndim != 4 or tuple(self.images.shape[1:]) != IMAGE_SHAPE:
            raise DataError(f"{source}: 'images' has shape {tuple(self.images.shape)}, expected [N, 5, 32, 32] "
                            f"(5 bands {''.join(BANDS)}, 32x32 pixels)")
        if self.magnitudes.shape != (n, len(BANDS)):
            raise DataError(f"{source}: 'magnitudes' has shape {tuple(self.magnitudes.shape)}, expected [{n}, 5]")
        if self.object_id.shape != (n,):
            raise DataError(f"{source}: 'object_id' has shape {tuple(self.object_id.shape)}, expected [{n}]")
        if self.redshift is not None and self.redshift.shape != (n,):
            raise DataError(f"{source}: 'redshift' has shape {tuple(self.redshift.shape)}, expected [{n}]")
        self._validate_columns(source, n)
        if not allow_nonfinite and not self._surely_finite():
            bad = self.nonfinite_rows()
            if bad.any():
                rows = np.flatnonzero(bad)
                raise DataError(f"{source}: {rows.size} row(s) have NaN or inf in images or magnitudes "
                                f"(first rows: {rows[:5].tolist()}); use drop_nonfinite to drop them")
        return self

    def _validate_columns(self, source: str, n: int) -> None:
        if not isinstance(self.columns, dict):
            raise DataError(f"{source}: 'columns' is {type(self.columns).__name__}, expected a dict of arrays")
        if len(self.columns) > MAX_COLUMNS:
            raise DataError(f"{source}: {len(self.columns)} catalogue columns, at most {MAX_COLUMNS} are allowed")
        allowed = ", ".join(str(d) for d in COLUMN_DTYPES)
        for name, arr in self.columns.items():
            problem = column_name_problem(name)
            if problem:
                raise DataError(f"{source}: catalogue {problem}")
            if not isinstance(arr, np.ndarray):
                raise DataError(f"{source}: catalogue column '{name}' is {type(arr).__name__}, expected a numpy array")
            if arr.dtype not in COLUMN_DTYPES:
                raise DataError(f"{source}: catalogue column '{name}' has dtype {arr.dtype}, expected one of "
                                f"{allowed}")
            if arr.shape != (n,):
                raise DataError(f"{source}: catalogue column '{name}' has shape {tuple(arr.shape)}, expected [{n}]")

    def _surely_finite(self) -> bool:
        """Fast check: a finite float32 sum proves every value finite (NaN/inf propagate into the sum);
        an infinite sum may be overflow, so the caller then checks row by row."""
        if not len(self):
            return True
        with np.errstate(over="ignore", invalid="ignore"):
            return bool(np.isfinite(np.add.reduce(self.images.reshape(-1), dtype=np.float32))
                        and np.isfinite(np.add.reduce(self.magnitudes.reshape(-1), dtype=np.float32)))

    def nonfinite_rows(self) -> np.ndarray:
        """Boolean mask of rows with NaN/inf in images or magnitudes."""
        img_bad = ~np.isfinite(self.images.reshape(len(self), -1)).all(axis=1)
        mag_bad = ~np.isfinite(self.magnitudes).all(axis=1)
        return img_bad | mag_bad

    def take(self, index: np.ndarray | slice) -> "Partition":
        """A new Partition with the selected rows."""
        return Partition(self.images[index], self.magnitudes[index], self.object_id[index],
                         None if self.redshift is None else self.redshift[index],
                         {k: v[index] for k, v in self.columns.items()})

    @staticmethod
    def concat(parts: list["Partition"]) -> "Partition":
        """Concatenate partitions row-wise (redshift kept only if every part has it; every part must carry the
        same catalogue columns)."""
        if not parts:
            raise DataError("cannot concatenate zero partitions")
        names = list(parts[0].columns)
        for p in parts[1:]:
            if sorted(p.columns) != sorted(names):
                raise DataError(f"cannot concatenate partitions with different catalogue columns "
                                f"({sorted(names)} and {sorted(p.columns)})")
        z = None if any(p.redshift is None for p in parts) else np.concatenate([p.redshift for p in parts])
        cols = {k: np.concatenate([p.columns[k] for p in parts]) for k in names}
        return Partition(np.concatenate([p.images for p in parts]), np.concatenate([p.magnitudes for p in parts]),
                         np.concatenate([p.object_id for p in parts]), z, cols)


def encode_partition(part: Partition) -> bytes:
    """Serialise a validated partition to native safetensors bytes."""
    from safetensors.numpy import save

    part.validate(allow_nonfinite=False)
    tensors = {"images": np.ascontiguousarray(part.images), "magnitudes": np.ascontiguousarray(part.magnitudes),
               "object_id": np.ascontiguousarray(part.object_id)}
    if part.redshift is not None:
        tensors["redshift"] = np.ascontiguousarray(part.redshift)
    for name, arr in part.columns.items():
        tensors[COLUMN_PREFIX + name] = np.ascontiguousarray(arr)
    meta = {"format": FORMAT_NAME, "format_version": FORMAT_VERSION, "bands": ",".join(BANDS)}
    if part.columns:
        meta["columns"] = ",".join(part.columns)
    return _canonical_metadata(save(tensors, metadata=meta))


def _canonical_metadata(data: bytes) -> bytes:
    """Sort the header's metadata keys: safetensors writes them in hash order, which would make the same
    partition encode to different bytes (and checksums) from run to run."""
    hlen = int.from_bytes(data[:8], "little")
    header = json.loads(data[8:8 + hlen])
    meta = header.pop("__metadata__", None) or {}
    ordered = {"__metadata__": dict(sorted(meta.items())), **header}
    text = json.dumps(ordered, separators=(",", ":")).encode()
    if len(text) > hlen:  # cannot happen for a pure reordering; keep the original bytes if it ever does
        return data
    return data[:8] + text.ljust(hlen, b" ") + data[8 + hlen:]


#: The most header bytes a native partition can have (it holds four tensor entries, up to 32 catalogue columns
#: and three metadata keys, a few KiB at most); a longer header length is junk and refused before it is read.
MAX_HEADER_BYTES = 1 << 16


def header_length(head: bytes | memoryview, size: int, source: str) -> int:
    """The header length a partition's first 8 bytes give; DataError unless it fits a file of ``size`` bytes
    and MAX_HEADER_BYTES."""
    if size < 8 or len(head) < 8:
        raise DataError(f"{source}: truncated file ({min(size, len(head))} bytes) - not a safetensors partition")
    hlen = int.from_bytes(bytes(head[:8]), "little")
    if hlen <= 0 or 8 + hlen > size or hlen > MAX_HEADER_BYTES:
        raise DataError(f"{source}: truncated or corrupt safetensors header (header length {hlen}, file {size} "
                        f"bytes) - not a cosmicai partition")
    return hlen


def _check_header(data: bytes | memoryview, source: str, size: int | None = None,
                  listed: str | None = None) -> dict[str, Any]:
    """Parse and sanity-check the safetensors header so corrupt files fail with a clear reason. ``data`` holds
    the file (or at least its first ``8 + header length`` bytes, with ``size`` the file's size, or the size
    ``listed`` says it has: "the manifest", "the plan")."""
    size = len(data) if size is None else size
    hlen = header_length(data, size, source)
    try:
        header = json.loads(bytes(data[8:8 + hlen]))
    except (UnicodeDecodeError, json.JSONDecodeError) as exc:
        raise DataError(f"{source}: corrupt safetensors header ({exc})") from exc
    if not isinstance(header, dict) or not isinstance(header.get("__metadata__") or {}, dict):
        raise DataError(f"{source}: corrupt safetensors header (expected a JSON object with a '__metadata__' object)")
    meta = header.get("__metadata__") or {}
    if meta.get("format") != FORMAT_NAME:
        raise DataError(f"{source}: not a cosmicai partition (metadata format={meta.get('format')!r})")
    if meta.get("format_version") != FORMAT_VERSION:
        raise DataError(f"{source}: unsupported format_version {meta.get('format_version')!r} "
                        f"(this cosmicai reads {FORMAT_VERSION!r})")
    try:
        end = max((int(info["data_offsets"][1]) for k, info in header.items() if k != "__metadata__"), default=0)
    except (KeyError, TypeError, IndexError, ValueError) as exc:
        raise DataError(f"{source}: corrupt safetensors header (bad tensor entry: {exc!r})") from exc
    if 8 + hlen + end != size:
        if listed:
            raise DataError(f"{source}: its header describes {8 + hlen + end} bytes but {listed} lists {size} "
                            f"(partition changed or truncated since)")
        raise DataError(f"{source}: truncated or corrupt partition (expected {8 + hlen + end} bytes, got {size})")
    return header


def decode_partition(data: bytes, source: str = "partition", allow_nonfinite: bool = False) -> Partition:
    """Decode native partition bytes (no pickle, no copy: the arrays are read-only views of ``data``).

    DataError names ``source`` on any defect. Copy an array (``np.array(part.images)``) to modify it.
    """
    header = _check_header(data, source)
    return _from_arrays(_tensor_views(np.frombuffer(data, dtype=np.uint8), header, source), source, allow_nonfinite,
                        header.get("__metadata__"))


def load_partition_file(path: str, source: str | None = None, allow_nonfinite: bool = False) -> Partition:
    """Decode a native partition from a local file through a memory map (no copy until arrays are used)."""
    mm = np.memmap(path, dtype=np.uint8, mode="r")
    source = source or path
    header = _check_header(mm, source)
    return _from_arrays(_tensor_views(mm, header, source), source, allow_nonfinite, header.get("__metadata__"))


_DTYPES = {"F32": np.float32, "I64": np.int64, "F64": np.float64, "F16": np.float16, "I32": np.int32,
           "U64": np.uint64}


def _tensor_views(buf: np.ndarray, header: dict[str, Any], source: str) -> dict[str, np.ndarray]:
    """Zero-copy array views of each tensor in a checked safetensors buffer (uint8 array or memmap)."""
    base = 8 + int.from_bytes(bytes(buf[:8]), "little")
    arrays = {}
    for name, info in header.items():
        if name == "__metadata__":
            continue
        try:
            dtype = np.dtype(_DTYPES[info["dtype"]])
            start, end = (int(v) for v in info["data_offsets"])
            shape = tuple(int(v) for v in info["shape"])
        except (KeyError, TypeError, ValueError) as exc:
            raise DataError(f"{source}: corrupt header entry for tensor '{name}' ({exc!r})") from None
        expected = int(np.prod(shape, dtype=np.int64)) * dtype.itemsize
        if not 0 <= start <= end <= len(buf) - base or end - start != expected:
            raise DataError(f"{source}: corrupt header: tensor '{name}' {info['dtype']}{list(shape)} needs "
                            f"{expected} bytes but its offsets span {start}..{end}")
        arrays[name] = buf[base + start: base + end].view(dtype).reshape(shape)
    return arrays


def _from_arrays(arrays: dict[str, np.ndarray], source: str, allow_nonfinite: bool,
                 meta: dict[str, Any] | None = None) -> Partition:
    missing = [k for k in ("images", "magnitudes", "object_id") if k not in arrays]
    if missing:
        raise DataError(f"{source}: missing tensor(s) {missing}")
    unknown = sorted(k for k in set(arrays) - {"images", "magnitudes", "object_id", "redshift"}
                     if not k.startswith(COLUMN_PREFIX))
    if unknown:
        raise DataError(f"{source}: unexpected tensor(s) {unknown}")
    columns = {k[len(COLUMN_PREFIX):]: v for k, v in sorted(arrays.items()) if k.startswith(COLUMN_PREFIX)}
    order = [c for c in (meta or {}).get("columns", "").split(",") if c]
    if sorted(order) == sorted(columns):  # the writer's column order, when the metadata gives it
        columns = {c: columns[c] for c in order}
    part = Partition(arrays["images"], arrays["magnitudes"], arrays["object_id"], arrays.get("redshift"), columns)
    return part.validate(source, allow_nonfinite=allow_nonfinite)


def name_problem(name: str) -> str | None:
    """Why ``name`` cannot be a partition name, or None when it can.

    Refused: a NUL or any other control character (C0, DEL, C1: no filesystem or object store takes NUL, and
    the others break listings, logs and result tables), and text that is not valid UTF-8 (a lone surrogate,
    which is how Python hands over an undecodable byte of a file name): result tables and JSON records store
    partition names as UTF-8.
    """
    bad = [c for c in name if ord(c) < 0x20 or 0x7F <= ord(c) <= 0x9F]
    if bad:
        what = "a NUL byte" if "\x00" in bad else f"control character {bad[0]!r}"
        return f"contains {what}; partition names must be printable"
    try:
        name.encode("utf-8")
    except UnicodeEncodeError as exc:
        code = ord(name[exc.start])
        detail = f" (byte {bytes([code - 0xDC00])!r})" if 0xDC80 <= code <= 0xDCFF else ""
        return f"is not valid UTF-8{detail}; rename it to a UTF-8 name"
    return None


def sha256_hex(data: bytes) -> str:
    """Hex SHA-256 of ``data``."""
    return hashlib.sha256(data).hexdigest()


@dataclass
class PartitionEntry:
    """One partition in a manifest."""

    name: str
    rows: int
    bytes: int
    sha256: str
    first_row: int


@dataclass
class Manifest:
    """``manifest.json``: what a dataset holds and how to check it."""

    partitions: list[PartitionEntry]
    format_version: str = FORMAT_VERSION
    bands: list[str] = field(default_factory=lambda: list(BANDS))
    image_shape: list[int] = field(default_factory=lambda: list(IMAGE_SHAPE))
    has_redshift: bool = True
    total_rows: int = 0
    total_bytes: int = 0
    description: str = ""
    #: Catalogue columns every partition carries (``catalog.<name>`` tensors), in order.
    columns: list[str] = field(default_factory=list)

    def __post_init__(self) -> None:
        self.total_rows = sum(p.rows for p in self.partitions)
        self.total_bytes = sum(p.bytes for p in self.partitions)

    def to_dict(self) -> dict[str, Any]:
        return {"format": "cosmicai-manifest", **asdict(self)}

    @classmethod
    def from_dict(cls, raw: Any, source: str = MANIFEST_NAME) -> "Manifest":
        """Parse and check a manifest; DataError names the field at fault."""
        if not isinstance(raw, dict):
            raise DataError(f"{source}: manifest must be a JSON object, got {type(raw).__name__}")
        if raw.get("format_version") != FORMAT_VERSION:
            raise DataError(f"{source}: unsupported manifest format_version {raw.get('format_version')!r}")
        if not isinstance(raw.get("partitions"), list):
            raise DataError(f"{source}: 'partitions' must be a list")
        entries = []
        seen: set[str] = set()
        first = 0
        for i, p in enumerate(raw["partitions"]):
            try:
                entry = PartitionEntry(name=str(p["name"]), rows=int(p["rows"]), bytes=int(p["bytes"]),
                                       sha256=str(p["sha256"]), first_row=int(p["first_row"]))
            except (KeyError, TypeError, ValueError) as exc:
                raise DataError(f"{source}: partitions[{i}] is malformed ({exc!r}); needs name, rows, bytes, "
                                f"sha256, first_row") from exc
            if entry.name in seen or "/" in entry.name or "\\" in entry.name or entry.name in ("", ".", ".."):
                what = "appears twice" if entry.name in seen else "is not a plain file name"
                raise DataError(f"{source}: partitions[{i}] name {entry.name!r} {what}")
            bad_name = name_problem(entry.name)
            if bad_name:
                raise DataError(f"{source}: partitions[{i}] name {entry.name!r} {bad_name}")
            seen.add(entry.name)
            if entry.rows < 0 or entry.bytes < 0:
                raise DataError(f"{source}: partitions[{i}] ({entry.name}) has negative rows or bytes")
            if entry.first_row != first:
                raise DataError(f"{source}: partitions[{i}] ({entry.name}) first_row is {entry.first_row}, "
                                f"expected {first}")
            first += entry.rows
            entries.append(entry)
        bands, shape = raw.get("bands", list(BANDS)), raw.get("image_shape", list(IMAGE_SHAPE))
        if bands != list(BANDS):
            raise DataError(f"{source}: 'bands' is {bands!r}, expected {list(BANDS)}")
        if shape != list(IMAGE_SHAPE):
            raise DataError(f"{source}: 'image_shape' is {shape!r}, expected {list(IMAGE_SHAPE)}")
        columns = raw.get("columns", [])
        if not isinstance(columns, list) or len(columns) > MAX_COLUMNS or len(set(map(str, columns))) != len(columns):
            raise DataError(f"{source}: 'columns' must be a list of at most {MAX_COLUMNS} distinct column names")
        for c in columns:
            problem = column_name_problem(c)
            if problem:
                raise DataError(f"{source}: 'columns': {problem}")
        m = cls(partitions=entries, format_version=raw["format_version"], bands=list(bands), image_shape=list(shape),
                has_redshift=bool(raw.get("has_redshift", True)), description=str(raw.get("description", "")),
                columns=list(columns))
        for key in ("total_rows", "total_bytes"):
            if key not in raw:
                continue
            try:
                value = int(raw[key])
            except (TypeError, ValueError) as exc:
                raise DataError(f"{source}: '{key}' is {raw[key]!r}, expected an integer") from exc
            if value != getattr(m, key):
                raise DataError(f"{source}: '{key}' is {raw[key]} but the partitions add up to {getattr(m, key)}")
        return m


def read_manifest(dataset_url: str) -> Manifest | None:
    """The manifest of the dataset at ``dataset_url``, or None when it has none."""
    from .. import storage

    url = storage.join(dataset_url, MANIFEST_NAME)
    if not storage.exists(url):
        return None
    return Manifest.from_dict(storage.read_json(url), source=url)


def write_manifest(dataset_url: str, manifest: Manifest) -> str:
    """Write ``manifest.json`` atomically; returns its URL."""
    from .. import storage

    url = storage.join(dataset_url, MANIFEST_NAME)
    storage.write_json(url, manifest.to_dict())
    return url
