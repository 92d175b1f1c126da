"""Resampling ("infinite") datasets: benchmark data sizes beyond what a dataset holds.

The source's rows are drawn as an endless stream - in order, over and over (``cycle``), or, like the original's
``InfiniteSampler``, as one seeded permutation of all rows after another (``shuffle``) - and cut into native
partitions of the requested size until the requested data size is reached. Sizes count native sample bytes
(:data:`~cosmicai.data.formats.NATIVE_SAMPLE_BYTES` per row), binary units (1 GB = 1024 MB): 1 GB in 25 MB
partitions gives 41 partitions, as in the original's layout. Rows keep their source ``object_id`` and
redshift, so repeated samples are visible; ``resample.json`` beside the manifest records how many distinct
samples were used.
"""

from __future__ import annotations

import math
from collections import OrderedDict
from dataclasses import asdict, dataclass
from typing import Iterator

import numpy as np

from .. import storage
from ..errors import ConfigError, DataError
from .formats import (NATIVE_SAMPLE_BYTES, PARTITION_SUFFIX, Manifest, Partition, PartitionEntry, encode_partition,
                      read_manifest, sha256_hex, write_manifest)
from .partition import PARTITION_SUFFIXES, list_partitions, read_partition

MODES = ("cycle", "shuffle")
INFO_NAME = "resample.json"


@dataclass
class ResampleInfo:
    """What a resampled dataset holds and where it came from (``resample.json``)."""

    source: str
    source_rows: int
    mode: str
    seed: int
    data_bytes: int
    partition_bytes: int
    rows: int
    partitions: int
    rows_per_partition: int
    distinct_samples: int
    epochs: float


def plan_sizes(data_bytes: int, partition_bytes: int, sample_bytes: int = NATIVE_SAMPLE_BYTES) -> tuple[int, int, int]:
    """(total rows, rows per partition, partitions) for a data size cut into partitions of a size."""
    if data_bytes <= 0 or partition_bytes <= 0:
        raise ConfigError(f"data size and partition size must be positive (got {data_bytes} and {partition_bytes} bytes)")
    rows = max(1, math.ceil(data_bytes / sample_bytes))
    per = max(1, partition_bytes // sample_bytes)
    return rows, per, math.ceil(rows / per)


class _Source:
    """Random access to a dataset's rows, keeping a few decoded partitions in memory."""

    def __init__(self, url: str, cache: int = 4) -> None:
        self.url = url
        self._read = read_partition
        self.refs = list_partitions(url)
        rows = [r.rows for r in self.refs]
        if any(n is None for n in rows):  # no manifest: count by reading
            rows = [len(self._load(i)) for i in range(len(self.refs))]
        self.starts = np.concatenate([[0], np.cumsum(rows)]).astype(np.int64)
        self.rows = int(self.starts[-1])
        if self.rows == 0:
            raise DataError(f"{url}: the source dataset holds no rows to resample")
        self._cache: OrderedDict[int, Partition] = OrderedDict()
        self._size = cache
        self.has_redshift = self._load(0).redshift is not None
        self.columns = list(self._load(0).columns)

    def _load(self, i: int) -> Partition:
        cache = getattr(self, "_cache", None)
        if cache is not None and i in cache:
            cache.move_to_end(i)
            return cache[i]
        part = self._read(self.refs[i].url)
        if cache is not None:
            cache[i] = part
            while len(cache) > self._size:
                cache.popitem(last=False)
        return part

    def take(self, rows: np.ndarray) -> Partition:
        """The source rows at global indices ``rows`` (in that order)."""
        which = np.searchsorted(self.starts, rows, side="right") - 1
        out: list[Partition] = []
        order: list[np.ndarray] = []
        for i in np.unique(which):
            sel = np.flatnonzero(which == i)
            part = self._load(int(i))
            out.append(part.take(rows[sel] - self.starts[i]))
            order.append(sel)
        merged = Partition.concat(out)
        inverse = np.empty(len(rows), dtype=np.int64)
        inverse[np.concatenate(order)] = np.arange(len(rows))
        return merged.take(inverse)


def _stream(n: int, mode: str, seed: int) -> Iterator[np.ndarray]:
    """Endless blocks of source row indices: 0..n-1 repeated, or one seeded permutation per epoch."""
    rng = np.random.default_rng(seed)
    while True:
        yield rng.permutation(n) if mode == "shuffle" else np.arange(n)


def _indices(n: int, total: int, mode: str, seed: int) -> Iterator[np.ndarray]:
    """The first ``total`` indices of the stream, in chunks."""
    left = total
    for block in _stream(n, mode, seed):
        if left <= 0:
            return
        yield block[:left]
        left -= min(left, len(block))


def resample(source: str, out: str, data_size: int, partition_size: int, mode: str = "cycle", seed: int = 0,
             overwrite: bool = False) -> ResampleInfo:
    """Write a native dataset of ``data_size`` bytes in ``partition_size`` partitions drawn from ``source``.

    An existing dataset at ``out`` made with the same parameters is reused. Returns its ``ResampleInfo``.
    """
    if mode not in MODES:
        raise ConfigError(f"mode: unknown resampling mode {mode!r}; expected one of {MODES}")
    info_url = storage.join(out, INFO_NAME)
    src = _Source(source)
    rows, per, nparts = plan_sizes(int(data_size), int(partition_size))
    distinct = min(rows, src.rows)
    info = ResampleInfo(source=source, source_rows=src.rows, mode=mode, seed=int(seed), data_bytes=int(data_size),
                        partition_bytes=int(partition_size), rows=rows, partitions=nparts, rows_per_partition=per,
                        distinct_samples=distinct, epochs=rows / src.rows)
    if storage.exists(info_url) and not overwrite:
        old = storage.read_json(info_url)
        if old == asdict(info) and read_manifest(out) is not None:
            return info
        if storage.list_files(out):
            raise DataError(f"{out}: already holds a different dataset ({INFO_NAME} differs); use overwrite")
    elif storage.list_files(out, suffixes=PARTITION_SUFFIXES) and not overwrite:
        raise DataError(f"{out}: already holds partitions not made by resample; choose an empty folder")

    entries: list[PartitionEntry] = []
    pending = np.zeros(0, dtype=np.int64)
    first = 0
    name_width = len(str(nparts))

    def flush(idx: np.ndarray) -> None:
        nonlocal first
        part = src.take(idx)
        data = encode_partition(part)
        name = f"{len(entries) + 1:0{name_width}d}{PARTITION_SUFFIX}"
        storage.write_bytes(storage.join(out, name), data)
        entries.append(PartitionEntry(name, len(part), len(data), sha256_hex(data), first))
        first += len(part)

    for chunk in _indices(src.rows, rows, mode, seed):
        pending = np.concatenate([pending, chunk.astype(np.int64)])
        while len(pending) >= per:
            flush(pending[:per])
            pending = pending[per:]
    if len(pending):
        flush(pending)
    write_manifest(out, Manifest(entries, has_redshift=src.has_redshift, columns=src.columns, description=f"resampled ({mode}, seed {seed}) from {source}: {rows} rows, "
                                 f"{distinct} distinct samples"))
    storage.write_json(info_url, asdict(info))
    return info
