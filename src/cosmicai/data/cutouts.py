"""Per-galaxy cutouts plus a catalogue, as astronomers keep them: ``cai data convert FOLDER --catalog CAT``.

``FOLDER`` holds one file per galaxy: a ``.npy`` array or a FITS file (``.fits``, ``.fit``, ``.fts``, optionally
gzipped) whose first 3-D image HDU is [5, 32, 32] (bands u g r i z; FITS axes NAXIS1=32, NAXIS2=32, NAXIS3=5).
Other files in the folder are ignored. The catalogue is a CSV, Parquet or FITS binary table file with one row per
galaxy:

* magnitudes: five columns ``u g r i z`` or ``mag_u`` ... ``mag_z``, or one 5-element column ``magnitudes``;
* an id column (``object_id``, ``objid`` or ``id``, or the one ``--id-column`` names): integers, unique;
* optional ``redshift`` (true redshifts, for scoring);
* optional ``file`` (or ``filename``): the cutout's file name in FOLDER.

Rows and cutouts are joined by the ``file`` column when there is one, else by id: the cutout of the galaxy with
id 1234 is the file whose name without its suffix reads as that integer (``1234.npy``, ``001234.fits``). Without
an id column (joined by file), ids are the catalogue row numbers from 0. Every row needs a cutout and every cutout
a row; duplicate ids or files are refused. Rows are written in catalogue order. Catalogue columns named in
``columns`` are carried into the partitions (``catalog.<name>`` tensors) and from there into predictions.
"""

from __future__ import annotations

import io
import os
import re
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from typing import Any, Iterator

import numpy as np

from .. import storage
from ..errors import ConfigError, DataError
from .sources import FITS_SUFFIXES, Chunk, _int64_ids, _open
from .formats import BANDS, IMAGE_SHAPE, MAX_COLUMNS, Partition, column_name_problem, sha256_hex
from .units import UnitsCheck

CUTOUT_SUFFIXES = (".npy",) + FITS_SUFFIXES
ID_COLUMNS = ("object_id", "objid", "id")
FILE_COLUMNS = ("file", "filename")
#: Cutouts read per chunk (about 10 MB of images), by this many threads.
CHUNK_ROWS = 512
READ_THREADS = 8
_SHOWN = 5


def _first(items: list[str]) -> str:
    more = f" ... ({len(items)} in all)" if len(items) > _SHOWN else ""
    return ", ".join(items[:_SHOWN]) + more


def cutout_stem(name: str) -> str:
    """A cutout's file name without its suffix (``12.fits.gz`` -> ``12``)."""
    lower = name.lower()
    for suffix in sorted(CUTOUT_SUFFIXES, key=len, reverse=True):
        if lower.endswith(suffix):
            return name[: -len(suffix)]
    return name


# ---------------------------------------------------------------- catalogue tables


class _Table:
    """A catalogue table's columns by name (found case-insensitively), as numpy arrays."""

    def __init__(self, url: str, arrays: dict[str, tuple[np.ndarray, np.ndarray | None]], n: int) -> None:
        self.url, self.arrays, self.n = url, arrays, n
        self.lower: dict[str, str] = {}
        for name in arrays:
            self.lower.setdefault(name.lower(), name)

    def find(self, *names: str) -> str | None:
        for name in names:
            if name in self.arrays:
                return name
            if name.lower() in self.lower:
                return self.lower[name.lower()]
        return None

    def get(self, name: str) -> tuple[np.ndarray, np.ndarray | None]:
        """Values and the mask of empty cells (None when there are none)."""
        return self.arrays[name]


def _parse_text_column(values: Any) -> Any:
    """A CSV column read as text, as the narrowest exact type: int64, then uint64, then float64, else text."""
    import pyarrow as pa
    import pyarrow.compute as pc

    for typ in (pa.int64(), pa.uint64(), pa.float64()):
        try:
            return pc.cast(values, typ)
        except (pa.ArrowInvalid, pa.ArrowNotImplementedError):
            continue
    return values


def _arrow_arrays(table: Any, text: bool) -> dict[str, tuple[np.ndarray, np.ndarray | None]]:
    import pyarrow as pa

    out = {}
    for name in table.column_names:
        col = table.column(name).combine_chunks()
        if text and pa.types.is_string(col.type):
            col = _parse_text_column(col)
        mask = None
        if col.null_count:
            mask = np.asarray(col.is_null().to_numpy(zero_copy_only=False), dtype=bool)
        if pa.types.is_list(col.type) or pa.types.is_fixed_size_list(col.type) or pa.types.is_large_list(col.type):
            lengths = np.asarray(col.value_lengths().fill_null(0).to_numpy(zero_copy_only=False))
            if len(col) and (lengths == lengths[0]).all() and mask is None:
                values = col.flatten().to_numpy(zero_copy_only=False).reshape(len(col), int(lengths[0]))
            else:
                values = np.asarray(col.to_pylist(), dtype=object)
        elif pa.types.is_string(col.type) or pa.types.is_large_string(col.type):
            values = np.asarray(col.to_pylist(), dtype=object)
        elif mask is not None and (pa.types.is_integer(col.type) or pa.types.is_boolean(col.type)):
            values = col.fill_null(0).to_numpy(zero_copy_only=False)
        else:
            values = col.to_numpy(zero_copy_only=False)
        out[name] = (np.asarray(values), mask)
    return out


def _read_csv(url: str, needed: list[str]) -> _Table:
    import pyarrow as pa
    import pyarrow.csv as pacsv

    source = storage.local_path(url) or pa.BufferReader(storage.read_bytes(url))
    try:  # the columns as text, parsed exactly afterwards: pyarrow would read ids of 2**63 or more as floats
        table = pacsv.read_csv(source, convert_options=pacsv.ConvertOptions(
            include_columns=needed, strings_can_be_null=True, column_types={n: pa.string() for n in needed}))
    except (pa.ArrowInvalid, OSError) as exc:
        raise DataError(f"{url}: not a readable CSV catalogue ({str(exc).splitlines()[0]})") from None
    return _Table(url, _arrow_arrays(table, text=True), table.num_rows)


def _read_parquet(url: str, needed: list[str]) -> _Table:
    import pyarrow as pa
    import pyarrow.parquet as pq

    try:
        pf = pq.ParquetFile(pa.BufferReader(storage.read_bytes(url)))  # an arrow buffer, not a Python file
        names = [c for c in pf.schema_arrow.names if c in needed]
        table = pf.read(columns=names)
    except (pa.ArrowInvalid, OSError) as exc:
        raise DataError(f"{url}: not a readable Parquet catalogue ({str(exc).splitlines()[0]})") from None
    return _Table(url, _arrow_arrays(table, text=False), table.num_rows)


def _read_fits_table(url: str, needed: list[str]) -> _Table:
    from astropy.io import fits

    try:
        with _open(url) as fh, fits.open(fh, memmap=False) as hdul:
            tables = [h for h in hdul if isinstance(h, fits.BinTableHDU)]
            if not tables:
                raise DataError(f"{url}: no binary table HDU in this FITS file; the catalogue must be a FITS "
                                f"binary table (or a CSV or Parquet file)")
            hdu = next((t for t in tables if t.name.upper() == "CATALOG"), tables[0])
            data = hdu.data
            arrays = {}
            for name in hdu.columns.names:
                if name not in needed:
                    continue
                col = data[name]
                values = np.array(col)
                if values.dtype.kind == "S":
                    values = np.char.decode(values, "ascii", errors="replace").astype(object)
                elif values.dtype.kind == "U":
                    values = values.astype(object)
                native = values.astype(values.dtype.newbyteorder("=")) if values.dtype.kind in "iufb" else values
                arrays[name] = (native, None)
            n = len(data)
    except (OSError, ValueError, TypeError) as exc:
        raise DataError(f"{url}: not a readable FITS catalogue ({exc})") from None
    return _Table(url, arrays, n)


def _catalog_columns_wanted(names: list[str], columns: list[str], id_column: str | None) -> list[str]:
    lower = {c.lower() for c in (*BANDS, *(f"mag_{b}" for b in BANDS), "magnitudes", "redshift", *ID_COLUMNS,
                                 *FILE_COLUMNS, *columns, *([id_column] if id_column else []))}
    return [n for n in names if n.lower() in lower]


def _read_table(url: str, columns: list[str], id_column: str | None) -> _Table:
    lower = storage.basename(url).lower()
    if storage.size(url) is None:
        raise DataError(f"--catalog {url}: no such file")
    names = _table_names(url, lower)
    needed = _catalog_columns_wanted(names, columns, id_column)
    if lower.endswith(".csv"):
        return _read_csv(url, needed)
    if lower.endswith((".parquet", ".pq")):
        return _read_parquet(url, needed)
    return _read_fits_table(url, needed)


def _table_names(url: str, lower: str) -> list[str]:
    """The catalogue's column names, read from its header only."""
    if lower.endswith(".csv"):
        with _open(url) as fh:
            first = fh.readline(1 << 20).decode("utf-8", errors="replace").lstrip("\ufeff").strip()
        import csv

        return next(csv.reader([first]), [])
    if lower.endswith((".parquet", ".pq")):
        import pyarrow as pa
        import pyarrow.parquet as pq

        try:
            with _open(url) as fh:
                return list(pq.ParquetFile(fh).schema_arrow.names)
        except (pa.ArrowInvalid, OSError) as exc:
            raise DataError(f"{url}: not a readable Parquet catalogue ({str(exc).splitlines()[0]})") from None
    if lower.endswith(FITS_SUFFIXES):
        from astropy.io import fits

        try:
            with _open(url) as fh, fits.open(fh, memmap=False) as hdul:
                tables = [h for h in hdul if isinstance(h, fits.BinTableHDU)]
                hdu = next((t for t in tables if t.name.upper() == "CATALOG"), tables[0] if tables else None)
                return list(hdu.columns.names) if hdu is not None else []
        except (OSError, ValueError, TypeError) as exc:
            raise DataError(f"{url}: not a readable FITS catalogue ({exc})") from None
    raise DataError(f"--catalog {url}: unsupported catalogue format (expected .csv, .parquet or a FITS binary "
                    f"table: {', '.join(FITS_SUFFIXES)})")


# ---------------------------------------------------------------- the catalogue


@dataclass
class Catalog:
    """What the catalogue gives, row by row: ids, magnitudes, redshift, join keys, carried columns."""

    url: str
    object_id: np.ndarray
    magnitudes: np.ndarray
    redshift: np.ndarray | None
    files: list[str] | None
    id_name: str | None
    columns: dict[str, np.ndarray] = field(default_factory=dict)

    def __len__(self) -> int:
        return len(self.object_id)


def _numeric(table: _Table, name: str, what: str) -> np.ndarray:
    values, mask = table.get(name)
    if values.dtype.kind not in "iuf":
        kind = "text" if values.dtype.kind in "OUS" else str(values.dtype)
        raise DataError(f"{table.url}: column '{name}' ({what}) holds {kind}, expected numbers")
    out = values.astype(np.float32)
    if mask is not None:
        out[mask] = np.nan
    return out


def _carried(table: _Table, name: str) -> np.ndarray:
    """A carried catalogue column in one of the partition column dtypes, exactly."""
    values, mask = table.get(name)
    if values.dtype.kind == "b":
        raise DataError(f"{table.url}: column '{name}' holds true/false values; only numeric columns can be "
                        f"carried (--columns): store it as 0/1")
    if values.dtype.kind not in "iuf":
        kind = "text" if values.dtype.kind in "OUS" else f"dtype {values.dtype}"
        raise DataError(f"{table.url}: column '{name}' holds {kind}; only numeric columns can be carried "
                        f"(--columns): leave it out or store it as numbers")
    if values.ndim != 1:
        raise DataError(f"{table.url}: column '{name}' has {values.shape[1:]} values per row; only one number per "
                        f"row can be carried (--columns)")
    if values.dtype.kind == "f":
        out = values.astype(np.float64 if values.dtype.itemsize > 4 else np.float32)
        if mask is not None:
            out[mask] = np.nan
        return out
    if mask is not None and mask.any():
        rows = np.flatnonzero(mask)
        raise DataError(f"{table.url}: integer column '{name}' has {rows.size} empty value(s) (first at row "
                        f"{int(rows[0])}); fill them or leave the column out of --columns")
    if values.dtype.kind == "u":
        return values.astype(np.uint64 if values.dtype.itemsize >= 8 else
                             np.int64 if values.dtype.itemsize == 4 else np.int32)
    return values.astype(np.int64 if values.dtype.itemsize > 4 else np.int32)


def read_catalog(url: str, columns: list[str] | None = None, id_column: str | None = None) -> Catalog:
    """Read and check a cutout catalogue (see the module docstring); DataError names the file and column."""
    columns = list(columns or [])
    problems = [column_name_problem(c) for c in columns]
    bad = next((p for p in problems if p), None)
    if bad:
        raise ConfigError(f"--columns: {bad}")
    if len(set(columns)) != len(columns) or len(columns) > MAX_COLUMNS:
        raise ConfigError(f"--columns: give at most {MAX_COLUMNS} distinct column names")
    table = _read_table(url, columns, id_column)
    found = ", ".join(table.arrays) or "none"
    bands = [table.find(b) for b in BANDS]
    prefixed = [table.find(f"mag_{b}") for b in BANDS]
    vector = table.find("magnitudes")
    if vector is not None:
        mags = table.get(vector)[0]
        if mags.ndim != 2 or mags.shape[1] != len(BANDS) or mags.dtype.kind not in "iuf":
            raise DataError(f"{url}: column '{vector}' must hold 5 numbers per row (bands {''.join(BANDS)})")
        mags = mags.astype(np.float32)
    elif all(bands) or all(prefixed):
        names = bands if all(bands) else prefixed
        mags = np.stack([_numeric(table, c, "magnitude") for c in names], axis=1)  # type: ignore[arg-type]
    else:
        raise DataError(f"{url}: no magnitudes (columns found: {found}); expected columns u g r i z, or mag_u ... "
                        f"mag_z, or one 5-element column 'magnitudes'")
    z_name = table.find("redshift")
    redshift = _numeric(table, z_name, "redshift") if z_name else None
    file_name = table.find(*FILE_COLUMNS)
    files = None
    if file_name is not None:
        values, mask = table.get(file_name)
        if mask is not None and mask.any():
            raise DataError(f"{url}: column '{file_name}' has {int(mask.sum())} empty value(s) (first at row "
                            f"{int(np.flatnonzero(mask)[0])}); every row needs its cutout's file name")
        files = [str(v) for v in values]
        dup = _duplicates(files)
        if dup:
            raise DataError(f"{url}: {len(dup)} file name(s) appear more than once in column '{file_name}': "
                            f"{_first(dup)}")
    id_name = table.find(id_column) if id_column else table.find(*ID_COLUMNS)
    if id_column and id_name is None:
        raise DataError(f"{url}: no column '{id_column}' (--id-column); columns found: {found}")
    if id_name is not None:
        object_id = _catalog_ids(table, id_name)
    elif files is not None:
        object_id = np.arange(table.n, dtype=np.int64)
    else:
        raise DataError(f"{url}: no id column ({', '.join(ID_COLUMNS)}) and no file column ({', '.join(FILE_COLUMNS)})"
                        f" to join rows to cutouts; columns found: {found}")
    carried = {}
    for name in columns:
        actual = table.find(name)
        if actual is None:
            raise DataError(f"{url}: no column '{name}' (--columns); columns found: {found}")
        carried[name] = _carried(table, actual)
    return Catalog(url, object_id, mags, redshift, files, id_name, carried)


def _catalog_ids(table: _Table, name: str) -> np.ndarray:
    values, mask = table.get(name)
    if values.dtype.kind not in "iu":
        kind = "text" if values.dtype.kind in "OUS" else f"dtype {values.dtype}"
        raise DataError(f"{table.url}: id column '{name}' holds {kind}, expected integers (or name another with "
                        f"--id-column)")
    if mask is not None and mask.any():
        raise DataError(f"{table.url}: id column '{name}' has {int(mask.sum())} empty value(s) (first at row "
                        f"{int(np.flatnonzero(mask)[0])})")
    ids = _int64_ids(values, f"{table.url} (column '{name}')", 0)
    uniq, counts = np.unique(ids, return_counts=True)
    if (counts > 1).any():
        dup = [str(v) for v in uniq[counts > 1]]
        raise DataError(f"{table.url}: {len(dup)} id(s) appear more than once in column '{name}': {_first(dup)}")
    return ids


def _duplicates(items: list[str]) -> list[str]:
    seen: set[str] = set()
    dup: dict[str, None] = {}
    for item in items:
        if item in seen:
            dup[item] = None
        seen.add(item)
    return list(dup)


# ---------------------------------------------------------------- joining and reading cutouts


_INT = re.compile(r"[0-9]+\Z")


def _join(folder: str, catalog: Catalog, listed: list[str]) -> list[str]:
    """The cutout URL of each catalogue row, in catalogue order; DataError on any unmatched row or file."""
    names = [storage.basename(u) for u in listed]
    by_name = dict(zip(names, listed))
    if catalog.files is not None:
        keys: list[Any] = catalog.files
        cut_keys: dict[Any, str] = {n: n for n in names}
        how = "the catalogue's file column"
    else:
        cut_keys = {}
        not_int = []
        dup = []
        for n in names:
            stem = cutout_stem(n)
            if not _INT.match(stem):
                not_int.append(n)
                continue
            key = int(stem)
            if key in cut_keys:
                dup.append(f"{cut_keys[key]} and {n}")
            cut_keys[key] = n
        if not_int:
            raise DataError(f"{folder}: {len(not_int)} cutout name(s) are not '<id>.npy' or '<id>.fits' ("
                            f"{_first(not_int)}); name them by object id, or give the catalogue a 'file' column "
                            f"with each row's file name")
        if dup:
            raise DataError(f"{folder}: {len(dup)} id(s) have more than one cutout: {_first(dup)}")
        keys = [int(v) for v in catalog.object_id]
        how = f"id (column '{catalog.id_name}') = file name without its suffix"
    missing = [str(k) for k in keys if k not in cut_keys]
    if missing:
        raise DataError(f"{catalog.url}: {len(missing)} catalogue row(s) have no cutout in {folder} (joined by "
                        f"{how}): {_first(missing)}")
    wanted = set(keys)
    extra = [n for k, n in cut_keys.items() if k not in wanted]
    if extra:
        raise DataError(f"{folder}: {len(extra)} cutout(s) have no row in the catalogue {catalog.url} (joined by "
                        f"{how}): {_first(extra)}; add their rows or move them out of the folder")
    return [by_name[cut_keys[k]] for k in keys]


def read_cutout(url: str) -> np.ndarray:
    """One cutout [5, 32, 32] from a ``.npy`` or FITS file, as float32; DataError names the file."""
    lower = url.lower()
    if lower.endswith(".npy"):
        lpath = storage.local_path(url)
        try:
            arr = np.load(lpath if lpath is not None else io.BytesIO(storage.read_bytes(url)), allow_pickle=False)
        except (ValueError, OSError, EOFError) as exc:
            raise DataError(f"{url}: not a readable numeric .npy file ({exc})") from None
    else:
        arr = _fits_cutout(url)
    if arr.dtype.kind not in "iuf":
        raise DataError(f"{url}: cutout has dtype {arr.dtype}, expected numbers")
    if tuple(arr.shape) != IMAGE_SHAPE:
        hint = " (bands last: transpose it to [5, 32, 32])" if tuple(arr.shape) == (32, 32, 5) else ""
        raise DataError(f"{url}: cutout has shape {list(arr.shape)}, expected [5, 32, 32] (bands "
                        f"{''.join(BANDS)}, 32x32 pixels){hint}")
    return arr


def _fits_cutout(url: str) -> np.ndarray:
    from astropy.io import fits

    try:
        with _open(url) as fh, fits.open(fh, memmap=False) as hdul:
            shapes = []
            for hdu in hdul:
                if not hdu.is_image or not hdu.header.get("NAXIS"):
                    continue
                data = hdu.data
                if data is not None and data.ndim == 3:
                    return np.asarray(data)
                shapes.append(list(hdu.shape))
    except (OSError, ValueError, TypeError, EOFError) as exc:
        raise DataError(f"{url}: not a readable FITS file ({exc})") from None
    raise DataError(f"{url}: no 3-D image HDU [5, 32, 32] (image HDUs found: {shapes or 'none'})")


@dataclass
class CutoutSource:
    """A folder of cutouts joined to its catalogue: what :func:`open_cutouts` found."""

    folder: str
    catalog: Catalog
    files: list[str]
    identity: dict[str, Any]

    @property
    def total_rows(self) -> int:
        return len(self.catalog)

    def chunks(self, chunk_rows: int = CHUNK_ROWS, check: UnitsCheck | None = None) -> Iterator[Chunk]:
        """The galaxies in catalogue order, ``chunk_rows`` cutouts at a time (read by threads)."""
        cat = self.catalog
        check = check or UnitsCheck()
        check.magnitudes(cat.magnitudes, cat.url)
        with ThreadPoolExecutor(READ_THREADS) as pool:
            for start in range(0, len(cat), chunk_rows):
                stop = min(len(cat), start + chunk_rows)
                images = np.empty((stop - start, *IMAGE_SHAPE), dtype=np.float32)

                def load(i: int) -> None:
                    images[i - start] = read_cutout(self.files[i])

                list(pool.map(load, range(start, stop)))
                check.images(images, self.files[start:stop])
                part = Partition(images, cat.magnitudes[start:stop], cat.object_id[start:stop],
                                 None if cat.redshift is None else cat.redshift[start:stop],
                                 {k: v[start:stop] for k, v in cat.columns.items()})
                yield Chunk(cat.url, start, part.validate(cat.url, allow_nonfinite=True), has_ids=True)


def open_cutouts(folder: str, catalog: str, columns: list[str] | None = None,
                 id_column: str | None = None) -> CutoutSource:
    """Read the catalogue, list the cutouts and join them; every mismatch is a DataError before any cutout
    is read."""
    if storage.size(folder) is not None:
        raise ConfigError(f"{folder}: --catalog needs a folder of per-galaxy cutouts as SRC, not a file")
    listed = storage.list_files_with_info(folder, suffixes=tuple(CUTOUT_SUFFIXES) +
                                          tuple(s.upper() for s in CUTOUT_SUFFIXES))
    if not listed:
        what = "not found" if not storage.exists(folder) else "holds no cutouts (.npy or FITS files)"
        raise DataError(f"{folder}: {what}")
    cat = read_catalog(catalog, columns, id_column)
    files = _join(folder, cat, [u for u, _, _ in listed])
    listing = "".join(f"{storage.basename(u)}\t{n}\t{mark}\n" for u, n, mark in listed)
    cat_info = storage.file_info(catalog)
    identity = {"source": _canonical(folder), "cutouts": len(listed), "listing_sha256": sha256_hex(listing.encode()),
                "catalog": _canonical(catalog), "catalog_file": list(cat_info) if cat_info else None,
                "columns": list(cat.columns), "id_column": id_column}
    return CutoutSource(folder, cat, files, identity)


def _canonical(url: str) -> str:
    lpath = storage.local_path(url)
    return os.path.realpath(lpath) if lpath is not None else url.rstrip("/")


def convert_cutouts(folder: str, catalog: str, out: str, columns: list[str] | None = None,
                    id_column: str | None = None, partition_size: str | int = "25MB", drop_nonfinite: bool = False,
                    progress: bool = False, replace: bool = False) -> Any:
    """Convert a folder of cutouts and its catalogue into a native dataset at ``out``; returns the
    :class:`~cosmicai.data.split.WriteReport`. Resumes, replaces or refuses a dataset already at ``out`` as
    :func:`cosmicai.data.split.split` does."""
    from .split import rows_per_partition, with_id, write_dataset

    rows = rows_per_partition(partition_size)
    if _canonical(out) == _canonical(folder):
        raise ConfigError(f"--out {out}: the output must differ from the cutouts folder {folder}")
    source = open_cutouts(folder, catalog, columns, id_column)
    identity = with_id({**source.identity, "rows_per_partition": rows, "drop_nonfinite": bool(drop_nonfinite)})
    return write_dataset(source.chunks(), out, rows, drop_nonfinite=drop_nonfinite, progress=progress,
                         total_rows=source.total_rows,
                         description=f"from {len(source.files)} cutouts in {folder} with catalogue {catalog}, "
                                     f"partitions of {partition_size}",
                         identity=identity, replace=replace)
