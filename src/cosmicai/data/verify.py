"""``cai data info`` (what a dataset holds) and ``cai data verify`` (is every partition intact)."""

from __future__ import annotations

from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from typing import Any

import numpy as np

from .. import storage
from ..errors import CaiError, DataError
from .formats import read_manifest, sha256_hex
from .partition import PartitionRef, decode, list_partitions, partition_format, read_partition_bytes

VERIFY_THREADS = 4


def dataset_info(url: str) -> dict[str, Any]:
    """Summary of a dataset: partitions, rows, bytes, redshift, from the manifest (or a listing without one)."""
    manifest = read_manifest(url)
    refs = list_partitions(url)
    info: dict[str, Any] = {"url": url, "manifest": manifest is not None, "partitions": len(refs),
                            "bytes": sum(r.bytes for r in refs)}
    if manifest is not None:
        rows = [p.rows for p in manifest.partitions]
        info.update(rows=manifest.total_rows, rows_per_partition_min=min(rows), rows_per_partition_max=max(rows),
                    has_redshift=manifest.has_redshift, format_version=manifest.format_version,
                    bands="".join(manifest.bands), image_shape=manifest.image_shape,
                    description=manifest.description, columns=list(manifest.columns))
    else:
        info.update(rows=None, has_redshift=None,
                    formats=sorted({r.name.rsplit(".", 1)[-1] for r in refs}))
    info["first"], info["last"] = refs[0].name, refs[-1].name
    return info


@dataclass
class VerifyReport:
    """Outcome of :func:`verify_dataset`: ``problems`` maps a partition name to what is wrong with it.

    Duplicate object ids are problems too (each partition holding a repeat gets an entry), so ``ok`` is False
    when any id appears twice (except in a resampled dataset, see :func:`verify_dataset`); ``duplicate_ids``
    counts the distinct ids seen more than once, ``duplicate_rows`` the rows beyond each id's first, and
    ``duplicate_examples`` shows a few (``{"object_id", "first": [partition, row], "again": [partition, row]}``).
    """

    url: str
    checked: int = 0
    rows: int = 0
    has_manifest: bool = False
    problems: dict[str, str] = field(default_factory=dict)
    duplicate_ids: int = 0
    duplicate_rows: int = 0
    duplicate_examples: list[dict[str, Any]] = field(default_factory=list)

    @property
    def ok(self) -> bool:
        return not self.problems


def _check(ref: PartitionRef, columns: list[str] | None = None) -> tuple[int, str | None, np.ndarray | None]:
    """Rows in the partition, the problem found (None if intact) and a copy of its object ids (None for
    formats without ids, such as legacy ``.pt`` partitions, whose ids are row indices, and for partitions that do
    not decode). ``columns``:
    the catalogue columns the manifest says every partition carries."""
    try:
        data = read_partition_bytes(ref.url, ref.bytes, "the manifest" if ref.sha256 else "the listing")
    except DataError as exc:  # not a partition: said by its header, before its body was read
        return 0, str(exc), None
    except CaiError as exc:
        return 0, f"unreadable ({exc})", None
    if ref.sha256 is not None:
        if len(data) != ref.bytes:
            return 0, f"size {len(data)} bytes, the manifest says {ref.bytes} (truncated or replaced)", None
        digest = sha256_hex(data)
        if digest != ref.sha256:
            return 0, f"checksum mismatch: sha256 {digest[:16]}..., the manifest says {ref.sha256[:16]}...", None
    try:
        part = decode(data, ref.name)
    except CaiError as exc:
        return 0, str(exc), None
    ids = np.array(part.object_id) if partition_format(ref.name).object_ids else None  # a copy: frees ``data``
    if ref.rows is not None and len(part) != ref.rows:
        return len(part), f"{len(part)} rows, the manifest says {ref.rows}", ids
    if columns is not None and sorted(part.columns) != sorted(columns):
        return len(part), (f"carries catalogue columns {list(part.columns)}, the manifest says {columns}"), ids
    if part.redshift is not None:
        bad = np.flatnonzero(~np.isfinite(part.redshift))
        if bad.size:
            return len(part), (f"{bad.size} row(s) have NaN or inf in redshift (first rows: {bad[:5].tolist()}); "
                               f"convert rejects such rows (--drop-nonfinite drops them)"), ids
    return len(part), None, ids


def _find_duplicates(report: VerifyReport, names: list[str], ids: list[np.ndarray | None],
                     as_problems: bool = True) -> None:
    """Record object ids that appear more than once across the native partitions (see :class:`VerifyReport`);
    with ``as_problems`` False they are only counted (``duplicate_*``), not made problems."""
    held = [(name, arr) for name, arr in zip(names, ids) if arr is not None and arr.size]
    if not held:
        return
    every = np.concatenate([arr for _, arr in held])
    order = np.argsort(every, kind="stable")  # stable: an id's first row in dataset order comes first
    ordered = every[order]
    again_sorted = np.zeros(every.size, dtype=bool)
    np.equal(ordered[1:], ordered[:-1], out=again_sorted[1:])
    if not again_sorted.any():
        return
    again = np.zeros(every.size, dtype=bool)
    again[order] = again_sorted
    report.duplicate_rows = int(again.sum())
    starts = again_sorted[1:] & ~again_sorted[:-1]
    report.duplicate_ids = int(starts.sum())
    offsets = np.cumsum([0] + [arr.size for _, arr in held])

    def where(index: int) -> list[Any]:
        k = int(np.searchsorted(offsets, index, side="right")) - 1
        return [held[k][0], int(index - offsets[k])]

    def first_of(value: Any) -> list[Any]:
        return where(int(order[np.searchsorted(ordered, value, side="left")]))

    total = (f"{report.duplicate_ids} object id(s) appear more than once in the dataset "
             f"({report.duplicate_rows} repeated row(s))")
    for k, (name, _arr) in enumerate(held):
        rows = np.flatnonzero(again[offsets[k]:offsets[k + 1]])
        if not rows.size:
            continue
        value = every[offsets[k] + rows[0]]
        first = first_of(value)
        if len(report.duplicate_examples) < 5:
            report.duplicate_examples.append({"object_id": int(value), "first": first, "again": [name, int(rows[0])]})
        finding = (f"{rows.size} row(s) repeat an object id seen earlier (first: object_id {int(value)} at row "
                   f"{int(rows[0])}, already at {first[0]} row {first[1]}); {total}")
        if as_problems:
            report.problems[name] = f"{report.problems[name]}; also {finding}" if name in report.problems else finding


def verify_dataset(url: str, progress: bool = False) -> VerifyReport:
    """Check every partition: size and SHA-256 against the manifest, then shape, dtype, finiteness (images,
    magnitudes and redshift: NaN or inf anywhere is a problem; a negative redshift such as -1, the usual
    "unknown", is not) and that object ids are unique across the dataset.

    Duplicate ids are reported as problems, so verify fails on them: results are joined back to a catalogue
    by ``object_id``, and there is no option to allow repeats. Two exceptions: legacy ``.pt`` partitions carry
    no ids (theirs are row indices, repeated in every partition) and are left out of that check; a resampled
    dataset (``resample.json`` beside the manifest, written by :func:`cosmicai.data.resample.resample`) repeats
    rows by design, so its repeats are counted in ``duplicate_*`` but are not problems.
    """
    from tqdm import tqdm

    manifest = read_manifest(url)
    report = VerifyReport(url, has_manifest=manifest is not None)
    columns = list(manifest.columns) if manifest is not None else None
    refs = list_partitions(url)
    ids: list[np.ndarray | None] = []
    with ThreadPoolExecutor(VERIFY_THREADS) as pool, \
            tqdm(total=len(refs), unit="partition", disable=not progress) as bar:
        for ref, (rows, problem, part_ids) in zip(refs, pool.map(lambda r: _check(r, columns), refs)):
            report.checked += 1
            report.rows += rows
            ids.append(part_ids)
            if problem:
                report.problems[ref.name] = problem
            bar.update(1)
    _find_duplicates(report, [r.name for r in refs], ids, as_problems=not _resampled(url))
    return report


def _resampled(url: str) -> bool:
    """True when ``url`` is a resampled dataset (``resample.json`` beside the manifest): its rows repeat on
    purpose, each keeping its source ``object_id``."""
    from .resample import INFO_NAME

    try:
        return storage.exists(storage.join(url, INFO_NAME))
    except CaiError:
        return False
