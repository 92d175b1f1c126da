"""10,000 one-row partitions without a manifest: every one is listed (in natural numeric order), planned, run
and summarized, and every object_id comes out exactly once.

Inference cost is taken out with the plug-in model ``faultproxy:instant_model``: AstroMAE (``astromae-random``)
costs tens of milliseconds per one-row partition on these cores, i.e. minutes for 10,000 partitions
(``scripts/reliability_report.py --measure`` prints the figure). Four ranks each cover 2,500 partitions.
"""

from __future__ import annotations

import json
import os
from pathlib import Path

import numpy as np
import pyarrow.parquet as pq

from cosmicai.config import load_config
from cosmicai.data.formats import Partition, encode_partition
from cosmicai.data.partition import list_partitions
from cosmicai.runners.pipeline import run
from faultproxy import expected_z, ledger

N_PARTITIONS = 10_000
RANKS = 4


def write_one_row_partitions(folder: Path, n: int) -> np.ndarray:
    """``p1.safetensors`` ... ``p{n}.safetensors``, one row each, object_id = 1000 + i; returns the magnitudes.

    One partition is encoded; the others are copies with their magnitudes and object_id bytes replaced at the
    offsets its safetensors header gives (10,000 encodes would dominate the test's time).
    """
    folder.mkdir(parents=True)
    rng = np.random.default_rng(11)
    image = rng.random((1, 5, 32, 32), dtype=np.float32)
    mags = rng.uniform(15, 24, (n, 5)).astype(np.float32)
    template = encode_partition(Partition(image, mags[:1], np.array([1000], np.int64), np.array([0.1], np.float32)))
    hlen = int.from_bytes(template[:8], "little")
    offsets = {k: v["data_offsets"] for k, v in json.loads(template[8:8 + hlen]).items() if k != "__metadata__"}
    (m0, m1), (o0, o1) = [(8 + hlen + a, 8 + hlen + b) for a, b in (offsets["magnitudes"], offsets["object_id"])]
    blob = bytearray(template)
    for i in range(n):
        blob[m0:m1] = mags[i].tobytes()
        blob[o0:o1] = np.int64(1000 + i).tobytes()
        with open(folder / f"p{i + 1}.safetensors", "wb") as fh:
            fh.write(blob)
    return mags


def test_ten_thousand_partitions_listed_planned_and_summarized(tmp_path):
    data = tmp_path / "many"
    mags = write_one_row_partitions(data, N_PARTITIONS)

    refs = list_partitions(str(data))
    assert [r.name for r in refs] == [f"p{i}.safetensors" for i in range(1, N_PARTITIONS + 1)]

    result = tmp_path / "res"
    config = load_config({"data": str(data), "result": str(result), "model": "faultproxy:instant_model",
                          "world_size": RANKS, "workers": 1, "threads": 1, "batch_size": 64})[0]
    summary = run(config, progress=False)

    plan = json.loads((result / "plan.json").read_text())
    assert len(plan["partitions"]) == N_PARTITIONS
    assert [len(plan["tasks"][str(r)]) for r in range(RANKS)] == [N_PARTITIONS // RANKS] * RANKS
    comp = summary["completeness"]
    assert comp["complete"] and comp["partitions_planned"] == comp["partitions_done"] == N_PARTITIONS
    assert comp["rows_in"] == comp["rows_out"] == N_PARTITIONS and comp["ranks_done"] == RANKS

    table = pq.read_table(result / "predictions.parquet")
    ids = table.column("object_id").to_numpy()
    np.testing.assert_array_equal(ids, 1000 + np.arange(N_PARTITIONS))        # plan order, each id once
    assert table.column("partition").to_pylist()[9_999] == "p10000.safetensors"
    want = expected_z(np.broadcast_to(_first_image(data), (N_PARTITIONS, 5, 32, 32)), mags)
    np.testing.assert_allclose(table.column("z_pred").to_numpy(), want, rtol=1e-6)
    combined = json.loads((result / "combined_data.json").read_text())
    assert sum(len(r["partitions"]) for r in combined) == N_PARTITIONS
    assert len(os.listdir(result / "predictions")) == RANKS
    ledger("10,000 one-row partitions", faults=0, resumes=0, rows_in=N_PARTITIONS, rows_out=int(table.num_rows),
           partitions_listed=len(refs))


def _first_image(data: Path) -> np.ndarray:
    from cosmicai.data.partition import read_partition

    return read_partition(str(data / "p1.safetensors")).images
