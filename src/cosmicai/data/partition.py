"""Reading partitions of a dataset: decode by file suffix, read by URL, list a dataset's partitions.

The partition formats are one table, :data:`PARTITION_FORMATS` (suffix -> :class:`PartitionFormat`); decoding,
head checks, listings, ``cai data verify``/``resample``/``convert`` and the planner all read it:

* ``.safetensors`` - the native format (:mod:`cosmicai.data.formats`), no pickle, zero-copy;
* ``.pt`` - the original CAI partitions (:mod:`cosmicai.data.legacy`), weights-only unpickler. They carry no
  object ids, so ``object_id`` is the row index within the partition (0..N-1).

A dataset is a folder (local path or ``s3://bucket/prefix``) of partitions, normally with ``manifest.json``;
without one, its partitions are found by a paginated listing in natural numeric order (``2.pt`` before
``10.pt``).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Callable

from .. import storage
from ..errors import CaiError, DataError, OutOfMemoryError, StorageError
from .formats import (MANIFEST_NAME, PARTITION_SUFFIX, Partition, _check_header, decode_partition, header_length,
                      load_partition_file, name_problem, read_manifest)

#: Suffixes of the files ``cai data convert`` reads as FITS and as HDF5.
FITS_SUFFIXES = (".fits", ".fit", ".fts", ".fits.gz", ".fit.gz")
HDF5_SUFFIXES = (".h5", ".hdf5", ".he5")


@dataclass(frozen=True)
class PartitionRef:
    """One partition of a dataset; ``rows``, ``sha256`` and ``first_row`` are None without a manifest, which
    gives the listing's ``fingerprint`` (:func:`cosmicai.storage.fingerprint`) instead."""

    name: str
    url: str
    rows: int | None
    bytes: int
    sha256: str | None = None
    first_row: int | None = None
    fingerprint: str | None = None


def decode(data: bytes, name: str, allow_nonfinite: bool = False) -> Partition:
    """Decode partition bytes, choosing the format from ``name``'s suffix (see :data:`PARTITION_FORMATS`)."""
    fmt = partition_format(name)
    try:
        return fmt.decode(data, name, allow_nonfinite)
    except MemoryError:
        raise _out_of_memory(name, len(data), "decoding") from None


def _out_of_memory(url: str, size: int | None, doing: str) -> OutOfMemoryError:
    held = f"{size:,}-byte" if size is not None else "this"
    return OutOfMemoryError(f"{url}: out of memory {doing} the {held} partition; give the worker more memory or split "
                     f"the dataset into smaller partitions (cai data split --partition-size)")


#: Bytes read to check a partition's head before its body (a native header is a few hundred bytes).
HEAD_BYTES = 4096


def _read_range(url: str, start: int, end: int) -> bytes:
    """Bytes ``start`` to ``end`` (exclusive) of ``url``: one ranged read, never the whole object."""
    lpath = storage.local_path(url)
    try:
        if lpath is not None:
            with open(lpath, "rb") as fh:
                fh.seek(start)
                return fh.read(end - start)
        fs, path = storage.filesystem(url)
        return fs.cat_file(path, start=start, end=end)
    except FileNotFoundError:
        raise StorageError(f"{url}: no such file") from None
    except (OSError, ValueError) as exc:
        raise StorageError(f"{url}: cannot read ({exc})") from None


def _decode_native(data: bytes, source: str, allow_nonfinite: bool) -> Partition:
    return decode_partition(data, source=source, allow_nonfinite=allow_nonfinite)


def _check_native_head(url: str, size: int, head: bytes, listed: str | None) -> None:
    """The whole safetensors header is read and checked (format, tensor offsets adding up to ``size``)."""
    hlen = header_length(head, size, url)
    if 8 + hlen > len(head):
        head += _read_range(url, len(head), 8 + hlen)
    _check_header(head, url, size=size, listed=listed)


def _decode_legacy(data: bytes, source: str, allow_nonfinite: bool) -> Partition:
    from .legacy import read_legacy_pt

    return read_legacy_pt(data, source=source, allow_nonfinite=allow_nonfinite)


#: What a ``.pt`` partition starts with: a zip archive (torch >= 1.6) or a protocol-2 pickle (older torch).
LEGACY_MAGIC = (b"PK\x03\x04", b"\x80\x02")


def _check_legacy_head(url: str, size: int, head: bytes, listed: str | None) -> None:
    if not head.startswith(LEGACY_MAGIC):
        raise DataError(f"{url}: not a torch .pt partition (first bytes {head[:8]!r}, file {size:,} bytes)")


@dataclass(frozen=True)
class PartitionFormat:
    """How one partition file format is read: ``decode(data, source, allow_nonfinite)``, ``check_head(url, size,
    head, listed)`` (DataError unless the first :data:`HEAD_BYTES` bytes make it such a partition of ``size``
    bytes), and whether its files carry their own object ids (else ids are row indices)."""

    decode: Callable[[bytes, str, bool], Partition]
    check_head: Callable[[str, int, bytes, str | None], None]
    object_ids: bool


#: Every partition format, by file suffix: the one table to extend for a new format.
PARTITION_FORMATS: dict[str, PartitionFormat] = {
    PARTITION_SUFFIX: PartitionFormat(_decode_native, _check_native_head, object_ids=True),
    ".pt": PartitionFormat(_decode_legacy, _check_legacy_head, object_ids=False),
}
PARTITION_SUFFIXES = tuple(PARTITION_FORMATS)
#: ".safetensors or .pt", for messages.
EXPECTED_SUFFIXES = " or ".join(PARTITION_SUFFIXES)


def partition_format(name: str) -> PartitionFormat:
    """The format of partition file ``name`` by its suffix; DataError naming it when no format has that suffix."""
    for suffix, fmt in PARTITION_FORMATS.items():
        if name.endswith(suffix):
            return fmt
    raise DataError(f"{name}: unsupported partition format (expected a {EXPECTED_SUFFIXES} file)")


def check_head(url: str, size: int, listed: str | None = None) -> None:
    """DataError naming ``url`` unless its first bytes make it a partition of ``size`` bytes (its own, or the
    size ``listed`` gives: "the manifest", "the plan"), as its format's ``check_head`` judges: for a native
    partition the whole safetensors header, for a ``.pt`` partition the magic number. Reads at most a few KiB."""
    if size == 0:
        raise DataError(f"{url}: empty file (0 bytes) - not a partition")
    partition_format(url).check_head(url, size, _read_range(url, 0, min(size, HEAD_BYTES)), listed)


def read_partition_bytes(url: str, size: int | None = None, listed: str = "the manifest or plan") -> bytes:
    """The bytes of partition ``url``, read only after :func:`check_head` found a partition of ``size`` bytes
    (the size ``listed`` gives; by default the file's own). A junk file named like a partition fails in one
    line without its body being read; running out of memory names the file and its size."""
    if size is None:
        size, listed = storage.size(url), None
        if size is None:
            raise StorageError(f"{url}: no such file")
    check_head(url, size, listed)
    try:
        return storage.read_bytes(url)
    except MemoryError:
        raise _out_of_memory(url, size, "reading") from None


def read_partition(url: str, allow_nonfinite: bool = False) -> Partition:
    """Read and decode one partition; a local native file is memory-mapped instead of read."""
    lpath = storage.local_path(url)
    if lpath is not None and url.endswith(PARTITION_SUFFIX):
        try:
            return load_partition_file(lpath, source=url, allow_nonfinite=allow_nonfinite)
        except FileNotFoundError:
            raise StorageError(f"{url}: no such file") from None
        except OSError as exc:  # a directory, no permission, an I/O error
            raise StorageError(f"{url}: cannot read ({exc})") from None
        except ValueError as exc:  # numpy cannot map an empty file
            if isinstance(exc, DataError):
                raise
            raise DataError(f"{url}: empty or unreadable partition ({exc})") from None
        except MemoryError:
            raise _out_of_memory(url, storage.size(url), "decoding") from None
    return decode(read_partition_bytes(url), url, allow_nonfinite=allow_nonfinite)


def list_partitions(dataset_url: str) -> list[PartitionRef]:
    """The partitions of a dataset, from ``manifest.json`` or else a paginated listing in numeric order.

    ``dataset_url`` may also name one partition file. DataError when there is nothing to read.
    """
    if dataset_url.endswith(PARTITION_SUFFIXES):
        found_file = storage.file_info(dataset_url)
        if found_file is not None:
            problem = name_problem(storage.basename(dataset_url))
            if problem:
                raise DataError(f"{dataset_url!r}: partition file name {storage.basename(dataset_url)!r} {problem}")
            size, mark = found_file
            return [PartitionRef(storage.basename(dataset_url), dataset_url, None, size, fingerprint=mark)]
    manifest = read_manifest(dataset_url)
    if manifest is not None:
        if not manifest.partitions:
            raise DataError(f"{storage.join(dataset_url, MANIFEST_NAME)}: the manifest lists no partitions")
        return [PartitionRef(e.name, storage.join(dataset_url, e.name), e.rows, e.bytes, e.sha256, e.first_row)
                for e in manifest.partitions]
    found = storage.list_files_with_info(dataset_url, suffixes=PARTITION_SUFFIXES)
    if not found:
        if storage.size(dataset_url) is not None:
            hint = convert_hint(dataset_url)
            raise DataError(hint or f"{dataset_url}: not a dataset folder or partition file "
                            f"(expected {EXPECTED_SUFFIXES})")
        if not storage.exists(dataset_url):
            raise DataError(f"{dataset_url}: dataset not found")
        raise DataError(convert_hint(dataset_url) or f"{dataset_url}: empty dataset (no manifest.json and no "
                        f"{EXPECTED_SUFFIXES} files)")
    refs = [PartitionRef(storage.basename(u), u, None, size, fingerprint=mark) for u, size, mark in found]
    for ref in refs:
        check_listed_name(ref.name, dataset_url)
    return refs


def convert_hint(url: str) -> str:
    """A one-line message naming the ``cai data convert`` command to run when ``url`` is a file or folder that
    can be converted into a dataset but is not one; "" when it does not look convertible."""
    bulk = HDF5_SUFFIXES + FITS_SUFFIXES + (".npz",)
    then = "then run on DATASET"
    if storage.size(url) is not None:
        name = storage.basename(url).lower()
        if name.endswith(bulk):
            kind = next(s for s in sorted(bulk, key=len, reverse=True) if name.endswith(s))
            return (f"{url}: a {kind} file, not a dataset; convert it first: cai data convert {url} --out DATASET, "
                    f"{then}")
        if name.endswith(".npy"):
            return (f"{url}: a single .npy array, not a dataset; put images.npy and magnitudes.npy (optional "
                    f"redshift.npy, object_id.npy) in a folder and convert it: cai data convert FOLDER --out DATASET")
        return ""
    try:
        names = [storage.basename(u).lower() for u in storage.list_files(url)]
    except CaiError:
        return ""
    npy = [n for n in names if n.endswith(".npy")]
    fits = [n for n in names if n.endswith(FITS_SUFFIXES)]
    other = [n for n in names if n.endswith(HDF5_SUFFIXES + (".npz",))]
    if "images.npy" in npy:
        return (f"{url}: a folder of .npy arrays, not a dataset; convert it first: cai data convert {url} --out "
                f"DATASET, {then}")
    if npy:
        return (f"{url}: {len(npy)} .npy file(s), which look like per-galaxy cutouts, not a dataset; convert them "
                f"with their catalogue first: cai data convert {url} --catalog CATALOG --out DATASET, {then}")
    if fits:
        return (f"{url}: {len(fits)} FITS file(s), not a dataset; convert them first: cai data convert {url} --out "
                f"DATASET (FITS cubes with a table), or add --catalog CATALOG (one cutout per file), {then}")
    if other:
        return (f"{url}: {len(other)} HDF5/.npz file(s), not a dataset; convert them first: cai data convert {url} "
                f"--out DATASET, {then}")
    return ""


def check_listed_name(name: str, folder: str) -> None:
    """DataError naming ``folder`` and the entry (repr) when a listed file's name has a NUL or other control
    character or is not valid UTF-8 (see :func:`formats.name_problem`): refused when the listing is made,
    before anything is planned or read."""
    problem = name_problem(name)
    if problem:
        raise DataError(f"{folder}: file {name!r} in the listing {problem}")
