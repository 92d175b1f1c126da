"""A run says which weights it used and what they were trained on, and marks predictions outside the redshift
range of their training labels (counted per rank and in the summary, kept in the metrics)."""

from __future__ import annotations

import hashlib
import json
import os
import shutil

import numpy as np
import pyarrow.parquet as pq
import pytest

from cosmicai.config import load_config
from cosmicai.data.formats import Manifest, PartitionEntry, encode_partition, sha256_hex, write_manifest
from cosmicai.errors import ModelError
from cosmicai.models.astromae import demo_weights_path
from cosmicai.models.registry import load_model, parse_training_range, weights_card
from cosmicai.pipeline.report import format_report
from cosmicai.runners.pipeline import run

DEMO_CARD = os.path.splitext(demo_weights_path())[0] + ".json"


def _card(url: str, name: str = "astromae") -> dict:
    data = open(url, "rb").read()
    return weights_card(name, url, data, hashlib.sha256(data).hexdigest())


def test_demo_card_states_synthetic_training_and_its_label_range():
    card = json.load(open(DEMO_CARD))
    assert card["sha256"] == hashlib.sha256(open(demo_weights_path(), "rb").read()).hexdigest()
    pred = load_model("astromae-demo", threads=1)
    assert pred.training_range == (0.0106, 0.3987)
    assert pred.card["file"] == "astromae-demo.safetensors" and pred.card["sha256"] == card["sha256"]
    assert pred.card["origin"] == "the demo weights shipped with cosmicai"
    assert "synthetic galaxies" in pred.card["caveat"] and "not meant for real SDSS images" in pred.card["caveat"]
    assert pred.card["training_range"] == {"z_min": 0.0106, "z_max": 0.3987}
    # the range holds the labels of the synthetic training set: the generator's support is [0.01, 0.40]
    from cosmicai.data.synth import Z_MAX, Z_MIN

    assert Z_MIN <= pred.training_range[0] < pred.training_range[1] <= Z_MAX
    random = load_model("astromae-random", threads=1)
    assert random.training_range is None and random.card["file"] == "built-in"
    assert "meaningless" in random.card["caveat"]


def test_card_comes_from_the_weights_not_from_the_model_name(tmp_path):
    # the same bytes under another name: the sidecar card names their sha256, so it still applies
    copy = tmp_path / "mine.safetensors"
    shutil.copy(demo_weights_path(), copy)
    assert _card(str(copy))["origin"] == f"weights from {copy}"
    assert _card(str(copy))["caveat"] is None  # no card beside it: only the file's own metadata speaks
    assert _card(str(copy))["trained_on"] == "synthetic galaxies (cosmicai.data.synth)"
    assert _card(str(copy))["training_range"] is None
    card = json.load(open(DEMO_CARD))
    (tmp_path / "mine.json").write_text(json.dumps(card))
    assert _card(str(copy))["training_range"] == {"z_min": 0.0106, "z_max": 0.3987}
    assert "not meant for real SDSS images" in _card(str(copy))["caveat"]
    # a card for other bytes (a stale one beside retrained weights) is ignored
    (tmp_path / "mine.json").write_text(json.dumps({**card, "sha256": "0" * 64}))
    assert _card(str(copy))["caveat"] is None and _card(str(copy))["training_range"] is None


def test_imported_weights_name_the_authors_checkpoint(authors_weights):
    card = _card(str(authors_weights))
    assert card["origin"] == "imported from the authors' checkpoint whole_cpu.pt"
    assert card["training_range"] is None and card["file"] == "astromae.safetensors"


@pytest.mark.parametrize("value", [[0.4, 0.1], {"z_min": 0.1}, "0.1-0.4", [0.0, float("inf")]])
def test_a_bad_training_range_is_refused(value):
    with pytest.raises(ModelError, match=r"^w\.safetensors: training_range .* (is not|must be)"):
        parse_training_range(value, "w.safetensors")


def _dataset(root, galaxies, noise):
    """One partition: synthetic galaxies (inside the demo's range) then noise stamps (predicted far outside)."""
    from cosmicai.data.formats import Partition
    from cosmicai.data.synth import synthesize

    part = synthesize(galaxies, seed=0, workers=1, first_id=0)
    rng = np.random.default_rng(3)
    images = np.concatenate([part.images, rng.normal(0, 3, (noise, 5, 32, 32)).astype(np.float32)])
    mags = np.concatenate([part.magnitudes, rng.uniform(14, 18, (noise, 5)).astype(np.float32)])
    z = np.concatenate([part.redshift, np.full(noise, 0.1, np.float32)])
    data = encode_partition(Partition(images, mags, np.arange(len(z), dtype=np.int64), z))
    root.mkdir()
    (root / "part-000001.safetensors").write_bytes(data)
    write_manifest(str(root), Manifest([PartitionEntry("part-000001.safetensors", len(z), len(data),
                                                       sha256_hex(data), 0)]))
    return str(root)


def test_predictions_outside_the_training_range_are_marked_counted_and_scored(tmp_path):
    data = _dataset(tmp_path / "data", galaxies=8, noise=8)
    result = str(tmp_path / "res")
    config = load_config({"data": data, "result": result, "model": "astromae-demo", "workers": 1, "threads": 1,
                          "batch_size": 16})[0]
    summary = run(config, progress=False)
    table = pq.read_table(os.path.join(result, "predictions.parquet"))
    zp = table.column("z_pred").to_numpy()
    outside = table.column("outside_training_range").to_numpy(zero_copy_only=False)
    np.testing.assert_array_equal(outside, (zp < 0.0106) | (zp > 0.3987))
    n_out = int(outside.sum())
    assert 0 < n_out < 16 and not outside[:8].any()  # the galaxies are inside, noise is predicted outside
    assert not any(table.column("flag").to_pylist())  # the inputs are in range: nothing untrusted about them
    rank = json.load(open(os.path.join(result, "ranks", "0.json")))
    assert rank["outside_training_range"] == {"rows": n_out, "by_partition": {"part-000001.safetensors": n_out},
                                              "range": [0.0106, 0.3987]}
    stored = json.load(open(os.path.join(result, "summary.json")))
    out = stored["outside_training_range"]
    assert out["rows"] == n_out and out["known"] and out["range"] == [0.0106, 0.3987]
    assert out["partitions"] == ["part-000001.safetensors"]
    assert summary["metrics"]["n"] == 16 and summary["metrics"]["n_excluded"] == 0  # rows in == rows scored
    w = stored["weights"]
    assert w["model"] == "astromae-demo" and w["file"] == "astromae-demo.safetensors"
    assert w["sha256"] == json.load(open(DEMO_CARD))["sha256"]
    report = format_report(summary)
    assert f"  weights: astromae-demo (astromae-demo.safetensors, sha256 {w['sha256'][:12]}): the demo weights " \
           "shipped with cosmicai" in report
    assert "  NOTE: trained on synthetic galaxies for demos and tests; not meant for real SDSS images" in report
    assert f"  outside the training range z 0.0106..0.3987: {n_out} row(s) (column outside_training_range; scored " \
           "like the rest), in 1 partition(s): part-000001.safetensors" in report


def test_weights_without_a_range_mark_nothing_and_say_unknown(tiny_dataset, tmp_path):
    result = str(tmp_path / "res")
    config = load_config({"data": tiny_dataset, "result": result, "model": "astromae-random", "workers": 1,
                          "threads": 1, "batch_size": 16, "file_limit": 1})[0]
    summary = run(config, progress=False)
    assert summary["outside_training_range"] == {"rows": 0, "n_partitions": 0, "partitions": [], "by_partition": {},
                                                 "range": None, "known": False}
    report = format_report(summary)
    assert "  weights: astromae-random (built-in): seeded random initialisation" in report
    assert "  training range of these weights: unknown (no prediction is marked outside it)" in report
    table = pq.read_table(os.path.join(result, "predictions.parquet"))
    assert not any(table.column("outside_training_range").to_pylist())
