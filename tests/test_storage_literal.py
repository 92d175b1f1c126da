"""Names are literal in cosmicai.storage: ``[ ] * ? { }`` and spaces never act as patterns.

Each test lays out sibling folders that a pattern would match (``run1``, ``runa``, ``run*``, ``run[1]x`` ...) on
a real S3 server (rclone's and moto's, both on 127.0.0.1) and on local disk, runs one storage operation on a
name holding pattern characters, and checks that every sibling file is still there byte for byte and that the
operation did what it should to its own files.
"""

from __future__ import annotations

import uuid

import pytest

from cosmicai import storage
from cosmicai.errors import StorageError

#: Folder names: each would match others as a glob (run[1] -> run1, run? -> run1/runa/run2, run* -> all).
NAMES = ["run[1]", "run1", "runa", "run*", "run?", "run{1,2}", "run 1", "run[1]x", "run2", "run[!1]"]
#: Files inside each folder (a space in a name too).
INSIDE = ["a.bin", "sub/b c.bin"]
#: Removed in this order, the broadest patterns first while every sibling exists; the last two match nothing
#: literally, but run2 / run1 as patterns.
TARGETS = ["run*", "run?", "run[1]", "run{1,2}", "run 1", "run[!1]", "run[2]", "run[12]"]

BACKENDS = ["local", pytest.param("rclone", marks=pytest.mark.s3), pytest.param("moto", marks=pytest.mark.s3)]


@pytest.fixture(params=BACKENDS)
def base(request, tmp_path) -> str:
    """A fresh empty folder URL: a local folder, or a prefix on rclone's or moto's S3 server."""
    if request.param == "local":
        return str(tmp_path / "exp")
    if request.param == "rclone":
        return storage.join(request.getfixturevalue("s3_url"), "exp")
    return request.getfixturevalue("moto_s3").url(f"t-{uuid.uuid4().hex[:10]}/exp")


def _content(rel: str) -> bytes:
    return f"<{rel}>".encode() * 3


def _populate(base: str) -> dict[str, bytes]:
    """Every sibling folder with its files, plus a top-level ``<name>.json`` per name; returns {rel: bytes}."""
    files = {f"{name}/{inner}": b"" for name in NAMES for inner in INSIDE}
    files.update({f"{name}.json": b"" for name in NAMES})
    for rel in files:
        files[rel] = _content(rel)
    storage.map_urls(lambda rel: storage.write_bytes(storage.join(base, rel), files[rel]), list(files))
    return files


def _snapshot(base: str) -> dict[str, bytes]:
    """{relative name: bytes} of every file under ``base``, read back through storage."""
    urls = storage.list_files(base, recursive=True)
    data = storage.map_urls(storage.read_bytes, urls)
    return {u[len(base) + 1:]: d for u, d in zip(urls, data)}


def test_recursive_remove_touches_only_its_own_folder(base):
    expected = _populate(base)
    assert _snapshot(base) == expected
    for target in TARGETS:
        storage.remove(storage.join(base, target), recursive=True)
        own = {rel for rel in expected if rel.startswith(target + "/")}
        expected = {rel: data for rel, data in expected.items() if rel not in own}
        assert _snapshot(base) == expected, f"removing {target!r}"
        assert storage.list_files(storage.join(base, target), recursive=True) == []
    # what is left: the folders no target named, and every top-level file (run[1].json shares run[1]'s prefix)
    assert sorted({rel.split("/")[0] for rel in expected if "/" in rel}) == ["run1", "run2", "run[1]x", "runa"]
    assert sum(1 for rel in expected if "/" not in rel) == len(NAMES)


def test_remove_of_a_file_removes_that_file_only(base):
    expected = _populate(base)
    for name in ("run[1].json", "run?.json", "run*.json", "run{1,2}.json", "run 1.json", "run[12].json"):
        storage.remove(storage.join(base, name))
        expected.pop(name, None)
        assert _snapshot(base) == expected, f"removing {name!r}"


def test_remove_of_a_folder_without_recursive_keeps_it(base, request):
    """A folder is never removed without recursive=True. Locally (and on rclone, which refuses to delete a
    "folder" key) that is a StorageError naming it; on S3 proper (moto) there is no object by that name, so
    deleting it is the no-op it is for any missing object."""
    expected = _populate(base)
    url = storage.join(base, "run[1]")
    if request.node.callspec.params["base"] == "moto":
        storage.remove(url)
    else:
        with pytest.raises(StorageError, match=r"run\[1\]: is a folder, not removed"):
            storage.remove(url)
    assert _snapshot(base) == expected


def test_listing_stat_exists_and_read_are_literal(base):
    files = _populate(base)
    for name in NAMES:
        folder = storage.join(base, name)
        assert storage.list_files(folder) == [storage.join(folder, "a.bin")]
        assert storage.list_files(folder, recursive=True) == [storage.join(folder, "a.bin"),
                                                               storage.join(folder, "sub", "b c.bin")]
        sizes = storage.list_files_with_sizes(folder, recursive=True)
        assert [n for _, n in sizes] == [len(files[f"{name}/a.bin"]), len(files[f"{name}/sub/b c.bin"])]
        info = storage.list_files_with_info(folder, ".bin")
        assert [(u, n) for u, n, _ in info] == [(storage.join(folder, "a.bin"), len(files[f"{name}/a.bin"]))]
        assert info[0][2] is not None
        top = storage.join(base, f"{name}.json")
        assert storage.exists(top) and storage.exists(folder)
        assert storage.size(top) == len(files[f"{name}.json"])
        assert storage.file_info(top)[0] == len(files[f"{name}.json"])
        assert storage.read_bytes(storage.join(folder, "sub", "b c.bin")) == files[f"{name}/sub/b c.bin"]
    # patterns that match siblings but name nothing that exists
    for ghost in ("run[12]", "run[a]", "ru?1", "run[!x]", "r*", "run{a,b}"):
        url = storage.join(base, ghost)
        assert not storage.exists(url) and not storage.exists(storage.join(url, "a.bin")), ghost
        assert storage.list_files(url, recursive=True) == [], ghost
        assert storage.size(url + ".json") is None and storage.file_info(url + ".json") is None, ghost
        with pytest.raises(StorageError, match="no such file"):
            storage.read_bytes(storage.join(url, "a.bin"))
    assert _snapshot(base) == files


def test_writes_to_a_pattern_name_add_only_that_file(base):
    files = _populate(base)
    target = storage.join(base, "run[1]", "new.bin")
    storage.write_bytes(target, b"new")
    with storage.AtomicWriter(storage.join(base, "run?", "big.bin")) as out:
        out.write(b"x" * 1000)
        out.write(b"y" * 1000)
    aborted = storage.AtomicWriter(storage.join(base, "run*", "never.bin"))
    aborted.write(b"z")
    aborted.abort()
    files.update({"run[1]/new.bin": b"new", "run?/big.bin": b"x" * 1000 + b"y" * 1000})
    assert _snapshot(base) == files


@pytest.mark.s3
def test_s3_recursive_remove_of_an_object_that_is_also_a_prefix(moto_s3):
    """On S3 ``run[1]`` can be both an object and a prefix: both go, ``run[1]x`` and ``run1`` stay."""
    base = moto_s3.url(f"t-{uuid.uuid4().hex[:10]}")
    keep = {"run1/a": b"1", "run[1]x/a": b"2", "run[1]x": b"3", "run1": b"4"}
    for rel, data in {**keep, "run[1]": b"5", "run[1]/a": b"6", "run[1]/deep/b": b"7"}.items():
        storage.write_bytes(storage.join(base, rel), data)
    storage.remove(storage.join(base, "run[1]"), recursive=True)
    assert _snapshot(base) == keep


@pytest.mark.s3
def test_s3_recursive_remove_pages_past_1000_keys(s3_url):
    """More than one ListObjectsV2 page and one DeleteObjects batch of its own keys; the sibling is kept."""
    folder = storage.join(s3_url, "run[1]")
    names = [f"k{i:04d}" for i in range(1100)]
    storage.map_urls(lambda n: storage.write_bytes(storage.join(folder, n), b"."), names, threads=32)
    storage.write_bytes(storage.join(s3_url, "run1", "keep"), b"keep")
    assert len(storage.list_files(folder)) == 1100
    storage.remove(folder, recursive=True)
    assert _snapshot(s3_url) == {"run1/keep": b"keep"}
