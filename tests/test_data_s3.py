"""Datasets on a real S3 server (rclone serve s3 on 127.0.0.1) through s3fs: >1,000 partitions, split, verify."""

from __future__ import annotations

from concurrent.futures import ThreadPoolExecutor

import numpy as np
import pytest

from cosmicai import storage
from cosmicai.cli import main
from cosmicai.data.formats import encode_partition, read_manifest
from cosmicai.data.partition import list_partitions, read_partition
from cosmicai.data.split import split

N_PARTS = 1005  # more than one ListObjectsV2 page (1,000 keys)

pytestmark = pytest.mark.s3


@pytest.fixture(scope="module")
def many_partitions(s3_server, random_partition_module):
    """1,005 one-row native partitions 1.safetensors ... 1005.safetensors, no manifest, uploaded in parallel."""
    base = s3_server.url("many-partitions")
    template = random_partition_module(1, seed=0)

    def upload(i: int) -> None:
        template_i = type(template)(template.images + i, template.magnitudes, np.array([i], np.int64),
                                    template.redshift)
        storage.write_bytes(storage.join(base, f"{i}.safetensors"), encode_partition(template_i))

    with ThreadPoolExecutor(16) as pool:
        list(pool.map(upload, range(1, N_PARTS + 1)))
    return base


@pytest.fixture(scope="module")
def random_partition_module():
    from conftest import make_random_partition
    return make_random_partition


def test_more_than_1000_partitions_listed_and_read(many_partitions, s3_server):
    keys = s3_server.client().list_objects_v2(Bucket=s3_server.bucket, Prefix="many-partitions/")
    assert keys["KeyCount"] == 1000 and keys["IsTruncated"]  # the server really pages at 1,000
    refs = list_partitions(many_partitions)
    assert len(refs) == N_PARTS
    assert [r.name for r in refs[:3]] + [refs[-1].name] == ["1.safetensors", "2.safetensors", "3.safetensors",
                                                            "1005.safetensors"]
    assert all(r.url.startswith("s3://") and r.rows is None and r.bytes > 20_000 for r in refs)
    sample = refs[::50] + refs[-1:]  # every partition is read by the split test below
    with ThreadPoolExecutor(8) as pool:
        ids = list(pool.map(lambda r: int(read_partition(r.url).object_id[0]), sample))
    assert ids == [int(r.name.split(".")[0]) for r in sample]


def test_split_s3_to_s3_then_verify(many_partitions, s3_url, capsys):
    report = split(many_partitions, s3_url, partition_size=400 * 20_508)  # reads all 1,005 through s3fs
    manifest = read_manifest(s3_url)
    assert [p.rows for p in manifest.partitions] == [400, 400, 205]
    assert report.manifest.total_rows == N_PARTS
    refs = list_partitions(s3_url)
    assert [r.sha256 for r in refs] == [p.sha256 for p in manifest.partitions]
    last = read_partition(refs[-1].url)
    assert np.array_equal(last.object_id, np.arange(801, N_PARTS + 1))
    assert np.array_equal(last.images[:, 0, 0, 0] - last.images[0, 0, 0, 0], np.arange(205, dtype=np.float32))
    assert main(["data", "verify", s3_url, "--quiet"]) == 0
    assert "ok: 3 partition(s), 1,005 rows" in capsys.readouterr().out
