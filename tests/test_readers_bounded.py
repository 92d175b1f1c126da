"""Readers check before they allocate: checkpoints whose storages inflate far beyond the file, junk files named
like partitions, out-of-memory reads, scaled-integer FITS, HDF5 links, and predictions for zero rows."""

from __future__ import annotations

import io
import json
import subprocess
import sys
import textwrap
import zipfile
import zlib
from pathlib import Path
from unittest import mock

import numpy as np
import pytest

from conftest import make_random_partition

from cosmicai.cli import main
from cosmicai.errors import DataError, ModelError

GiB = 1 << 30


class _RepeatingDeflate:
    """A deflate compressor for a stream of one repeated block: each block is full-flushed, so its compressed
    bytes are the same every time and are computed once (a 2 GiB entry is written in well under a second)."""

    def __init__(self) -> None:
        self._z = zlib.compressobj(9, zlib.DEFLATED, -15)
        self._done: dict[int, bytes] = {}

    def compress(self, data: bytes) -> bytes:
        if id(data) not in self._done:
            self._done[id(data)] = self._z.compress(data) + self._z.flush(zlib.Z_FULL_FLUSH)
        return self._done[id(data)]

    def flush(self) -> bytes:
        return self._z.flush()


def inflating_checkpoint(path: Path, inflated: int = 2 * GiB, obj=None) -> Path:
    """``torch.save(obj)`` whose first storage entry is rewritten as a deflated entry of ``inflated`` zero bytes
    (a real, CRC-valid zip member; the file stays ~2 MB)."""
    import torch

    buf = io.BytesIO()
    torch.save(obj if obj is not None else {"w": torch.zeros(4)}, buf)
    src = zipfile.ZipFile(io.BytesIO(buf.getvalue()))
    victim = next(n for n in src.namelist() if "/data/" in n and not n.endswith(".pkl"))
    block = bytes(1 << 20)
    with zipfile.ZipFile(path, "w") as out:
        for info in src.infolist():
            if info.filename != victim:
                out.writestr(info, src.read(info.filename))
                continue
            entry = zipfile.ZipInfo(info.filename)
            entry.compress_type = zipfile.ZIP_DEFLATED
            with mock.patch.object(zipfile, "_get_compressor", lambda *a, **k: _RepeatingDeflate()):
                with out.open(entry, "w", force_zip64=True) as fh:
                    for _ in range(inflated // len(block)):
                        fh.write(block)
    assert zipfile.ZipFile(path).getinfo(victim).file_size == inflated
    return path


def _cai_measured(*args: str) -> tuple[int, str, float, float]:
    """Run ``cai ARGS`` in a fresh process: (exit code, stderr, peak RSS in MB, seconds). The peak is VmHWM, this
    process's own (ru_maxrss would carry over the forking pytest's across exec)."""
    code = textwrap.dedent(f"""
        import sys, time
        from cosmicai.cli import main
        t = time.perf_counter()
        rc = main({list(args)!r})
        hwm = next(int(l.split()[1]) for l in open("/proc/self/status") if l.startswith("VmHWM"))
        sys.stdout.write("\\nMEASURED %d %d %.3f" % (rc, hwm, time.perf_counter() - t))
    """)
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=300)
    tail = proc.stdout.rsplit("MEASURED ", 1)
    assert len(tail) == 2, proc.stdout + proc.stderr
    rc, rss_kb, seconds = tail[1].split()
    return int(rc), proc.stderr, int(rss_kb) / 1024, float(seconds)


def _one_line(err: str) -> str:
    lines = [line for line in err.splitlines() if line.strip()]
    assert len(lines) == 1 and lines[0].startswith("cai: error: "), err
    return lines[0]


@pytest.fixture(scope="module")
def bomb(tmp_path_factory) -> Path:
    return inflating_checkpoint(tmp_path_factory.mktemp("bomb") / "inflates.pt")


# ----------------------------------------------------------------------------------------------- checkpoints

def test_import_cai_refuses_a_checkpoint_that_inflates_to_2gib(bomb, tmp_path):
    assert bomb.stat().st_size < 3_000_000
    out = tmp_path / "w.safetensors"
    rc, err, rss_mb, seconds = _cai_measured("model", "import-cai", str(bomb), "--out", str(out))
    line = _one_line(err)
    assert rc == 2 and str(bomb) in line and "refused before inflating anything" in line
    assert "2,147,483," in line  # the declared size, named
    assert rss_mb < 800 and seconds < 30, (rss_mb, seconds, line)  # was 4.4 GB before the check
    assert not out.exists()


def test_weights_option_refuses_the_same_checkpoint(bomb):
    rc, err, rss_mb, _ = _cai_measured("model", "info", "--name", "astromae", "--weights", str(bomb),
                                       "--engine", "torch")
    line = _one_line(err)
    assert rc == 2 and str(bomb) in line and "refused before inflating" in line
    assert rss_mb < 800, rss_mb


def test_storage_entry_larger_than_its_tensor_is_refused(tmp_path):
    """Within the model-sized cap, an entry must still inflate to exactly what its tensors declare."""
    import torch

    from cosmicai.models.astromae.checkpoint import read_checkpoint

    path = inflating_checkpoint(tmp_path / "w.pt", inflated=64 << 20, obj={"w": torch.zeros(4)})
    with pytest.raises(ModelError, match=r"w\.pt: storage '0' inflates to 67,108,864 bytes but its tensors "
                                         r"declare 16; refused before inflating it"):
        read_checkpoint(path.read_bytes(), str(path))


def test_legacy_partition_that_inflates_is_refused(tmp_path):
    import torch
    from torch.utils.data import TensorDataset

    from cosmicai.data.partition import read_partition

    ds = TensorDataset(torch.zeros(1, 5, 32, 32), torch.zeros(1, 5, dtype=torch.float64), torch.zeros(1))
    path = inflating_checkpoint(tmp_path / "1.pt", inflated=256 << 20, obj=ds)
    with pytest.raises(DataError, match=r"1\.pt: its zip entries inflate to 268,4\d\d,\d\d\d bytes from a "
                                        r"[\d,]+-byte file, more than the file's own size"):
        read_partition(str(path))


# ----------------------------------------------------------------------------------------------- partitions

def test_junk_partition_fails_on_its_header_without_being_read(tmp_path):
    folder = tmp_path / "junk"
    folder.mkdir()
    junk = folder / "part-000001.safetensors"
    with open(junk, "wb") as fh:
        fh.truncate(2 * GiB)  # sparse: 2 GiB of zeros that take no disk
    rc, err, rss_mb, seconds = _cai_measured("data", "convert", str(folder), "--out", str(tmp_path / "out"),
                                           "--quiet")
    line = _one_line(err)
    assert rc == 2 and str(junk) in line and "header length 0, file 2147483648 bytes" in line
    assert rss_mb < 500 and seconds < 20, (rss_mb, seconds)  # reading it whole took 2 GB

    code = ("import time; from cosmicai.data.partition import read_partition_bytes\n"
            "peak = lambda: next(int(l.split()[1]) for l in open('/proc/self/status')\n"
            "                    if l.startswith('VmHWM')) // 1024\n"
            "before, t = peak(), time.perf_counter()\n"
            f"try: read_partition_bytes({str(junk)!r})\n"
            "except Exception as exc: print(type(exc).__name__, exc)\n"
            "print(peak() - before, time.perf_counter() - t)")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120).stdout
    message, figures = out.strip().splitlines()
    assert message.startswith(f"DataError {junk}: truncated or corrupt safetensors header")
    grown_mb, seconds = figures.split()
    assert int(grown_mb) < 20 and float(seconds) < 5, figures  # the pipeline's read grew 2 GB before


@pytest.mark.s3
def test_junk_partition_on_s3_is_refused_after_a_ranged_read(s3_url, monkeypatch):
    from cosmicai import storage
    from cosmicai.data.partition import read_partition_bytes

    url = storage.join(s3_url, "part-000001.safetensors")
    header = json.dumps({"__metadata__": {"format": "something-else"}}).encode()
    storage.write_bytes(url, len(header).to_bytes(8, "little") + header + bytes(8 << 20))
    monkeypatch.setattr(storage, "read_bytes", lambda u: pytest.fail(f"the whole of {u} was read"))
    with pytest.raises(DataError, match=r"part-000001\.safetensors: not a cosmicai partition \(metadata "
                                        r"format='something-else'\)"):
        read_partition_bytes(url)


def test_out_of_memory_read_names_the_file_and_its_size(tmp_path):
    """A valid header announcing 1 GiB of tensors, read under a memory cap: one line, not `MemoryError: `."""
    n = GiB // (4 * 5 * 32 * 32) + 1
    tensors = {"images": ("F32", [n, 5, 32, 32], 4 * 5 * 32 * 32 * n), "magnitudes": ("F32", [n, 5], 20 * n),
               "object_id": ("I64", [n], 8 * n)}
    header, offset = {"__metadata__": {"format": "cosmicai-partition", "format_version": "1",
                                       "bands": "u,g,r,i,z"}}, 0
    for name, (dtype, shape, size) in tensors.items():
        header[name] = {"dtype": dtype, "shape": shape, "data_offsets": [offset, offset + size]}
        offset += size
    raw = json.dumps(header).encode()
    path = tmp_path / "part-000001.safetensors"
    with open(path, "wb") as fh:
        fh.write(len(raw).to_bytes(8, "little") + raw)
        fh.truncate(8 + len(raw) + offset)
    code = textwrap.dedent(f"""
        import resource
        from cosmicai.data.partition import read_partition_bytes
        vm = next(int(l.split()[1]) for l in open("/proc/self/status") if l.startswith("VmSize")) * 1024
        resource.setrlimit(resource.RLIMIT_AS, (vm + (256 << 20), vm + (256 << 20)))
        try:
            read_partition_bytes({str(path)!r})
        except Exception as exc:
            print(type(exc).__name__, exc)
    """)
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    size = 8 + len(raw) + offset
    assert out.stdout.strip() == (f"OutOfMemoryError {path}: out of memory reading the {size:,}-byte partition; give the "
                                  f"worker more memory or split the dataset into smaller partitions (cai data "
                                  f"split --partition-size)"), out.stdout + out.stderr


# ----------------------------------------------------------------------------------------------- FITS, HDF5

@pytest.mark.parametrize("dtype,bscale,bzero", [(np.int16, 0.001, 2.5), (np.int32, 1e-6, -3.0),
                                                (np.int16, 1.0, 32768.0)])
def test_scaled_integer_fits_is_read_scaled_as_float32(tmp_path, dtype, bscale, bzero):
    from astropy.io import fits

    from cosmicai.data.partition import read_partition

    part = make_random_partition(6, seed=4)
    rng = np.random.default_rng(0)
    raw = rng.integers(-30000, 30000, size=(6, 5, 32, 32)).astype(dtype)
    image = fits.ImageHDU(raw, name="IMAGES")
    image.header["BSCALE"], image.header["BZERO"] = bscale, bzero
    table = fits.BinTableHDU.from_columns([fits.Column(name="magnitudes", format="5E", array=part.magnitudes),
                                           fits.Column(name="redshift", format="E", array=part.redshift)],
                                          name="CATALOG")
    src = tmp_path / "scaled.fits"
    fits.HDUList([fits.PrimaryHDU(), image, table]).writeto(src)
    assert fits.getheader(src, 1)["BITPIX"] == 8 * np.dtype(dtype).itemsize  # stored as scaled integers
    out = tmp_path / "out"
    assert main(["data", "convert", str(src), "--out", str(out), "--quiet"]) == 0
    got = read_partition(str(out / "part-000001.safetensors"))
    assert got.images.dtype == np.float32
    assert np.array_equal(got.images, (raw.astype(np.float64) * bscale + bzero).astype(np.float32))
    np.testing.assert_allclose(got.images, fits.getdata(src, 1).astype(np.float64), rtol=1e-6, atol=1e-5)
    assert np.array_equal(got.magnitudes, part.magnitudes)


@pytest.mark.parametrize("kind,says", [
    ("external", "is an external link to elsewhere.h5:/images"),
    ("external-missing", "is an external link to missing.h5:/images"),
    ("soft", "is a soft link to /stored"),
    ("loop", "is a soft link to /images"),
    ("virtual", "is a virtual dataset (its data lives in other files)"),
])
def test_hdf5_links_get_one_line_naming_file_and_path(tmp_path, capsys, kind, says):
    import h5py

    part = make_random_partition(3, seed=5)
    with h5py.File(tmp_path / "elsewhere.h5", "w") as f:
        f["images"] = part.images
    src = tmp_path / f"{kind}.h5"
    with h5py.File(src, "w") as f:
        f["magnitudes"] = part.magnitudes
        if kind == "external":
            f["images"] = h5py.ExternalLink("elsewhere.h5", "/images")
        elif kind == "external-missing":
            f["images"] = h5py.ExternalLink("missing.h5", "/images")
        elif kind == "soft":
            f["stored"] = part.images
            f["images"] = h5py.SoftLink("/stored")
        elif kind == "loop":
            f["images"] = h5py.SoftLink("/images")
        else:
            layout = h5py.VirtualLayout(shape=part.images.shape, dtype="f4")
            layout[:] = h5py.VirtualSource("elsewhere.h5", "images", shape=part.images.shape)
            f.create_virtual_dataset("images", layout)
    assert main(["data", "convert", str(src), "--out", str(tmp_path / "out"), "--quiet"]) == 2
    line = _one_line(capsys.readouterr().err)
    assert f"{src}: HDF5 dataset '/images' {says}" in line
    assert not (tmp_path / "out").exists()


# ----------------------------------------------------------------------------------------------- zero rows

def test_predict_on_zero_rows_returns_an_empty_float32_array():
    import cosmicai
    from cosmicai.models.registry import load_model

    images, mags = np.zeros((0, 5, 32, 32)), np.zeros((0, 5))
    for mode in ("exact", "fast"):
        out = cosmicai.predict(images, mags, mode=mode)
        assert out.dtype == np.float32 and out.shape == (0,), mode
        for engine in ("torch", "onnxruntime"):
            model = load_model("astromae-demo", mode=mode, engine=engine)
            out = model.predict(images, mags)
            assert out.dtype == np.float32 and out.shape == (0,), (mode, engine)
            assert model.last_flagged.shape == (0,)


def test_ort_runner_on_zero_rows():
    from cosmicai.models.registry import load_model

    model = load_model("astromae-demo", engine="onnxruntime")
    out = model._run(np.zeros((0, 5, 32, 32), np.float32), np.zeros((0, 5), np.float32))
    assert out.dtype == np.float32 and out.shape == (0,)
