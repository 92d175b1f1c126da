"""The shared fixtures themselves: the S3 server speaks real S3 and the tiny dataset is valid."""

from __future__ import annotations

import os

import numpy as np

from cosmicai import storage
from cosmicai.data.formats import decode_partition, read_manifest


def test_s3_server_boto3_and_s3fs_roundtrip(s3_server, s3_url):
    assert os.environ["CAI_S3_ENDPOINT"] == s3_server.endpoint
    url = storage.join(s3_url, "a/b/obj.bin")
    storage.write_bytes(url, b"0123456789")
    got = s3_server.client().get_object(Bucket=s3_server.bucket, Key=url.split("/", 3)[3], Range="bytes=2-5")
    assert got["Body"].read() == b"2345"
    assert storage.list_files(s3_url, recursive=True) == [url]
    assert storage.read_bytes(url) == b"0123456789"


def test_s3_server_restart_keeps_data(s3_server, s3_url):
    url = storage.join(s3_url, "kept.bin")
    storage.write_bytes(url, b"kept")
    port = s3_server.port
    s3_server.stop()
    s3_server.start()
    assert s3_server.port == port
    assert storage.read_bytes(url) == b"kept"


def test_tiny_dataset_is_valid(tiny_dataset):
    manifest = read_manifest(tiny_dataset)
    assert manifest is not None and manifest.total_rows == 48 and len(manifest.partitions) == 4
    ids = []
    for entry in manifest.partitions:
        part = decode_partition(storage.read_bytes(storage.join(tiny_dataset, entry.name)), entry.name)
        assert len(part) == entry.rows == 12 and part.redshift is not None
        ids.append(part.object_id)
    assert np.array_equal(np.concatenate(ids), np.arange(48))
