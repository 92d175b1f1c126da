"""``cai data info`` (what a dataset holds) and ``cai data verify`` (is every partition intact)."""

from __future__ import annotations

from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from typing import Any

from .. import storage
from ..errors import CaiError
from .formats import read_manifest, sha256_hex
from .partition import PartitionRef, decode, list_partitions

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
                    description=manifest.description)
    else:
        info.update(rows=None, has_redshift=None,
                    formats=sorted({r.name.rsplit(".", 1)[-1] for r in refs}))
    info["first"], info["last"] = refs[0].name, refs[-1].name
    return info


@dataclass
class VerifyReport:
    """Outcome of :func:`verify_dataset`: ``problems`` maps a partition name to what is wrong with it."""

    url: str
    checked: int = 0
    rows: int = 0
    has_manifest: bool = False
    problems: dict[str, str] = field(default_factory=dict)

    @property
    def ok(self) -> bool:
        return not self.problems


def _check(ref: PartitionRef) -> tuple[int, str | None]:
    """Rows in the partition and the problem found (None if intact)."""
    try:
        data = storage.read_bytes(ref.url)
    except CaiError as exc:
        return 0, f"unreadable ({exc})"
    if ref.sha256 is not None:
        if len(data) != ref.bytes:
            return 0, f"size {len(data)} bytes, the manifest says {ref.bytes} (truncated or replaced)"
        digest = sha256_hex(data)
        if digest != ref.sha256:
            return 0, f"checksum mismatch: sha256 {digest[:16]}..., the manifest says {ref.sha256[:16]}..."
    try:
        part = decode(data, ref.name)
    except CaiError as exc:
        return 0, str(exc)
    if ref.rows is not None and len(part) != ref.rows:
        return len(part), f"{len(part)} rows, the manifest says {ref.rows}"
    return len(part), None


def verify_dataset(url: str, progress: bool = False) -> VerifyReport:
    """Check every partition: size and SHA-256 against the manifest, then shape, dtype and finiteness."""
    from tqdm import tqdm

    report = VerifyReport(url, has_manifest=read_manifest(url) is not None)
    refs = list_partitions(url)
    with ThreadPoolExecutor(VERIFY_THREADS) as pool, \
            tqdm(total=len(refs), unit="partition", disable=not progress) as bar:
        for ref, (rows, problem) in zip(refs, pool.map(_check, refs)):
            report.checked += 1
            report.rows += rows
            if problem:
                report.problems[ref.name] = problem
            bar.update(1)
    return report
