"""The demo-weight trainer end to end at toy size: data cache, resume, fp16 weights, card, held-out scoring."""

from __future__ import annotations

import json

import numpy as np
import torch

from cosmicai.models.registry import load_model
from cosmicai.training import HOLDOUT_FIRST_ID, main, scores

torch.set_num_threads(1)


def test_train_demo_tiny_run_writes_loadable_weights_and_card(tmp_path):
    out = tmp_path / "demo.safetensors"
    argv = ["--n-train", "24", "--n-val", "4", "--chunk", "12", "--n-holdout", "8", "--steps", "2",
            "--round-steps", "1", "--batch", "4", "--threads", "1", "--workers", "1", "--cache", str(tmp_path / "data"),
            "--workdir", str(tmp_path / "work"), "--out", str(out), "--log-every", "1"]
    assert main(argv) == 0
    card = json.loads((tmp_path / "demo.json").read_text())
    assert card["data"]["holdout_ids"] == [HOLDOUT_FIRST_ID, HOLDOUT_FIRST_ID + 7]
    assert card["data"]["train_ids"] == [4, 23] and card["training"]["steps"] == 2
    assert card["holdout_scores"]["n"] == 8 and card["command"].startswith("python -m cosmicai.training")
    assert [h["train_rows"] for h in card["history"]] == [8, 20]  # round r uses chunks 0..r, monitor rows left out
    assert out.stat().st_size < 35e6
    # a rerun resumes from the finished checkpoint: no further steps, same weights
    from safetensors.torch import load_file

    before = load_file(out)
    assert main(argv) == 0
    after = load_file(out)
    assert before.keys() == after.keys() and all(torch.equal(before[k], after[k]) for k in before)
    # the weights load through the public registry with the normalisation inside
    holdout = np.load(tmp_path / "data" / "holdout-8-s0.npz")
    z = load_model("astromae", weights=str(out), threads=1).predict(holdout["images"], holdout["magnitudes"])
    assert z.shape == (8,) and np.isfinite(z).all()
    assert scores(z, holdout["redshift"])["MAE"] == card["holdout_scores"]["MAE"]


def test_scores_match_the_astromae_definitions():
    z = np.array([0.1, 0.2, 0.3, 0.4])
    zp = np.array([0.1, 0.25, 0.3, 0.9])
    s = scores(zp, z)
    dz = (zp - z) / (1 + z)
    assert s["MAE"] == np.mean(np.abs(zp - z))
    assert np.isclose(s["bias"], dz.mean())
    assert np.isclose(s["precision"], 1.48 * np.median(np.abs(dz - np.median(dz))))
    assert np.isclose(s["R2"], 1 - np.sum((zp - z) ** 2) / np.sum((z - z.mean()) ** 2))
    assert s["outlier_fraction"] == 0.25


def _sha(path) -> str:
    import hashlib

    return hashlib.sha256(open(path, "rb").read()).hexdigest()


def test_train_demo_writes_to_the_current_folder_by_default_never_into_the_package(tmp_path, monkeypatch):
    """``cai model train-demo`` without ``--out``: ./astromae-demo-trained.safetensors; the shipped weights stay.
    20 steps: the length whose 5% warm-up used to be zero steps long (ZeroDivisionError in the LR schedule)."""
    from cosmicai.cli import main as cai
    from cosmicai.models.astromae import demo_weights_path

    shipped = demo_weights_path()
    before = _sha(shipped)
    monkeypatch.chdir(tmp_path)
    argv = ["model", "train-demo", "--n-train", "16", "--n-val", "4", "--chunk", "16", "--n-holdout", "4",
            "--steps", "20", "--round-steps", "10", "--batch", "2", "--threads", "1", "--workers", "1",
            "--cache", "data", "--workdir", "work", "--log-every", "10"]
    assert cai(argv) == 0
    out = tmp_path / "astromae-demo-trained.safetensors"
    card = json.loads((tmp_path / "astromae-demo-trained.json").read_text())
    assert out.stat().st_size > 1e6 and card["training"]["steps"] == 20 and len(card["history"]) == 2
    assert np.isfinite(load_model("astromae", weights=str(out), threads=1).predict(
        np.ones((2, 5, 32, 32), np.float32), np.full((2, 5), 18.0, np.float32))).all()
    assert _sha(shipped) == before


def test_train_demo_rejects_steps_that_are_not_positive_whole_numbers():
    import subprocess
    import sys

    for bad in ("0", "-3", "1.5", "many"):
        proc = subprocess.run([sys.executable, "-m", "cosmicai.cli", "model", "train-demo", "--steps", bad],
                              capture_output=True, text=True, timeout=60)
        assert proc.returncode == 2, proc.stderr
        assert proc.stderr.strip().splitlines() == [
            f"cai: error: argument --steps: expected a whole number >= 1, got '{bad}' "
            "(see `cai model train-demo --help`)"]
