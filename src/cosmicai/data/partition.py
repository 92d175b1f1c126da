"""Reading partitions of a dataset: decode by file suffix, read by URL, list a dataset's partitions.

Two partition formats are read:

* ``.safetensors`` - the native format (:mod:`cosmicai.data.formats`), no pickle, zero-copy;
* ``.pt`` - the original CAI partitions (:mod:`cosmicai.data.legacy`), weights-only unpickler. They carry no
  object ids, so ``object_id`` is the row index within the partition (0..N-1).

A dataset is a folder (local path or ``s3://bucket/prefix``) of partitions, normally with ``manifest.json``;
without one, its partitions are found by a paginated listing in natural numeric order (``2.pt`` before
``10.pt``).
"""

from __future__ import annotations

from dataclasses import dataclass

from .. import storage
from ..errors import DataError, StorageError
from .formats import (MANIFEST_NAME, PARTITION_SUFFIX, Partition, decode_partition, load_partition_file, name_problem,
                      read_manifest)

LEGACY_SUFFIX = ".pt"
PARTITION_SUFFIXES = (PARTITION_SUFFIX, LEGACY_SUFFIX)


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
    """Decode partition bytes, choosing the format from ``name``'s suffix (.safetensors native, .pt legacy)."""
    if name.endswith(PARTITION_SUFFIX):
        return decode_partition(data, source=name, allow_nonfinite=allow_nonfinite)
    if name.endswith(LEGACY_SUFFIX):
        from .legacy import read_legacy_pt

        return read_legacy_pt(data, source=name, allow_nonfinite=allow_nonfinite)
    raise DataError(f"{name}: unsupported partition format (expected a {PARTITION_SUFFIX} or {LEGACY_SUFFIX} file)")


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
    return decode(storage.read_bytes(url), url, allow_nonfinite=allow_nonfinite)


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
            raise DataError(f"{dataset_url}: not a dataset folder or partition file "
                            f"(expected {PARTITION_SUFFIX} or {LEGACY_SUFFIX})")
        if not storage.exists(dataset_url):
            raise DataError(f"{dataset_url}: dataset not found")
        raise DataError(f"{dataset_url}: empty dataset (no manifest.json and no {PARTITION_SUFFIX} or "
                        f"{LEGACY_SUFFIX} files)")
    refs = [PartitionRef(storage.basename(u), u, None, size, fingerprint=mark) for u, size, mark in found]
    for ref in refs:
        check_listed_name(ref.name, dataset_url)
    return refs


def check_listed_name(name: str, folder: str) -> None:
    """DataError naming ``folder`` and the entry (repr) when a listed file's name has a NUL or other control
    character or is not valid UTF-8 (see :func:`formats.name_problem`): refused when the listing is made,
    before anything is planned or read."""
    problem = name_problem(name)
    if problem:
        raise DataError(f"{folder}: file {name!r} in the listing {problem}")
