"""cosmicai.storage on the local filesystem: atomic writes keep the usual permissions, listings sort numerically."""

from __future__ import annotations

import os
import stat

import pytest

from cosmicai import storage
from cosmicai.errors import StorageError


def test_atomic_write_gives_umask_permissions_and_leaves_no_temporary(tmp_path):
    url = str(tmp_path / "sub" / "plan.json")
    storage.write_json(url, {"a": 1})
    mode = stat.S_IMODE(os.stat(url).st_mode)
    assert mode == 0o666 & ~storage._UMASK                    # not mkstemp's 0600: a group can read results
    assert storage.read_json(url) == {"a": 1}
    assert os.listdir(tmp_path / "sub") == ["plan.json"]      # the temporary name is gone


def test_listing_is_in_numeric_order_and_missing_folder_is_empty(tmp_path):
    for name in ("10.pt", "2.pt", "1.pt", "notes.txt"):
        (tmp_path / name).write_bytes(b"x")
    assert [storage.basename(u) for u in storage.list_files(str(tmp_path), ".pt")] == ["1.pt", "2.pt", "10.pt"]
    assert storage.list_files(str(tmp_path / "absent")) == []


def test_reading_a_folder_or_missing_file_names_it(tmp_path):
    with pytest.raises(StorageError, match=r"nope\.bin: no such file"):
        storage.read_bytes(str(tmp_path / "nope.bin"))
    with pytest.raises(StorageError, match="is a directory"):
        storage.read_bytes(str(tmp_path))
