"""The whole pipeline against a real S3 server on 127.0.0.1: data and results on s3://."""

from __future__ import annotations

import io
import os

import pyarrow.parquet as pq
import pytest

from cosmicai import storage
from cosmicai.config import load_config
from cosmicai.runners.pipeline import run
from cosmicai.pipeline.summarize import summarize

pytestmark = pytest.mark.s3


def test_pipeline_on_s3(tiny_dataset, s3_url):
    data, result = storage.join(s3_url, "data"), storage.join(s3_url, "results", "run1")
    for name in sorted(os.listdir(tiny_dataset)):
        storage.write_bytes(storage.join(data, name), open(os.path.join(tiny_dataset, name), "rb").read())
    config = load_config({"data": data, "result": result, "model": "astromae-random", "workers": 1, "threads": 1,
                          "world_size": 2, "batch_size": 16})[0]
    summary = run(config, progress=False)
    assert summary["completeness"]["complete"] and summary["completeness"]["rows_out"] == 48
    assert storage.list_files(storage.join(result, "ranks")) == [storage.join(result, "ranks", f"{r}.json")
                                                                  for r in (0, 1)]
    table = pq.read_table(io.BytesIO(storage.read_bytes(storage.join(result, "predictions.parquet"))))
    assert table.column("object_id").to_pylist() == list(range(48))
    tasks = storage.read_json(storage.join(result, "tasks.json"))
    assert [(t["result_url"], t["rank"], t["plan_hash"]) for t in tasks] == [(result, r, summary["plan_hash"])
                                                                              for r in (0, 1)]
    # A rerun resumes everything, and summarize reads the same outputs back.
    again = run(config, progress=False)
    assert again["ranks_run"] == 0 and again["ranks_resumed"] == 2
    assert summarize(result)["metrics"] == pytest.approx(summary["metrics"])
