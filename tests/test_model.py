"""AstroMAE architecture, the registry's Predictor, modes and input checks."""

from __future__ import annotations

import json
import os
import sys
import types

import numpy as np
import pytest
import torch

from cosmicai.errors import ModelError
from cosmicai.models.astromae.network import AstroMAE, build_astromae, count_params, flops_per_image
from cosmicai.models.astromae import demo_weights_path
from cosmicai.models.registry import load_model
from cosmicai.models.weights_io import InputNorm
from cosmicai.models.astromae.weights_torch import save_weights

torch.set_num_threads(1)


@pytest.fixture(scope="module")
def random_predictor():
    return load_model("astromae-random", threads=1)


def _inputs(n=8, seed=0):
    rng = np.random.default_rng(seed)
    return rng.normal(0, 0.5, (n, 5, 32, 32)).astype(np.float32), rng.normal(18, 1, (n, 5)).astype(np.float32)


def test_size_and_cost_match_the_published_model():
    model = build_astromae()
    assert abs(count_params(model) - 15.80e6) / 15.80e6 < 1e-3
    # FlopCounterMode counts 2 FLOPs per multiply-add; the published 0.219 GFLOP uses that convention
    assert round(flops_per_image(model) / 1e9, 3) == 0.219
    names = set(model.state_dict())
    for key in ("patch_embed.proj.weight", "cls_token", "pos_embed", "blocks.11.attn.qkv.bias",
                "blocks.0.mlp.fc2.weight", "fc_norm.weight", "head.weight", "fusion.2.weight"):
        assert key in names
    assert model.fusion[0].in_features == 1096 + 1096 + 1024


def test_output_shape_and_exact_mode_matches_straightforward_module(random_predictor):
    images, mags = _inputs(9)
    out = random_predictor.predict(images, mags, batch_size=4)  # several batches, a ragged last one
    assert out.shape == (9,) and out.dtype == np.float32
    with torch.no_grad():  # the straightforward module: no BN folding, explicit softmax attention
        want = random_predictor.module(torch.from_numpy(images), torch.from_numpy(mags)).numpy()
    np.testing.assert_allclose(out, want, rtol=0, atol=1e-6)
    assert random_predictor.n_params == count_params(AstroMAE())
    assert (random_predictor.name, random_predictor.device, random_predictor.mode) == ("astromae-random", "cpu",
                                                                                       "exact")


def test_nonfinite_rows_are_flagged_not_predicted(random_predictor):
    images, mags = _inputs(6)
    images.flags.writeable = False  # e.g. a memory-mapped partition: must work without copying it in place
    clean = random_predictor.predict(images, mags)
    images = images.copy()
    images[1, 2, 3, 4] = np.nan
    mags[4, 0] = np.inf
    out = random_predictor.predict(images, mags, batch_size=2)
    assert random_predictor.last_flagged.tolist() == [1, 4]
    assert np.isnan(out[[1, 4]]).all()
    np.testing.assert_allclose(out[[0, 2, 3, 5]], clean[[0, 2, 3, 5]], rtol=0, atol=1e-6)
    random_predictor.predict(*_inputs(2))
    assert random_predictor.last_flagged.size == 0


@pytest.mark.parametrize("shape,mshape,match", [
    ((4, 4, 32, 32), (4, 5), "4 bands"),
    ((4, 5, 28, 28), (4, 5), "28x28 pixels"),
    ((4, 5, 32), (4, 5), r"expected \[N, 5, 32, 32\]"),
    ((4, 5, 32, 32), (4, 3), r"'magnitudes' has shape \(4, 3\), expected \[4, 5\]"),
    ((4, 5, 32, 32), (3, 5), r"'magnitudes' has shape \(3, 5\)"),
])
def test_bad_inputs_are_named(random_predictor, shape, mshape, match):
    with pytest.raises(ModelError, match=match):
        random_predictor.predict(np.zeros(shape, np.float32), np.zeros(mshape, np.float32))


def test_bad_model_options():
    with pytest.raises(ModelError, match="device 'cuda:3' is not available"):
        load_model("astromae-random", device="cuda:3")
    with pytest.raises(ModelError, match="device 'tpu' is not"):
        load_model("astromae-random", device="tpu")
    with pytest.raises(ModelError, match="mode 'fastest' is not known"):
        load_model("astromae-random", mode="fastest")
    with pytest.raises(ModelError, match="model 'nope' is not known"):
        load_model("nope")
    with pytest.raises(ModelError, match="needs weights="):
        load_model("astromae")
    with pytest.raises(ModelError, match="cannot read weights '/nonexistent/w.safetensors'"):
        load_model("astromae", weights="/nonexistent/w.safetensors")


def test_plugin_model_by_import_path(tmp_path):
    mod = types.ModuleType("cai_test_plugin")

    class Mean:
        n_params = 0

        def predict(self, images, magnitudes, batch_size=512):
            return magnitudes.mean(axis=1) / 100

    mod.factory = lambda **kw: Mean()
    sys.modules["cai_test_plugin"] = mod
    pred = load_model("cai_test_plugin:factory")
    images, mags = _inputs(3)
    np.testing.assert_allclose(pred.predict(images, mags), mags.mean(1) / 100, rtol=1e-6)
    with pytest.raises(ModelError, match="has no callable 'missing'"):
        load_model("cai_test_plugin:missing")


def test_input_normalisation_lives_in_the_weights(tmp_path):
    net = build_astromae(seed=2)
    norm = InputNorm(image_offset=[0.1] * 5, image_scale=[0.5] * 5, image_asinh=True, mag_offset=[18.0] * 5,
                     mag_scale=[2.0] * 5, z_offset=0.12, z_scale=0.05)
    path = tmp_path / "w.safetensors"
    path.write_bytes(save_weights(net.state_dict(), norm))
    images, mags = _inputs(4)
    got = load_model("astromae", weights=str(path), threads=1).predict(images, mags)
    with torch.no_grad():
        raw = net(torch.asinh((torch.from_numpy(images) - 0.1) / 0.5), (torch.from_numpy(mags) - 18.0) / 2.0)
    np.testing.assert_allclose(got, raw.numpy() * 0.05 + 0.12, rtol=0, atol=1e-6)


@pytest.mark.skipif(not os.path.exists(demo_weights_path()), reason="demo weights not trained yet")
@pytest.mark.parametrize("engine", ["onnxruntime", "torch"])
def test_demo_weights_fast_mode_and_accuracy(engine):
    from cosmicai.data.synth import synthesize
    from cosmicai.training import scores

    with open(os.path.splitext(demo_weights_path())[0] + ".json") as f:
        card = json.load(f)
    assert os.path.getsize(demo_weights_path()) <= 35e6
    assert card["holdout_scores"]["R2"] >= 0.9 and card["holdout_scores"]["precision"] <= 0.03
    part = synthesize(200, seed=0, workers=1, first_id=20_000_000)  # unseen galaxies
    exact = load_model("astromae-demo", threads=1, engine=engine)
    fast = load_model("astromae-demo", mode="fast", threads=2, engine=engine)
    assert exact.engine == fast.engine == engine
    ze = exact.predict(part.images, part.magnitudes)
    zf = fast.predict(part.images, part.magnitudes)
    with torch.no_grad():
        plain = exact.module(torch.from_numpy(part.images), torch.from_numpy(part.magnitudes)).numpy()
    np.testing.assert_allclose(ze, plain, rtol=0, atol=1e-6)
    assert np.abs(zf - ze).max() <= 2e-3
    se, sf = scores(ze, part.redshift), scores(zf, part.redshift)
    assert se["R2"] > 0.8  # a trained model, not noise
    for key in ("MAE", "precision"):
        assert abs(sf[key] - se[key]) <= 0.02 * se[key]
    assert abs(sf["bias"] - se["bias"]) <= 0.02 * max(abs(se["bias"]), se["precision"])
