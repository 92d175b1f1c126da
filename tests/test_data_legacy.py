"""Original CAI .pt partitions: read identically, and never execute a pickle's payload."""

from __future__ import annotations

import io
import os

import numpy as np
import pytest
import torch
from torch.utils.data import TensorDataset

from cosmicai.data.legacy import read_legacy_pt, write_legacy_pt
from cosmicai.data.partition import read_partition
from cosmicai.errors import DataError, UnsafePickleError


def _saved(obj) -> bytes:
    buf = io.BytesIO()
    torch.save(obj, buf)
    return buf.getvalue()


def test_original_layout_reads_identically(tmp_path):
    torch.manual_seed(0)
    images = torch.rand(6, 5, 32, 32)
    mags = (torch.rand(6, 5, dtype=torch.float64) * 10 + 14)
    z = torch.rand(6) * 0.4
    path = tmp_path / "1.pt"
    path.write_bytes(_saved(TensorDataset(images, mags, z)))
    # The original's bytes per sample (20,524 = 20,480 + 40 + 4) plus torch.save's container overhead.
    assert path.stat().st_size >= 6 * 20_524
    part = read_partition(str(path))
    assert np.array_equal(part.images, images.numpy())
    assert part.magnitudes.dtype == np.float32
    assert np.array_equal(part.magnitudes, mags.numpy().astype(np.float32))
    assert np.array_equal(part.redshift, z.numpy())
    assert np.array_equal(part.object_id, np.arange(6))


def test_write_legacy_pt_is_the_original_layout(random_partition):
    part = random_partition(3, seed=5)
    with torch.serialization.safe_globals([TensorDataset]):
        ds = torch.load(io.BytesIO(write_legacy_pt(part)), weights_only=True)
    assert [t.dtype for t in ds.tensors] == [torch.float32, torch.float64, torch.float32]
    assert [tuple(t.shape) for t in ds.tensors] == [(3, 5, 32, 32), (3, 5), (3,)]
    back = read_legacy_pt(write_legacy_pt(part))
    assert np.array_equal(back.images, part.images) and np.array_equal(back.magnitudes, part.magnitudes)


class _SystemCall:
    def __init__(self, marker: str) -> None:
        self.marker = marker

    def __reduce__(self):
        return (os.system, (f"touch {self.marker}",))


class _EvalCall:
    def __init__(self, marker: str) -> None:
        self.marker = marker

    def __reduce__(self):
        import builtins
        return (builtins.eval, (f"open({self.marker!r}, 'w').close()",))


@pytest.mark.parametrize("payload,refused", [(_SystemCall, "system"), (_EvalCall, "builtins.eval")])
def test_malicious_pickle_is_refused_without_running(tmp_path, payload, refused):
    marker = tmp_path / "pwned"
    data = _saved(payload(str(marker)))
    assert b"touch" in data or b"open(" in data  # the payload really is in the file
    bad = tmp_path / "7.pt"
    bad.write_bytes(data)
    with pytest.raises(UnsafePickleError, match=rf"7\.pt: refused to unpickle.*{refused}"):
        read_partition(str(bad))
    assert not marker.exists()


def test_payload_nested_inside_a_tensordataset_is_refused(tmp_path):
    marker = tmp_path / "pwned"
    ds = TensorDataset(torch.zeros(1, 5, 32, 32), torch.zeros(1, 5, dtype=torch.float64), torch.zeros(1))
    ds.extra = _SystemCall(str(marker))
    with pytest.raises(UnsafePickleError, match="system"):
        read_legacy_pt(_saved(ds), "nested.pt")
    assert not marker.exists()


def test_legacy_bad_inputs():
    with pytest.raises(DataError, match=r"d\.pt: holds a dict, expected a TensorDataset"):
        read_legacy_pt(_saved({"images": torch.zeros(1, 5, 32, 32)}), "d.pt")
    good = _saved(TensorDataset(torch.zeros(2, 5, 32, 32), torch.zeros(2, 5, dtype=torch.float64), torch.zeros(2)))
    with pytest.raises(DataError, match=r"t\.pt: truncated or corrupt"):
        read_legacy_pt(good[: len(good) // 2], "t.pt")
    ints = _saved(TensorDataset(torch.zeros(2, 5, 32, 32, dtype=torch.int32), torch.zeros(2, 5), torch.zeros(2)))
    with pytest.raises(DataError, match=r"i\.pt: 'images' has dtype torch\.int32"):
        read_legacy_pt(ints, "i.pt")
    four_bands = _saved(TensorDataset(torch.zeros(2, 4, 32, 32), torch.zeros(2, 5), torch.zeros(2)))
    with pytest.raises(DataError, match=r"b\.pt: 'images' has shape \(2, 4, 32, 32\)"):
        read_legacy_pt(four_bands, "b.pt")
    nan = torch.zeros(2, 5, 32, 32)
    nan[1, 0, 0, 0] = float("inf")
    with pytest.raises(DataError, match=r"n\.pt: 1 row\(s\) have NaN or inf"):
        read_legacy_pt(_saved(TensorDataset(nan, torch.zeros(2, 5), torch.zeros(2))), "n.pt")
