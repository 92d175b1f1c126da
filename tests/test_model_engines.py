"""The inference engines behind ``exact`` and ``fast``: torch and ONNX Runtime (graph rewrites, streams)."""

from __future__ import annotations

import copy
import warnings

import numpy as np
import pytest
import torch

from cosmicai.errors import ModelError
from cosmicai.models import modes
from cosmicai.models.astromae import onnx_export, ort_engine
from cosmicai.models.astromae.network import build_astromae
from cosmicai.models.astromae.fast import choose_engine, fold_batchnorm, fold_linear_chains
from cosmicai.models.registry import load_model
from cosmicai.models.astromae.weights_torch import Normalized

pytestmark = pytest.mark.skipif(not modes.onnxruntime_available(), reason="onnxruntime not installed")


def _inputs(n: int, seed: int = 1) -> tuple[np.ndarray, np.ndarray]:
    rng = np.random.default_rng(seed)
    return rng.random((n, 5, 32, 32), dtype=np.float32), rng.uniform(15, 22, (n, 5)).astype(np.float32)


def _trained_like(seed: int = 3) -> Normalized:
    """Random AstroMAE with non-zero biases and BatchNorm statistics, so no weight is trivially shared."""
    net = build_astromae(seed=seed)
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, t in list(net.named_parameters()) + list(net.named_buffers()):
            if t.dtype.is_floating_point and t.ndim == 1:
                t.add_(0.05 * torch.randn(t.shape, generator=gen).abs() if "var" in name else
                       0.05 * torch.randn(t.shape, generator=gen))
    return Normalized(net).eval()


def test_folded_linear_chains_give_the_same_numbers():
    model = _trained_like()
    folded = fold_linear_chains(fold_batchnorm(copy.deepcopy(model)))
    net = folded.net
    assert isinstance(net.head, torch.nn.Identity) and isinstance(net.vit_mlp[2], torch.nn.Identity)
    assert isinstance(net.mix.inception_mlp[2], torch.nn.Identity) and isinstance(net.mix.mag_mlp[8], torch.nn.Identity)
    assert net.fusion[0].in_features == 1096 + 1096 + 1024
    images, mags = _inputs(16)
    with torch.no_grad():
        want = model(torch.from_numpy(images), torch.from_numpy(mags))
        got = folded(torch.from_numpy(images), torch.from_numpy(mags))
        split = folded.regress(folded.image_features(torch.from_numpy(images)), torch.from_numpy(mags))
    torch.testing.assert_close(got, want, rtol=0, atol=1e-6)
    torch.testing.assert_close(split, got, rtol=0, atol=0)


def test_export_fuses_every_attention_block_and_rewrites_asinh():
    import onnx

    model = fold_linear_chains(fold_batchnorm(Normalized(build_astromae(seed=0)).eval()))  # zero biases: shared
    features, regress = onnx_export.build_graphs(model, "exact", num_heads=3)
    ops = [n.op_type for n in onnx.load_from_string(features).graph.node]
    assert ops.count("Attention") == 12 and "Softmax" not in ops and "Asinh" not in ops
    q_ops = [n.op_type for n in onnx.load_from_string(onnx_export.build_graphs(model, "fast", 3)[0]).graph.node]
    assert q_ops.count("QAttention") == 12 or q_ops.count("Attention") == 0
    assert "MatMulInteger" in q_ops or "DynamicQuantizeMatMul" in q_ops
    assert "MatMulInteger" not in [n.op_type for n in onnx.load_from_string(regress).graph.node]


def test_asinh_rewrite_matches_torch():
    import onnxruntime as ort

    class Asinh(torch.nn.Module):
        def forward(self, x: torch.Tensor) -> torch.Tensor:
            return torch.asinh(x)

    graph = onnx_export._export(Asinh(), (torch.zeros(3, 1),), ["x"], "y")
    assert onnx_export.rewrite_asinh(graph) == 1
    sess = ort.InferenceSession(graph.SerializeToString(), providers=["CPUExecutionProvider"])
    x = np.concatenate([np.linspace(-50, 50, 2001), np.linspace(-1e-3, 1e-3, 201), [0.0, 1e4, -1e4]])
    x = x.astype(np.float32).reshape(-1, 1)
    np.testing.assert_allclose(sess.run(None, {"x": x})[0], np.arcsinh(x.astype(np.float64)), rtol=2e-6, atol=2e-7)


@pytest.mark.parametrize("threads", [1, 2])
def test_onnxruntime_exact_matches_torch_and_the_plain_module(threads):
    model = _trained_like()
    from cosmicai.models.registry import Predictor

    ort_pred = Predictor("t", model, mode="exact", engine="onnxruntime", threads=threads)
    torch_pred = Predictor("t", model, mode="exact", engine="torch")
    images, mags = _inputs(37)  # chunks of 16 and a ragged end on each stream
    got = ort_pred.predict(images, mags, batch_size=20)
    with torch.no_grad():
        plain = model(torch.from_numpy(images), torch.from_numpy(mags)).numpy()
    np.testing.assert_allclose(got, plain, rtol=0, atol=1e-6)
    np.testing.assert_allclose(torch_pred.predict(images, mags), plain, rtol=0, atol=1e-6)
    assert ort_pred.engine == "onnxruntime" and torch_pred.engine == "torch"


def test_engine_choice_and_errors(monkeypatch):
    model = Normalized(build_astromae(seed=0))
    cpu = torch.device("cpu")
    assert choose_engine(model, cpu) == "onnxruntime"
    assert choose_engine(model, cpu, compile=True) == "torch"  # torch.compile asked for: torch it is
    assert choose_engine(torch.nn.Linear(2, 2), cpu) == "torch"  # plug-in modules run on torch
    assert choose_engine(model, torch.device("cuda")) == "torch"
    monkeypatch.setenv("CAI_ENGINE", "torch")
    assert choose_engine(model, cpu) == "torch"
    assert load_model("astromae-random", threads=1).engine == "torch"
    monkeypatch.delenv("CAI_ENGINE")
    with pytest.raises(ModelError, match="engine 'tensorrt' is not known; choose one of auto, torch, onnxruntime"):
        load_model("astromae-random", engine="tensorrt")
    with pytest.raises(ModelError, match="engine 'onnxruntime' runs AstroMAE on CPU only.*Linear on cpu"):
        choose_engine(torch.nn.Linear(2, 2), cpu, "onnxruntime")
    monkeypatch.setattr(modes, "onnxruntime_available", lambda: False)
    assert choose_engine(model, cpu) == "torch"  # auto falls back when onnxruntime is missing
    with pytest.raises(ModelError, match="needs the onnxruntime package"):
        choose_engine(model, cpu, "onnxruntime")


def test_cai_model_info_names_the_engine(capsys):
    import json

    from cosmicai.cli import main

    assert main(["model", "info", "--name", "astromae-random", "--mode", "fast", "--engine", "torch"]) == 0
    info = json.loads(capsys.readouterr().out)
    assert (info["engine"], info["mode"], info["n_params"], info["gflop_per_image"]) == ("torch", "fast", 15800961,
                                                                                          0.2192)


def test_auto_falls_back_to_torch_when_onnxruntime_cannot_load_the_graph(monkeypatch):
    def broken(*args, **kwargs):
        raise ort_engine.OrtUnavailable("onnxruntime exploded")

    monkeypatch.setattr(ort_engine, "_session", broken)
    images, mags = _inputs(2)
    for name in ("astromae-random", "astromae-demo"):  # a torch module, and numpy weights bound to the template
        with pytest.warns(RuntimeWarning, match="onnxruntime exploded.*running on torch instead"):
            pred = load_model(name, threads=1)
        assert pred.engine == "torch" and pred.predict(images, mags).shape == (2,)
        with pytest.raises(ModelError, match="onnxruntime exploded"):
            load_model(name, threads=1, engine="onnxruntime")


def test_bad_weights_are_refused_not_run_on_another_engine(tmp_path):
    from cosmicai.models.astromae.weights_torch import save_weights

    net = build_astromae(seed=0)
    state = net.state_dict()
    state["cls_token"][0, 0, 0] = float("nan")
    path = tmp_path / "nan.safetensors"
    path.write_bytes(save_weights(state))
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # no fallback warning: the weights are wrong on every engine
        with pytest.raises(ModelError, match=r"nan.safetensors: weight\(s\) contain NaN or inf: cls_token"):
            load_model("astromae", weights=str(path), threads=1)
