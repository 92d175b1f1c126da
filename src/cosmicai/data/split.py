"""Write native partitions + manifest from a stream of rows: ``cai data split``, ``convert`` and ``synth``.

Partition sizes are given like the original CAI's (10, 25, 50, 75, 100 MB) and turned into a row count
that reproduces the original partitions exactly: ``rows = floor(size_bytes / 20,508)`` with
``MB = 2**20`` bytes. That gives 5,113 rows for 100MB and 1,278 for 25MB (and 2,556 for 50MB), the counts
the original runs processed; docs/data.md shows how the unit was derived from the original's records.

Partitions are named ``part-000001.safetensors`` ... (numeric order = name order). Each is written
atomically; one whose bytes already exist with the same SHA-256 is skipped (resume); ``manifest.json`` is
written last, so a dataset with a manifest is always complete.

A writer never replaces a dataset. Before the first partition it records what it writes from in
``.cai-source.json`` (the source's canonical URL, the name, size and fingerprint of each of its files or the
digest of its manifest, the rows per partition and the NaN policy, and a digest of all that). A later write to
the same folder goes ahead only when that digest is the same (a resume of the same source) or when asked to
replace the dataset; then only the old manifest, the partitions it lists and the source record are removed.
"""

from __future__ import annotations

import json
import os
import re
import sys
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass, field
from typing import Any, Iterable, Iterator

import numpy as np

from .. import sizes, storage
from ..errors import ConfigError, DataError, StorageError
from .sources import Chunk, Source, open_source
from .formats import (MANIFEST_NAME, PARTITION_SUFFIX, Manifest, Partition, PartitionEntry, encode_partition,
                      read_manifest, sha256_hex, write_manifest)
from .partition import PARTITION_SUFFIXES
from .units import checked_chunks

#: Bytes per sample as partition sizes count them. The original's partitions (5,113 rows per 100MB, 1,278 per
#: 25MB, 2,556 per 50MB, with MB = 2**20) imply 20,505-20,508 bytes; we take 20,508 (see docs/data.md).
SIZE_SAMPLE_BYTES = 20_508
PARTITION_RE = re.compile(r"^part-(\d+)\.safetensors$")
WRITE_THREADS = 4
#: What a dataset was written from (see the module docstring); kept beside the manifest.
SOURCE_RECORD = ".cai-source.json"


def rows_per_partition(partition_size: str | int) -> int:
    """Rows per partition for a size such as ``25MB``, ``1.5GB`` or ``20508`` (bare numbers are bytes; MB = 2**20
    bytes, as the original counted): ``floor(bytes / 20,508)``; ConfigError if under one sample."""
    size = sizes.parse_size(partition_size, "b", what="--partition-size")
    rows = size // SIZE_SAMPLE_BYTES
    if rows < 1:
        raise ConfigError(f"--partition-size: {partition_size!r} ({size} bytes) is smaller than one sample "
                          f"({SIZE_SAMPLE_BYTES} bytes)")
    return rows


def partition_name(index: int) -> str:
    """Name of the ``index``-th partition (1-based): ``part-000001.safetensors``."""
    return f"part-{index:06d}{PARTITION_SUFFIX}"


@dataclass
class WriteReport:
    """What a split/convert/synth wrote."""

    out_url: str
    manifest: Manifest
    written: list[str] = field(default_factory=list)
    skipped: list[str] = field(default_factory=list)
    dropped_rows: int = 0
    dropped_by_source: dict[str, int] = field(default_factory=dict)
    stale: list[str] = field(default_factory=list)

    def lines(self) -> list[str]:
        """A human summary."""
        m = self.manifest
        out = [f"wrote {self.out_url}: {len(m.partitions)} partition(s), {m.total_rows} rows, "
               f"{m.total_bytes / 1e6:.1f} MB ({len(self.written)} written, {len(self.skipped)} already "
               f"present with the same checksum and skipped)"]
        if self.dropped_rows:
            out.append(f"dropped {self.dropped_rows} row(s) with NaN/inf: "
                       + ", ".join(f"{src}: {k}" for src, k in self.dropped_by_source.items()))
        if self.stale:
            out.append(f"note: {len(self.stale)} partition file(s) from an earlier run are not in the manifest "
                       f"(left in place): {', '.join(self.stale[:5])}{' ...' if len(self.stale) > 5 else ''}")
        return out


@dataclass
class Present:
    """In a chunk stream: the next partition is already at the output, as a resumed write left it (``rows``
    rows, ``bytes`` bytes, ``sha256``), so it is neither rendered nor written again."""

    rows: int
    bytes: int
    sha256: str
    columns: list[str] = field(default_factory=list)
    has_redshift: bool = True


def _bad_rows(part: Partition) -> np.ndarray:
    bad = part.nonfinite_rows()
    if part.redshift is not None:
        bad |= ~np.isfinite(part.redshift)
    return bad


def _rebatch(chunks: Iterable[Chunk | Present], rows: int, drop_nonfinite: bool, report: WriteReport,
             bar: object) -> Iterator[Partition | Present]:
    """Exactly ``rows``-row partitions (the last shorter) from the chunks, ids filled, bad rows handled; a
    :class:`Present` marker (only ever between whole partitions) is passed through."""
    pending: list[Partition] = []
    have = 0
    next_id = 0  # the row's index in the whole source, used where the source has no object ids
    has_redshift: bool | None = None
    for chunk in chunks:
        if isinstance(chunk, Present):
            if have:
                raise DataError("internal error: an already-written partition arrived in the middle of a partition")
            next_id += chunk.rows
            bar.update(chunk.rows)  # type: ignore[attr-defined]
            yield chunk
            continue
        part = chunk.part
        n = len(part)
        if not chunk.has_ids:
            part.object_id = np.arange(next_id, next_id + n, dtype=np.int64)
        next_id += n
        bar.update(n)  # type: ignore[attr-defined]
        if has_redshift is None:
            has_redshift = part.redshift is not None
        elif has_redshift != (part.redshift is not None):
            raise DataError(f"{chunk.source}: {'has no' if has_redshift else 'has a'} redshift, unlike the "
                            f"files before it; every file of a dataset must agree")
        bad = _bad_rows(part)
        if bad.any():
            rows_bad = np.flatnonzero(bad)
            if not drop_nonfinite:
                raise DataError(f"{chunk.source}: {rows_bad.size} row(s) have NaN or inf in images, magnitudes or "
                                f"redshift (rows {(rows_bad[:10] + chunk.offset).tolist()}"
                                f"{' ...' if rows_bad.size > 10 else ''} of that file); "
                                f"use --drop-nonfinite to drop them")
            report.dropped_rows += int(rows_bad.size)
            report.dropped_by_source[chunk.source] = report.dropped_by_source.get(chunk.source, 0) + int(rows_bad.size)
            part = part.take(~bad)
        if len(part):
            pending.append(part)
            have += len(part)
        while have >= rows:
            merged = Partition.concat(pending) if len(pending) > 1 else pending[0]
            yield merged.take(slice(0, rows))
            rest = merged.take(slice(rows, None))
            pending, have = ([rest] if len(rest) else []), have - rows
    if have:
        yield Partition.concat(pending) if len(pending) > 1 else pending[0]


def _write_one(url: str, data: bytes, digest: str, listed_digest: str | None) -> bool:
    """Write ``data`` unless the same bytes are there already; True if written.

    ``listed_digest`` is the file's SHA-256 in the previous manifest: with a matching size it spares
    re-reading the file (``cai data verify`` re-checks every byte).
    """
    if storage.size(url) == len(data) and (listed_digest == digest
                                           or sha256_hex(storage.read_bytes(url)) == digest):
        return False
    storage.write_bytes(url, data)
    return True


def source_identity(src: str, source: Source, rows: int, drop_nonfinite: bool) -> dict[str, Any]:
    """What a write from ``source`` is: its canonical URL, its files' names, sizes and fingerprints (or its
    manifest's digest), the rows per partition and the NaN policy, with ``id``, the digest of them all."""
    if source.kind == "native-dataset":
        content: dict[str, Any] = {"manifest_sha256": sha256_hex(storage.read_bytes(storage.join(src, MANIFEST_NAME)))}
    else:
        wanted = set(source.files)
        if storage.size(src) is not None:
            found = storage.file_info(src)
            listed = [(src, *found)] if found else []
        else:
            listed = [item for item in storage.list_files_with_info(src) if item[0] in wanted]
        content = {"files": [[storage.basename(u), n, mark] for u, n, mark in listed]}
    return with_id({"source": _canonical(src), **content, "rows_per_partition": int(rows),
                    "drop_nonfinite": bool(drop_nonfinite)})


def with_id(identity: dict[str, Any]) -> dict[str, Any]:
    """``identity`` plus ``id``: the SHA-256 of its canonical JSON (without ``id``)."""
    body = {k: v for k, v in identity.items() if k != "id"}
    return {**body, "id": sha256_hex(json.dumps(body, sort_keys=True).encode())}


def _canonical(url: str) -> str:
    lpath = storage.local_path(url)
    return os.path.realpath(lpath) if lpath is not None else url.rstrip("/")


def _read_record(url: str) -> dict[str, Any] | None:
    """The source record at ``url``: None when absent, ``{}`` when unreadable."""
    if not storage.exists(url):
        return None
    try:
        record = storage.read_json(url)
    except StorageError:
        return {}
    return record if isinstance(record, dict) else {}


def claim_output(out_url: str, identity: dict[str, Any] | None, replace: bool) -> dict[str, str]:
    """Decide whether a write may go to ``out_url`` (see the module docstring): returns the previous
    manifest's digests by name when resuming, ``{}`` otherwise; ConfigError when refused."""
    if storage.size(out_url) is not None:
        raise ConfigError(f"--out {out_url}: is a file; give a folder for the dataset")
    record_url = storage.join(out_url, SOURCE_RECORD)
    try:
        old, unreadable = read_manifest(out_url), None
    except (DataError, StorageError) as exc:
        old, unreadable = None, str(exc)
    record = _read_record(record_url)
    parts = [storage.basename(u) for u in storage.list_files(out_url, suffixes=PARTITION_SUFFIXES)]
    if old is None and unreadable is None and record is None and not parts:
        return {}
    if identity is not None and record and record.get("id") == identity.get("id"):
        return {e.name: e.sha256 for e in old.partitions} if old else {}
    what = _describe(old, unreadable, record, parts, identity)
    if not replace:
        raise ConfigError(f"--out {out_url} already holds a dataset ({what}); it is left as it is: use --replace "
                          f"to replace it, or choose another --out")
    if unreadable is not None:
        raise ConfigError(f"--out {out_url}: cannot replace the dataset there, its manifest is unreadable "
                          f"({unreadable}); move the folder away or choose another --out")
    if old is None and record is None:
        raise ConfigError(f"--out {out_url} holds {len(parts)} partition file(s) ({', '.join(parts[:3])}"
                          f"{' ...' if len(parts) > 3 else ''}) and no manifest.json, so which files are the "
                          f"dataset's is unknown; --replace removes only a manifest's files: move them away or "
                          f"choose another --out")
    _remove_dataset(out_url, old, record, parts)
    return {}


def _describe(old: Manifest | None, unreadable: str | None, record: dict[str, Any] | None, parts: list[str],
              identity: dict[str, Any] | None) -> str:
    if old is not None:
        text = f"{MANIFEST_NAME}: {len(old.partitions)} partition(s), {old.total_rows} rows"
    elif unreadable is not None:
        text = f"an unreadable {MANIFEST_NAME}"
    elif record is not None:
        text = f"an unfinished write, {len(parts)} partition file(s) and no {MANIFEST_NAME} yet"
    else:
        text = f"{len(parts)} partition file(s) and no {MANIFEST_NAME}"
    if record and record.get("source"):
        same_url = identity is not None and record.get("source") == identity.get("source")
        text += (f", written from {record['source']}, which has changed since or was written with other options"
                 if same_url else f", written from {record['source']}")
    elif record is None and old is not None:
        text += ", with no record of its source"
    return text


def _remove_dataset(out_url: str, old: Manifest | None, record: dict[str, Any] | None, parts: list[str]) -> None:
    """Remove a dataset's own files only: its manifest first (never a manifest that lists missing files), then
    the partitions it lists, or without a manifest the ``part-NNNNNN`` files of the unfinished write that
    ``record`` describes; then the record."""
    storage.remove(storage.join(out_url, MANIFEST_NAME))
    names = [e.name for e in old.partitions] if old is not None else [p for p in parts if PARTITION_RE.match(p)]
    for name in names:
        storage.remove(storage.join(out_url, name))
    if record is not None:
        storage.remove(storage.join(out_url, SOURCE_RECORD))


def write_dataset(chunks: Iterable[Chunk | Present], out_url: str, rows: int, drop_nonfinite: bool = False,
                  progress: bool = False, total_rows: int | None = None, description: str = "",
                  identity: dict[str, Any] | None = None, replace: bool = False) -> WriteReport:
    """Write the chunks' rows as native partitions of ``rows`` rows, then ``manifest.json``.

    ``identity`` (from :func:`source_identity`) names what is written: a dataset already at ``out_url`` is
    resumed when it was written from the same identity, replaced when ``replace`` is true, else refused
    (ConfigError naming it) before anything is read or written."""
    from tqdm import tqdm

    if rows < 1:
        raise ConfigError(f"rows per partition must be >= 1, got {rows}")
    report = WriteReport(out_url, Manifest(partitions=[]))
    entries: list[PartitionEntry] = []
    futures: list[tuple[str, Future]] = []
    previous = claim_output(out_url, identity, replace)
    manifest_cleared = False
    first_row = 0
    has_redshift = True
    columns: list[str] | None = None
    with tqdm(total=total_rows, unit="rows", disable=not progress, file=sys.stderr) as bar, \
            ThreadPoolExecutor(WRITE_THREADS) as pool:
        for index, part in enumerate(_rebatch(chunks, rows, drop_nonfinite, report, bar), start=1):
            name = partition_name(index)
            if isinstance(part, Present):
                entries.append(PartitionEntry(name=name, rows=part.rows, bytes=part.bytes, sha256=part.sha256,
                                              first_row=first_row))
                first_row += part.rows
                has_redshift = part.has_redshift
                columns = list(part.columns) if columns is None else columns
                report.skipped.append(name)
                continue
            data = encode_partition(part)
            if not manifest_cleared:
                # The manifest is rewritten last; until then an old one must not describe changing files.
                storage.remove(storage.join(out_url, MANIFEST_NAME))
                if identity is not None:
                    storage.write_json(storage.join(out_url, SOURCE_RECORD), identity)
                manifest_cleared = True
            digest = sha256_hex(data)
            entries.append(PartitionEntry(name=name, rows=len(part), bytes=len(data), sha256=digest,
                                          first_row=first_row))
            has_redshift = part.redshift is not None
            if columns is None:
                columns = list(part.columns)
            elif sorted(columns) != sorted(part.columns):
                raise DataError(f"{out_url}: {name} would carry catalogue columns {list(part.columns)}, unlike "
                                f"the partitions before it ({columns}); every partition must carry the same")
            first_row += len(part)
            futures.append((name, pool.submit(_write_one, storage.join(out_url, name), data, digest,
                                              previous.get(name))))
            while len(futures) > WRITE_THREADS * 2:
                _collect(futures.pop(0), report)
        for item in futures:
            _collect(item, report)
    if not entries:
        detail = f" ({report.dropped_rows} dropped as non-finite)" if report.dropped_rows else ""
        raise DataError(f"no rows to write to {out_url}: the source is empty{detail}")
    report.manifest = Manifest(partitions=entries, has_redshift=has_redshift, description=description,
                               columns=columns or [])
    write_manifest(out_url, report.manifest)
    names = {e.name for e in entries}
    report.stale = [storage.basename(u) for u in storage.list_files(out_url, suffixes=PARTITION_SUFFIX)
                    if PARTITION_RE.match(storage.basename(u)) and storage.basename(u) not in names]
    return report


def synth_dataset(galaxies: int, out: str, seed: int = 0, partition_size: str | int = "25MB",
                  workers: int | None = None, progress: bool = False, replace: bool = False) -> WriteReport:
    """Render ``galaxies`` synthetic galaxies (:mod:`.synth`) into a native dataset at ``out``.

    A resumed write (same galaxies, seed and partition size) renders only the partitions that are not there
    yet: a partition file already present is kept when it decodes with the expected rows and object ids (the
    galaxies depend only on the seed and their ids)."""
    from .synth import _check_int, _generate

    galaxies = _check_int("galaxies", galaxies, 1)
    seed = _check_int("seed", seed, 0)
    workers = (os.cpu_count() or 1) if workers is None else _check_int("workers", workers, 1)
    rows = rows_per_partition(partition_size)
    identity = with_id({"source": "synth", "galaxies": galaxies, "seed": seed, "rows_per_partition": rows})
    claim_output(out, identity, replace)  # refuses or clears a foreign dataset before anything is looked at
    bounds = [(lo, min(galaxies, lo + rows)) for lo in range(0, galaxies, rows)]
    record = _read_record(storage.join(out, SOURCE_RECORD))
    present: dict[int, Present] = {}
    if record and record.get("id") == identity["id"]:
        for k, (lo, hi) in enumerate(bounds):
            found = _present_partition(storage.join(out, partition_name(k + 1)), lo, hi)
            if found is not None:
                present[k] = found
    rendered = _generate(galaxies, seed, rows, workers, 0, False, skip=frozenset(present))
    chunks = (present[k] if part is None else Chunk("synth", 0, part, has_ids=True)
              for k, part in enumerate(rendered))
    return write_dataset(chunks, out, rows, progress=progress, total_rows=galaxies,
                         description=f"synthetic galaxies, seed {seed}, partitions of {partition_size}",
                         identity=identity, replace=replace)


def _present_partition(url: str, first_id: int, stop_id: int) -> Present | None:
    """A :class:`Present` for the partition at ``url`` when it is an intact native partition of object ids
    ``first_id`` ... ``stop_id - 1``; None when absent or not so (then it is rendered and written again)."""
    from .partition import read_partition

    if storage.size(url) is None:
        return None
    try:
        part = read_partition(url)
        ok = (len(part) == stop_id - first_id and part.redshift is not None and not part.columns
              and np.array_equal(part.object_id, np.arange(first_id, stop_id, dtype=np.int64)))
        data = storage.read_bytes(url) if ok else b""
    except (DataError, StorageError):
        return None
    return Present(len(part), len(data), sha256_hex(data)) if ok else None


def _collect(item: tuple[str, Future], report: WriteReport) -> None:
    name, fut = item
    (report.written if fut.result() else report.skipped).append(name)


def _same_place(a: str, b: str) -> bool:
    la, lb = storage.local_path(a), storage.local_path(b)
    if la is not None and lb is not None:
        return os.path.realpath(la) == os.path.realpath(lb)
    return a.rstrip("/") == b.rstrip("/")


def _inside(src: str, out: str) -> bool:
    """True when ``src`` lies inside the folder ``out``."""
    a, b = _canonical(src), _canonical(out)
    return a.startswith(b.rstrip("/") + "/")


def split(src: str, out: str, partition_size: str | int = "25MB", drop_nonfinite: bool = False,
          progress: bool = False, replace: bool = False) -> WriteReport:
    """Re-partition any readable source (dataset, partition file, FITS/HDF5/npz/npy) into ``out``: ``cai data split``
    and ``cai data convert``.

    A dataset already at ``out`` is resumed when written from the same source with the same options, replaced
    when ``replace`` is true, else refused (see the module docstring)."""
    rows = rows_per_partition(partition_size)
    if _same_place(src, out):
        raise ConfigError(f"--out {out}: the output must differ from the source {src}")
    if replace and _inside(src, out):
        raise ConfigError(f"--out {out}: the source {src} is inside it, so replacing it would delete the source; "
                          f"choose another --out")
    source = open_source(src)
    identity = source_identity(src, source, rows, drop_nonfinite)
    chunks = source.chunks() if source.kind == "native-dataset" else checked_chunks(source.chunks())
    return write_dataset(chunks, out, rows, drop_nonfinite=drop_nonfinite, progress=progress,
                         total_rows=source.total_rows,
                         description=f"from {src} ({source.kind}), partitions of {partition_size}",
                         identity=identity, replace=replace)

