"""Sources: readers for every format ``cai data convert``/``split`` accept, streamed as row chunks;
:func:`cosmicai.data.split.split` writes any of them as a native dataset (split.py imports this module, never the
reverse).

A source is a file or a folder (local path or ``s3://``):

==========================  =========================================================================
native dataset folder       ``manifest.json`` + ``*.safetensors`` (or, without a manifest, a listing)
``.safetensors``            one native partition
``.pt``                     an original CAI partition (``TensorDataset``; no object ids)
``.h5`` / ``.hdf5``         datasets ``images`` [N,5,32,32], ``magnitudes`` [N,5], optional
                            ``redshift`` [N] and ``object_id`` [N] at the file's root
``.npz``                    arrays with those same keys (loaded with ``allow_pickle=False``)
folder of ``.npy`` files    ``images.npy``, ``magnitudes.npy`` and optional ``redshift.npy``,
                            ``object_id.npy`` (a lone ``.npy`` holds one array: not enough, error)
``.fits`` / ``.fit``        an image HDU with data [N,5,32,32] (FITS axes NAXIS1=32, NAXIS2=32, NAXIS3=5,
(also ``.fits.gz``)         NAXIS4=N; the extension named ``IMAGES`` if present, else the first 4-D HDU)
                            and a binary table (``CATALOG`` if present, else the first table) with
                            magnitudes as one 5-element vector column ``magnitudes`` or five columns
                            ``u g r i z`` (or ``mag_u`` ... ``mag_z``), optional ``redshift`` and
                            ``object_id`` columns
folder of any of the above  every supported file in natural numeric order
==========================  =========================================================================

Images and magnitudes must be floating point (cast to float32), object ids integers. Sources without object
ids get the row's index in the whole source (0-based, counted before any row is dropped).
"""

from __future__ import annotations

import io
import os
from dataclasses import dataclass
from typing import Any, Callable, Iterator

import numpy as np

from .. import storage
from ..errors import DataError
from .formats import BANDS, MANIFEST_NAME, Partition, read_manifest
from .partition import (FITS_SUFFIXES, HDF5_SUFFIXES, PARTITION_SUFFIXES, check_listed_name, partition_format,
                        read_partition)

#: Rows read at a time from HDF5/FITS/npz/npy sources.
CHUNK_ROWS = 4096
#: Partition files fetched ahead while earlier ones are re-partitioned.
PREFETCH = 8
SUPPORTED_SUFFIXES = PARTITION_SUFFIXES + (".npz",) + HDF5_SUFFIXES + FITS_SUFFIXES
NPY_KEYS = ("images", "magnitudes", "redshift", "object_id")


@dataclass
class Chunk:
    """Rows read from one source file: ``offset`` is the first row's index within that file."""

    source: str
    offset: int
    part: Partition
    has_ids: bool


def _suffix_of(url: str) -> str:
    name = storage.basename(url).lower()
    for suffix in SUPPORTED_SUFFIXES + (".npy",):
        if name.endswith(suffix):
            return suffix
    return os.path.splitext(name)[1] or name


def _open(url: str) -> Any:
    """A binary file object for ``url`` (local file or lazily ranged remote object)."""
    lpath = storage.local_path(url)
    if lpath is not None:
        return open(lpath, "rb")
    fs, path = storage.filesystem(url)
    return fs.open(path, "rb")


def _float32(arr: Any, name: str, source: str) -> np.ndarray:
    arr = np.asarray(arr)
    if not np.issubdtype(arr.dtype, np.floating):
        raise DataError(f"{source}: '{name}' has dtype {arr.dtype}, expected floating point (stored as float32)")
    return np.ascontiguousarray(arr, dtype=np.float32)


def make_partition(source: str, images: Any, magnitudes: Any, redshift: Any = None, object_id: Any = None,
                   first_row: int = 0) -> tuple[Partition, bool]:
    """Check and coerce raw arrays into a Partition (non-finite values allowed; the writer decides).

    Returns the partition and whether ``object_id`` came from the source (else ids are ``first_row + i``).
    """
    imgs = _float32(images, "images", source)
    if imgs.ndim != 4 or imgs.shape[1:] != (5, 32, 32):
        bands = f" ({imgs.shape[1]} bands, expected 5: {''.join(BANDS)})" if imgs.ndim == 4 else ""
        raise DataError(f"{source}: 'images' has shape {list(imgs.shape)}, expected [N, 5, 32, 32]{bands}")
    n = imgs.shape[0]
    mags = _float32(magnitudes, "magnitudes", source)
    if mags.shape != (n, len(BANDS)):
        raise DataError(f"{source}: 'magnitudes' has shape {list(mags.shape)}, expected [{n}, 5] (bands "
                        f"{''.join(BANDS)})")
    z = None
    if redshift is not None:
        z = _float32(redshift, "redshift", source)
        if z.ndim == 2 and z.shape[1] == 1:
            z = z[:, 0]
        if z.shape != (n,):
            raise DataError(f"{source}: 'redshift' has shape {list(z.shape)}, expected [{n}]")
    if object_id is None:
        ids, has_ids = np.arange(first_row, first_row + n, dtype=np.int64), False
    else:
        ids = np.asarray(object_id)
        if not np.issubdtype(ids.dtype, np.integer):
            raise DataError(f"{source}: 'object_id' has dtype {ids.dtype}, expected integers")
        if ids.shape != (n,):
            raise DataError(f"{source}: 'object_id' has shape {list(ids.shape)}, expected [{n}]")
        ids, has_ids = _int64_ids(ids, source, first_row), True
    part = Partition(images=imgs, magnitudes=mags, object_id=ids, redshift=z)
    return part.validate(source, allow_nonfinite=True), has_ids


INT64_MAX = np.iinfo(np.int64).max


def _int64_ids(ids: np.ndarray, source: str, first_row: int) -> np.ndarray:
    """Object ids as int64 (the native type), exactly: unsigned ids of 2**63 or more do not fit and are
    refused, naming the file, the column and the first such value (casting would wrap them negative)."""
    if ids.dtype.kind == "u" and ids.dtype.itemsize >= 8 and ids.size:
        too_big = ids > INT64_MAX
        if too_big.any():
            rows = np.flatnonzero(too_big)
            raise DataError(f"object_id {int(ids[rows[0]])} in {source} (row {first_row + int(rows[0])}, the first "
                            f"such) does not fit int64, the native object_id type (at most {INT64_MAX}); map "
                            f"the ids below 2**63 before converting")
    return np.ascontiguousarray(ids, dtype=np.int64)


def _sliced(source: str, n: int, fetch: Callable[[slice], dict[str, Any]], chunk_rows: int) -> Iterator[Chunk]:
    """Chunks of ``chunk_rows`` rows from a row-indexable source (``fetch(slice) -> arrays``)."""
    for start in range(0, n, chunk_rows):
        arrays = fetch(slice(start, min(n, start + chunk_rows)))
        part, has_ids = make_partition(source, first_row=start, **arrays)
        yield Chunk(source, start, part, has_ids)


def _check_lengths(source: str, arrays: dict[str, Any]) -> int:
    lengths = {k: (v.shape[0] if getattr(v, "ndim", 0) else None) for k, v in arrays.items() if v is not None}
    n = lengths.get("images")
    if n is None:
        raise DataError(f"{source}: 'images' has shape {list(getattr(arrays['images'], 'shape', []))}, "
                        f"expected [N, 5, 32, 32]")
    bad = {k: v for k, v in lengths.items() if v != n}
    if bad:
        raise DataError(f"{source}: arrays have different row counts: images {n}, "
                        + ", ".join(f"{k} {v}" for k, v in bad.items()))
    return int(n)


def _require(source: str, keys: Any, what: str) -> None:
    missing = [k for k in ("images", "magnitudes") if k not in keys]
    if missing:
        raise DataError(f"{source}: missing {what} {missing}; needs images [N,5,32,32] and magnitudes [N,5] "
                        f"(optional redshift [N], object_id [N])")


def _hdf5_dataset(h5: Any, key: str, url: str) -> Any:
    """Dataset ``/key`` of an open HDF5 file, stored in that file itself: soft and external links (loops
    included), virtual datasets and external raw storage are refused naming the file and the path, before
    any link is followed or anything outside the file is read."""
    import h5py

    where = f"{url}: HDF5 dataset '/{key}'"
    fix = "store the data in the file itself (e.g. h5copy, or h5py: f['/" + key + "'] = other[...])"
    link = h5.get(key, getlink=True)
    if isinstance(link, h5py.ExternalLink):
        raise DataError(f"{where} is an external link to {link.filename}:{link.path}; cosmicai reads only data "
                        f"stored in the file: {fix}")
    if isinstance(link, h5py.SoftLink):
        raise DataError(f"{where} is a soft link to {link.path}; cosmicai reads only datasets stored under their "
                        f"own name: {fix}")
    if not isinstance(link, h5py.HardLink):
        raise DataError(f"{where} is a {type(link).__name__}, not a dataset stored in the file: {fix}")
    try:
        obj = h5[key]
    except (KeyError, OSError, RuntimeError) as exc:
        raise DataError(f"{where} cannot be opened ({exc})") from None
    if not isinstance(obj, h5py.Dataset):
        raise DataError(f"{url}: '{key}' is an HDF5 group, expected a dataset")
    if obj.is_virtual or obj.external:
        what = "a virtual dataset (its data lives in other files)" if obj.is_virtual else \
            "stored in external raw file(s)"
        raise DataError(f"{where} is {what}; cosmicai reads only data stored in the file: {fix}")
    return obj


def _iter_hdf5(url: str, chunk_rows: int) -> Iterator[Chunk]:
    import h5py

    with _open(url) as fh:
        try:
            h5 = h5py.File(fh, "r")
        except OSError as exc:
            raise DataError(f"{url}: not a readable HDF5 file ({exc})") from None
        with h5:
            _require(url, h5.keys(), "dataset(s)")
            dsets = {k: _hdf5_dataset(h5, k, url) for k in NPY_KEYS if k in h5}
            n = _check_lengths(url, dsets)
            yield from _sliced(url, n, lambda s: {k: d[s] for k, d in dsets.items()}, chunk_rows)


def _iter_npz(url: str, chunk_rows: int) -> Iterator[Chunk]:
    data = storage.read_bytes(url)
    try:
        npz = np.load(io.BytesIO(data), allow_pickle=False)
    except Exception as exc:  # noqa: BLE001 - numpy raises several types for a bad zip
        raise DataError(f"{url}: not a readable .npz archive ({exc})") from None
    with npz:
        _require(url, npz.files, "array(s)")
        try:
            arrays = {k: npz[k] for k in NPY_KEYS if k in npz.files}
        except ValueError as exc:  # object arrays need pickle: refused
            raise DataError(f"{url}: {exc} (object arrays are refused; store numeric arrays)") from None
    n = _check_lengths(url, arrays)
    yield from _sliced(url, n, lambda s: {k: a[s] for k, a in arrays.items()}, chunk_rows)


def _iter_npy_dir(url: str, chunk_rows: int) -> Iterator[Chunk]:
    arrays: dict[str, Any] = {}
    for key in NPY_KEYS:
        file_url = storage.join(url, f"{key}.npy")
        if storage.size(file_url) is None:
            continue
        lpath = storage.local_path(file_url)
        try:
            if lpath is not None:
                arrays[key] = np.load(lpath, mmap_mode="r", allow_pickle=False)
            else:
                arrays[key] = np.load(io.BytesIO(storage.read_bytes(file_url)), allow_pickle=False)
        except ValueError as exc:
            raise DataError(f"{file_url}: not a readable numeric .npy file ({exc})") from None
    _require(url, arrays, "file(s) (as <key>.npy)")
    n = _check_lengths(url, arrays)
    yield from _sliced(url, n, lambda s: {k: a[s] for k, a in arrays.items()}, chunk_rows)


def _fits_columns(url: str, table: Any) -> dict[str, Any]:
    names = {name.lower(): name for name in table.columns.names}
    cols: dict[str, Any] = {}
    if "magnitudes" in names:
        cols["magnitudes"] = names["magnitudes"]
    elif all(b in names for b in BANDS):
        cols["magnitudes"] = [names[b] for b in BANDS]
    elif all(f"mag_{b}" in names for b in BANDS):
        cols["magnitudes"] = [names[f"mag_{b}"] for b in BANDS]
    else:
        raise DataError(f"{url}: the FITS table has no magnitudes (columns found: {table.columns.names}); "
                        f"expected a 5-element column 'magnitudes' or columns u g r i z (or mag_u ... mag_z)")
    for key in ("redshift", "object_id"):
        if key in names:
            cols[key] = names[key]
    return cols


def _fits_scaling(header: Any, url: str) -> Callable[[np.ndarray], np.ndarray] | None:
    """The FITS scaling of an image HDU (physical = BZERO + BSCALE * stored, BLANK -> NaN) as a function of a
    raw block returning float32, or None when its values are stored as they are."""
    bscale, bzero, blank = header.get("BSCALE", 1), header.get("BZERO", 0), header.get("BLANK")
    integer = int(header.get("BITPIX", -32)) > 0
    if bscale == 1 and bzero == 0 and not (integer and "BSCALE" in header or integer and "BZERO" in header):
        return None
    try:
        bscale, bzero = float(bscale), float(bzero)
    except (TypeError, ValueError):
        raise DataError(f"{url}: FITS image has a non-numeric BSCALE {bscale!r} or BZERO {bzero!r}") from None

    def scale(raw: np.ndarray) -> np.ndarray:
        out = (np.asarray(raw, dtype=np.float64) * bscale + bzero).astype(np.float32)
        if integer and blank is not None:
            out[np.asarray(raw) == blank] = np.nan
        return out

    return scale


def _iter_fits(url: str, chunk_rows: int) -> Iterator[Chunk]:
    from astropy.io import fits

    lpath = storage.local_path(url)
    try:
        # Raw values, so that scaled integers stay memory-mapped; _fits_scaling applies BSCALE/BZERO per chunk.
        hdul = fits.open(lpath if lpath is not None else _open(url), memmap=lpath is not None, lazy_load_hdus=False,
                         do_not_scale_image_data=True)
    except (OSError, ValueError, TypeError) as exc:
        raise DataError(f"{url}: not a readable FITS file ({exc})") from None
    with hdul:
        image_hdus = [h for h in hdul if h.is_image and h.header.get("NAXIS", 0) > 0]
        tables = [h for h in hdul if isinstance(h, fits.BinTableHDU)]
        named = [h for h in image_hdus if h.name.upper() == "IMAGES"]
        cubes = named or [h for h in image_hdus if h.header.get("NAXIS") == 4]
        if not cubes:
            shapes = [list(h.shape) for h in image_hdus]
            hint = ("; it holds one galaxy: for a folder of per-galaxy cutouts give their catalogue: cai data "
                    "convert FOLDER --catalog CATALOG --out DATASET") if [5, 32, 32] in shapes else ""
            raise DataError(f"{url}: no image HDU of shape [N, 5, 32, 32] (image HDUs found: {shapes or 'none'})"
                            f"{hint}")
        if not tables:
            raise DataError(f"{url}: no binary table HDU with magnitudes (and optional redshift, object_id)")
        table = next((t for t in tables if t.name.upper() == "CATALOG"), tables[0])
        images = cubes[0].data
        scale = _fits_scaling(cubes[0].header, url)
        cols = _fits_columns(url, table)
        rows = table.data
        n = _check_lengths(url, {"images": images, "magnitudes": rows})

        def fetch(s: slice) -> dict[str, Any]:
            block = rows[s]
            mags = cols["magnitudes"]
            out: dict[str, Any] = {"images": images[s] if scale is None else scale(images[s])}
            if isinstance(mags, list):
                out["magnitudes"] = np.stack([np.asarray(block[c]) for c in mags], axis=1)
            else:
                out["magnitudes"] = np.asarray(block[mags])
            for key in ("redshift", "object_id"):
                if key in cols:
                    out[key] = np.asarray(block[cols[key]])
            return out

        yield from _sliced(url, n, fetch, chunk_rows)


def _iter_partition_file(url: str, _chunk_rows: int = CHUNK_ROWS) -> Iterator[Chunk]:
    part = read_partition(url, allow_nonfinite=True)
    yield Chunk(url, 0, part, has_ids=partition_format(url).object_ids)


def _prefetched_partitions(urls: list[str], depth: int = PREFETCH) -> Iterator[Chunk]:
    """Partition files in order, up to ``depth`` fetched and decoded ahead by threads (hides S3 latency)."""
    from concurrent.futures import ThreadPoolExecutor

    with ThreadPoolExecutor(min(depth, len(urls))) as pool:
        pending = [pool.submit(read_partition, u, True) for u in urls[:depth]]
        for i, url in enumerate(urls):
            part = pending[i].result()
            pending[i] = None  # type: ignore[call-overload]
            if i + depth < len(urls):
                pending.append(pool.submit(read_partition, urls[i + depth], True))
            yield Chunk(url, 0, part, has_ids=partition_format(url).object_ids)


FILE_READERS: dict[str, Callable[[str, int], Iterator[Chunk]]] = {
    **{s: _iter_fits for s in FITS_SUFFIXES}, **{s: _iter_hdf5 for s in HDF5_SUFFIXES}, ".npz": _iter_npz,
    **{s: _iter_partition_file for s in PARTITION_SUFFIXES},
}


@dataclass
class Source:
    """What ``url`` holds: its kind, the files to read in order, and the row count when known cheaply."""

    url: str
    kind: str
    files: list[str]
    total_rows: int | None = None

    def chunks(self, chunk_rows: int = CHUNK_ROWS) -> Iterator[Chunk]:
        """The source's rows in order, a chunk at a time (bounded memory)."""
        if self.kind == "npy-folder":
            yield from _iter_npy_dir(self.url, chunk_rows)
            return
        partition_files = all(_suffix_of(u) in PARTITION_SUFFIXES for u in self.files)
        if partition_files and len(self.files) > 1:
            yield from _prefetched_partitions(self.files)
            return
        for file_url in self.files:
            yield from FILE_READERS[_suffix_of(file_url)](file_url, chunk_rows)


def _file_source(url: str, size: int) -> Source:
    suffix = _suffix_of(url)
    if suffix == ".npy":
        raise DataError(f"{url}: a single .npy file holds one array, not a dataset; give a folder with images.npy "
                        f"and magnitudes.npy (optional redshift.npy, object_id.npy) or one .npz with those keys")
    if suffix not in FILE_READERS:
        raise DataError(f"{url}: unsupported format '{suffix}' (supported: {', '.join(SUPPORTED_SUFFIXES)}, "
                        f"a folder of .npy files, or a dataset folder)")
    if size == 0:
        raise DataError(f"{url}: empty file")
    return Source(url, suffix.lstrip("."), [url])


def open_source(url: str) -> Source:
    """Work out what ``url`` holds; DataError when it is missing, empty or of an unsupported format."""
    size = storage.size(url)
    if size is not None:
        return _file_source(url, size)
    manifest = read_manifest(url)
    if manifest is not None:
        if not manifest.partitions:
            raise DataError(f"{storage.join(url, MANIFEST_NAME)}: the manifest lists no partitions")
        return Source(url, "native-dataset", [storage.join(url, p.name) for p in manifest.partitions],
                      manifest.total_rows)
    listed = storage.list_files_with_sizes(url)
    if not listed:
        if not storage.exists(url):
            raise DataError(f"{url}: source not found")
        raise DataError(f"{url}: empty folder (no files to convert)")
    for u, _ in listed:
        if _suffix_of(u) in FILE_READERS or u.endswith(".npy"):
            check_listed_name(storage.basename(u), url)
    names = {storage.basename(u) for u, _ in listed}
    if "images.npy" in names:
        return Source(url, "npy-folder", [u for u, _ in listed if u.endswith(".npy")])
    files = [(u, s) for u, s in listed if _suffix_of(u) in FILE_READERS]
    if not files and any(u.endswith(".npy") for u, _ in listed):
        raise DataError(f"{url}: .npy files but no images.npy: for per-galaxy cutouts ([5, 32, 32] each) give "
                        f"their catalogue: cai data convert {url} --catalog CATALOG --out DATASET (see docs/data.md)")
    if not files:
        found = sorted({_suffix_of(u) for u, _ in listed})
        raise DataError(f"{url}: no supported files in the folder (found {', '.join(found)}; supported: "
                        f"{', '.join(SUPPORTED_SUFFIXES)}, or images.npy + magnitudes.npy)")
    for u, s in files:
        if s == 0:
            raise DataError(f"{u}: empty file")
    kinds = sorted({_suffix_of(u).lstrip(".") for u, _ in files})
    return Source(url, "folder of " + "/".join(kinds), [u for u, _ in files])
