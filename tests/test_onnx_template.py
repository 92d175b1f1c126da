"""The shipped weight-free ONNX template: current, weight-free, and bound to any weights it gives exactly what
a fresh torch export of those weights gives."""

from __future__ import annotations

import copy
import json
import os
from pathlib import Path

import numpy as np
import pytest

from cosmicai.errors import ModelError
from cosmicai.models.astromae import folding, onnx_export, ort_engine
from cosmicai.models.astromae.fast import fold_batchnorm, fold_linear_chains
from cosmicai.models.astromae import demo_weights_path
from cosmicai.models.astromae.load import read_weights_numpy
from cosmicai.models.registry import load_model
from cosmicai.models.weights_io import InputNorm

onnx = pytest.importorskip("onnx")


def _inputs(n: int, seed: int = 0):
    r = np.random.default_rng(seed)
    return (r.gamma(2.0, 0.05, (n, 5, 32, 32)).astype(np.float32),
            r.uniform(15, 23, (n, 5)).astype(np.float32))


def test_shipped_template_is_built_from_the_current_code():
    template = ort_engine.Template.load()
    assert template.manifest["code_digest"] == ort_engine.code_digest(), (
        "the network, its rewrites or the exporter changed since models/graphs/ was built: "
        "run `python scripts/build_onnx_template.py` and commit the result")
    assert set(template.manifest["graphs"]) == set(ort_engine.GRAPH_NAMES)
    assert template.n_params == 15_800_961 and template.num_heads == 3


def test_shipped_template_holds_no_weights():
    folder = ort_engine.template_dir()
    total = sum(os.path.getsize(os.path.join(folder, f)) for f in os.listdir(folder))
    assert total < 1_000_000  # the fp32 graphs with weights are 21.8 + 27.5 MB
    template = ort_engine.Template.load()
    for name in ort_engine.GRAPH_NAMES:
        blob, externals = template.graph(name)
        graph = onnx.load_from_string(blob).graph
        embedded = [i for i in graph.initializer if i.data_location != onnx.TensorProto.EXTERNAL]
        assert all(int(np.prod(i.dims)) <= 1 for i in embedded), [i.name for i in embedded]  # asinh's constant 1
        external = {i.name for i in graph.initializer if i.data_location == onnx.TensorProto.EXTERNAL}
        assert external == set(externals)
        assert {how for how, _ in externals.values()} <= {"w", "T", "q8T", "q8T.scale", "q8T.zero_point"}


@pytest.mark.parametrize("mode", ["exact", "fast"])
def test_demo_weights_bound_to_the_template_equal_their_torch_export(mode):
    """The issue's bar: exact within 1e-6 of the torch-exported graph (it is bit-identical, and so is fast)."""
    import onnxruntime as ort

    raw, norm = read_weights_numpy(Path(demo_weights_path()).read_bytes())
    images, mags = _inputs(48)
    bound = load_model("astromae-demo", mode=mode, threads=1)
    assert bound.engine == "onnxruntime"
    got = bound.predict(images, mags)
    module = onnx_export._prepared_module(load_model("astromae-demo", engine="torch", threads=1).module)
    features, regress = onnx_export.build_graphs(module, mode, num_heads=3)
    f = ort.InferenceSession(features, providers=["CPUExecutionProvider"])
    g = ort.InferenceSession(regress, providers=["CPUExecutionProvider"])
    feats = np.concatenate([f.run(None, {"images": images[s:s + 16]})[0] for s in range(0, 48, 16)])
    want = g.run(None, {"features": feats, "magnitudes": mags})[0]
    dz = np.abs(got - want) / (1 + want)
    assert dz.max() <= 1e-6, dz.max()
    np.testing.assert_array_equal(got, want)


def test_template_check_on_other_random_weights_both_modes_and_asinh():
    assert onnx_export.check_template(ort_engine.Template.load(), seed=7, rows=20) == 0.0


def test_numpy_folding_is_bit_identical_to_the_torch_modules():
    model = load_model("astromae-demo", engine="torch", threads=1).module
    folded = fold_linear_chains(fold_batchnorm(copy.deepcopy(model)))
    want = {k: v.numpy() for k, v in folded.state_dict().items() if not k.endswith("num_batches_tracked")}
    raw, _ = read_weights_numpy(Path(demo_weights_path()).read_bytes())
    got = folding.prepared_state(raw)
    assert set(got) == set(want)
    for key in want:
        np.testing.assert_array_equal(got[key], want[key], err_msg=key)


def test_int8_quantisation_is_onnxruntimes_bit_for_bit():
    from onnxruntime.quantization.quant_utils import QuantType, quantize_data

    raw, _ = read_weights_numpy(Path(demo_weights_path()).read_bytes())
    cases = [raw["blocks.0.attn.qkv.weight"].T, raw["blocks.11.mlp.fc2.weight"].T, np.zeros((4, 3), np.float32),
             np.full((2, 2), -3.5, np.float32), np.array([[1e-30, -2e-30]], np.float32)]
    for w in cases:
        w = np.ascontiguousarray(w, dtype=np.float32)  # the engine quantises prepared (fp32) weights
        zero, scale, q = quantize_data(w, QuantType.QInt8.tensor_type, symmetric=True)
        mq, mscale, mzero = folding.quantize_int8(w)
        np.testing.assert_array_equal(mq, q)
        assert mq.dtype == q.dtype == np.int8
        assert mscale.dtype == np.asarray(scale).dtype and mscale == scale and mzero == zero


def test_norm_state_matches_the_torch_module_buffers():
    from cosmicai.models.astromae.network import build_astromae
    from cosmicai.models.astromae.weights_torch import Normalized

    norm = InputNorm(image_offset=[0.1, 0.2, 0.3, 0.4, 0.5], image_scale=[3.0, 0.7, 1.1, 9.0, 0.3],
                     image_asinh=True, mag_offset=[18.0] * 5, mag_scale=[1.5] * 5, z_offset=0.2, z_scale=0.3)
    module = Normalized(build_astromae(), norm)
    got = folding.norm_state(norm)
    for name, buf in module.named_buffers(recurse=False):
        np.testing.assert_array_equal(got[name], buf.numpy(), err_msg=name)
        assert got[name].shape == tuple(buf.shape)


def test_weights_that_do_not_fit_the_template_name_the_tensors(tmp_path):
    from cosmicai.models.astromae.weights_torch import save_weights

    state = load_model("astromae-demo", engine="torch", threads=1).module.net.state_dict()
    state["head.weight"] = state["head.weight"][:191]
    del state["fc_norm.bias"]
    path = tmp_path / "bad.safetensors"
    path.write_bytes(save_weights(state))
    with pytest.raises(ModelError, match=r"bad.safetensors: .*missing.*fc_norm.bias"):
        load_model("astromae", weights=str(path), threads=1)


def test_a_damaged_template_is_a_clear_error(tmp_path):
    with pytest.raises(ModelError, match=r"template.json cannot be read"):
        ort_engine.Template.load(str(tmp_path))
    (tmp_path / "template.json").write_text(json.dumps({"schema": "something/else"}))
    with pytest.raises(ModelError, match=r"schema 'something/else', expected 'cosmicai.onnx-template/1'"):
        ort_engine.Template.load(str(tmp_path))


def test_building_the_template_reproduces_the_shipped_one(tmp_path):
    """Rebuilt from the code, the graphs bind the same tensors by the same recipes as the shipped ones."""
    manifest = onnx_export.build_template(str(tmp_path))
    shipped = ort_engine.Template.load().manifest
    assert manifest["state"] == shipped["state"]
    for name in ort_engine.GRAPH_NAMES:
        assert sorted(map(tuple, manifest["graphs"][name]["externals"].values())) == \
            sorted(map(tuple, shipped["graphs"][name]["externals"].values())), name
