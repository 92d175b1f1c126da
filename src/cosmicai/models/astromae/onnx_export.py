"""Exporting AstroMAE to ONNX (needs torch and onnx): the graphs of the ONNX Runtime engine and their
weight-free templates.

The prepared AstroMAE (BatchNorm and Linear chains folded, see ``folding.py``) is exported with the TorchScript
exporter as two graphs:

* ``features``: images -> the 384 image features (ViT + Inception; 92% of the FLOPs). Each ViT block's attention
  is rewritten into one fused ``com.microsoft.Attention`` node, and ``asinh`` into Log/Sqrt form (ORT's own Asinh
  is scalar code). In ``fast`` mode the blocks' MatMul and Attention nodes are quantised to int8 dynamically
  (int8 weights, activations quantised per call); the convolutions stay fp32.
* ``regress``: features + magnitudes -> redshift (the magnitude MLP and fusion layers: 30 MB of fp32 weights).

``build_template`` turns them into the *template* the package ships (``models/astromae/graphs/``): the same graphs with
every weight-derived initializer stripped (marked external) and a recipe naming the prepared tensor it comes
from (as is, transposed, or its int8 quantisation). ``ort_engine`` binds any AstroMAE weights to it at load,
with numpy alone, so no process that predicts needs torch. ``build_template`` checks, on weights other than
those it was built from, that the bound graphs give bit-identical outputs to freshly exported ones.

Rebuild the template after changing the network, its rewrites or this exporter:
``python scripts/build_onnx_template.py`` (``tests/test_onnx_template.py`` fails while it is stale).
"""

from __future__ import annotations

import inspect
import io
import json
import logging
import os
import tempfile
import warnings
from typing import Any

import numpy as np
import torch
from torch import nn

from ...errors import ModelError
from . import folding
from .ort_engine import (GRAPH_NAMES, OPSET, TEMPLATE_SCHEMA, Template, code_digest, external_value,
                         graph_name)

class _Features(nn.Module):
    def __init__(self, model: nn.Module):
        super().__init__()
        self.model = model

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        return self.model.image_features(images)


class _Regress(nn.Module):
    def __init__(self, model: nn.Module):
        super().__init__()
        self.model = model

    def forward(self, features: torch.Tensor, magnitudes: torch.Tensor) -> torch.Tensor:
        return self.model.regress(features, magnitudes)


def _export(module: nn.Module, args: tuple[torch.Tensor, ...], inputs: list[str], output: str):
    import onnx

    dynamic = {name: {0: "batch"} for name in [*inputs, output]}
    buf = io.BytesIO()
    with warnings.catch_warnings(), torch.no_grad():
        warnings.simplefilter("ignore")  # the TorchScript exporter's deprecation notice
        torch.onnx.register_custom_op_symbolic("aten::asinh", lambda g, x: g.op("Asinh", x), OPSET)
        kwargs = {"dynamo": False} if "dynamo" in inspect.signature(torch.onnx.export).parameters else {}
        torch.onnx.export(module, args, buf, input_names=inputs, output_names=[output], dynamic_axes=dynamic,
                          opset_version=OPSET, **kwargs)  # the TorchScript exporter: no onnxscript needed
    return onnx.load_from_string(buf.getvalue())


def fuse_attention(model, num_heads: int) -> int:
    """Replace each ``.../attn/qkv`` .. ``.../attn/proj`` subgraph by one com.microsoft.Attention node (in place);
    returns how many were fused. The qkv MatMul weight is already in Attention's [hidden, 3 x hidden] layout."""
    from onnx import helper

    graph = model.graph
    _inline_identities(graph)
    by_name = {n.name: n for n in graph.node}
    constants = {i.name for i in graph.initializer}
    nodes, fused = [], 0
    for node in graph.node:
        nodes.append(node)
        if node.op_type == "Add" and node.name.endswith("/attn/qkv/Add"):
            prefix = node.name[: -len("qkv/Add")]
            matmul, proj = by_name.get(prefix + "qkv/MatMul"), by_name.get(prefix + "proj/MatMul")
            bias = [i for i in node.input if i in constants]
            if matmul is None or proj is None or len(bias) != 1 or matmul.input[1] not in constants:
                continue
            out = prefix + "attention_output"
            nodes.append(helper.make_node("Attention", [matmul.input[0], matmul.input[1], bias[0]], [out],
                                          name=prefix + "Attention", domain="com.microsoft", num_heads=num_heads))
            proj.input[0] = out
            fused += 1
    del graph.node[:]
    graph.node.extend(nodes)
    _prune(graph)
    if not any(o.domain == "com.microsoft" for o in model.opset_import):
        model.opset_import.append(helper.make_opsetid("com.microsoft", 1))
    return fused


def rewrite_asinh(model) -> int:
    """asinh(x) -> sign(x) log(1 + a + a^2 / (1 + sqrt(a^2 + 1))), a = |x| (in place); returns the count."""
    from onnx import helper, numpy_helper

    graph = model.graph
    count = 0
    for i, node in enumerate(list(graph.node)):
        if node.op_type != "Asinh":
            continue
        x, y, p = node.input[0], node.output[0], f"asinh{count}_"
        one = p + "one"
        graph.initializer.append(numpy_helper.from_array(np.array(1.0, np.float32), one))
        steps = [("Abs", [x], "a"), ("Mul", [p + "a", p + "a"], "a2"), ("Add", [p + "a2", one], "a2p1"),
                 ("Sqrt", [p + "a2p1"], "s"), ("Add", [p + "s", one], "s1"), ("Div", [p + "a2", p + "s1"], "q"),
                 ("Add", [p + "a", p + "q"], "l"), ("Add", [p + "l", one], "l1"), ("Log", [p + "l1"], "r"),
                 ("Sign", [x], "sign")]
        new = [helper.make_node(op, ins, [p + out], name=p + out) for op, ins, out in steps]
        new.append(helper.make_node("Mul", [p + "r", p + "sign"], [y], name=p + "out"))
        graph.node.remove(node)
        for j, n in enumerate(new):
            graph.node.insert(i + j, n)
        count += 1
    return count


def _inline_identities(graph) -> None:
    """The exporter shares identical weights (all-zero biases, say) through Identity nodes: point their users at
    the initializer itself so the fused and quantised nodes see constant inputs."""
    constants = {i.name for i in graph.initializer}
    alias = {n.output[0]: n.input[0] for n in graph.node if n.op_type == "Identity" and n.input[0] in constants}
    for node in graph.node:
        for k, name in enumerate(node.input):
            if name in alias:
                node.input[k] = alias[name]
    outputs = {o.name for o in graph.output}
    for node in [n for n in graph.node if n.op_type == "Identity" and n.output[0] in alias]:
        if node.output[0] not in outputs:
            graph.node.remove(node)


def _prune(graph) -> None:
    wanted = {o.name for o in graph.output}
    while True:
        used = set(wanted)
        for n in graph.node:
            used.update(n.input)
        dead = [n for n in graph.node if not any(o in used for o in n.output)]
        if not dead:
            return
        for n in dead:
            graph.node.remove(n)


def quantize_graph_int8(model):
    """Dynamic int8 quantisation (per-tensor weights) of every MatMul with constant weights and every Attention."""
    import onnx
    from onnxruntime.quantization import QuantType, quantize_dynamic

    root = logging.getLogger()
    level = root.level
    with tempfile.TemporaryDirectory(prefix="cai-onnx-") as tmp:
        src, dst = os.path.join(tmp, "fp32.onnx"), os.path.join(tmp, "int8.onnx")
        onnx.save(model, src)
        root.setLevel(logging.ERROR)  # the quantiser's advice to pre-process, logged on the root logger
        try:
            quantize_dynamic(src, dst, weight_type=QuantType.QInt8, per_channel=False,
                             op_types_to_quantize=["MatMul", "Attention"],
                             extra_options={"MatMulConstBOnly": True,
                                            "DefaultTensorType": onnx.TensorProto.FLOAT})
        finally:
            root.setLevel(level)
        return onnx.load(dst)


def export_graphs(module: nn.Module, num_heads: int) -> dict[str, Any]:
    """ONNX ``ModelProto`` graphs of a prepared (folded, fp32, CPU) model: ``features-exact``, ``features-fast``
    (int8, from the same export, so the initializer names agree) and ``regress``."""
    module = module.to(memory_format=torch.contiguous_format)
    images, mags = torch.zeros(2, 5, 32, 32), torch.zeros(2, 5)
    features = _export(_Features(module), (images,), ["images"], "features")
    n_blocks = sum(n.name.endswith("/attn/qkv/Add") for n in features.graph.node)
    if fuse_attention(features, num_heads) != n_blocks:
        raise ModelError("ONNX export: could not fuse every attention block")
    rewrite_asinh(features)
    with torch.no_grad():
        feats = module.image_features(images)
    regress = _export(_Regress(module), (feats, mags), ["features", "magnitudes"], "z")
    rewrite_asinh(regress)
    return {"features-exact": features, "features-fast": quantize_graph_int8(features), "regress": regress}


def build_graphs(module: nn.Module, mode: str, num_heads: int) -> tuple[bytes, bytes]:
    """Serialized ``features`` (of ``mode``) and ``regress`` graphs of a prepared model, weights embedded."""
    graphs = export_graphs(module, num_heads)
    return graphs[f"features-{mode}"].SerializeToString(), graphs["regress"].SerializeToString()


# --------------------------------------------------------------------------- the weight-free template

def _random_model(seed: int, image_asinh: bool):
    """A Normalized AstroMAE whose every tensor (BatchNorm statistics and the input normalisation included) is
    random and distinct, so that each initializer of its export is traced to exactly one prepared tensor."""
    from .network import build_astromae
    from ..weights_io import InputNorm
    from .weights_torch import Normalized

    gen = torch.Generator().manual_seed(seed)
    net = build_astromae()
    with torch.no_grad():
        for name, t in net.state_dict().items():
            if t.is_floating_point():
                values = torch.rand(t.shape, generator=gen) * 0.2 - 0.1
                t.copy_(values.abs() + 0.5 if name.endswith("running_var") else values)
    r = np.random.default_rng(seed)
    norm = InputNorm(image_offset=r.uniform(-1, 1, 5).tolist(), image_scale=r.uniform(0.5, 2, 5).tolist(),
                     image_asinh=image_asinh, mag_offset=r.uniform(15, 20, 5).tolist(),
                     mag_scale=r.uniform(0.5, 2, 5).tolist(), z_offset=float(r.uniform(0.1, 0.5)),
                     z_scale=float(r.uniform(0.5, 2)))
    return Normalized(net, norm).eval()


def _prepared_module(model: nn.Module) -> nn.Module:
    from .fast import _set_fused, fold_batchnorm, fold_linear_chains

    import copy

    model = copy.deepcopy(model).eval()
    for module in model.modules():  # the exporter inlines non-persistent buffers as Constant nodes: make them
        for name, buf in list(module.named_buffers(recurse=False)):  # initializers, named, like the weights
            module.register_buffer(name, buf, persistent=True)
    fold_batchnorm(model)
    fold_linear_chains(model)
    _set_fused(model, True)
    return model


def prepared_numpy(model: nn.Module) -> dict[str, np.ndarray]:
    """The numpy prepared state ``ort_engine`` binds for ``model`` (a Normalized AstroMAE): ``folding`` applied
    to its raw weights, plus its input normalisation."""
    raw = {k: v.detach().cpu().numpy() for k, v in model.net.state_dict().items()}
    return {**folding.prepared_state(raw), **folding.norm_state(model.norm)}


def _recipes(graph, state: dict[str, np.ndarray]) -> dict[str, list[str]]:
    """Recipe of each weight-derived initializer of ``graph``: ``[how, key]`` with how = ``w`` (the prepared tensor
    ``key``), ``T`` (its transpose) or ``q8T``/``q8T.scale``/``q8T.zero_point`` (the int8 quantisation of its
    transpose). Initializers that match none (the asinh rewrite's constants) stay in the graph."""
    from onnx import numpy_helper

    by_shape: dict[tuple[int, ...], list[str]] = {}
    for key, arr in state.items():
        if arr.ndim == 2:
            by_shape.setdefault(arr.T.shape, []).append(key)
    recipes: dict[str, list[str]] = {}
    transposed: dict[str, str] = {}

    def of_transpose(arr: np.ndarray) -> str | None:
        return next((k for k in by_shape.get(arr.shape, []) if np.array_equal(state[k].T, arr)), None)

    inits = {i.name: i for i in graph.initializer}
    for name, init in inits.items():
        arr = numpy_helper.to_array(init)
        key = name[len("model."):] if name.startswith("model.") else None
        if key in state and np.array_equal(state[key], arr):
            recipes[name] = ["w", key]
        elif arr.ndim == 2 and arr.dtype == np.float32 and (key := of_transpose(arr)) is not None:
            recipes[name] = ["T", key]
            transposed[name] = key
    for name, init in inits.items():
        for suffix, how in (("_quantized", "q8T"), ("_scale", "q8T.scale"), ("_zero_point", "q8T.zero_point")):
            base = name[: -len(suffix)] if name.endswith(suffix) else None
            if base is None:
                continue
            key = transposed.get(base)
            if key is None:  # the fp32 weight is gone from the quantised graph: trace it through its int8 copy
                q = inits.get(base + "_quantized")
                qa = numpy_helper.to_array(q) if q is not None else np.zeros(0)
                key = next((k for k in by_shape.get(qa.shape, [])
                            if np.array_equal(folding.quantize_int8(state[k].T)[0], qa)), None)
                if key is not None:
                    transposed[base] = key
            if key is not None:
                recipes[name] = [how, key]
    for name, (how, key) in recipes.items():
        got = external_value(how, key, state, {})
        want = numpy_helper.to_array(inits[name])
        if got.dtype != want.dtype or not np.array_equal(got, want):
            raise ModelError(f"ONNX template: recipe {how}({key}) does not reproduce initializer {name} "
                             "(onnxruntime's quantiser changed?)")
    return recipes


def _strip(graph, recipes: dict[str, list[str]]) -> None:
    """Mark every initializer named in ``recipes`` external (no data): the engine supplies it at load."""
    from onnx import TensorProto

    for init in graph.initializer:
        if init.name in recipes:
            for fld in ("raw_data", "float_data", "int32_data", "int64_data", "double_data"):
                init.ClearField(fld)
            init.data_location = TensorProto.EXTERNAL
            del init.external_data[:]
            entry = init.external_data.add()
            entry.key, entry.value = "location", "bound-at-load"


def build_template(folder: str, seed: int = 1) -> dict[str, Any]:
    """Write the weight-free graphs and ``template.json`` into ``folder``; returns the manifest. Checks that binding
    other random weights to the template reproduces their freshly exported graphs' outputs bit for bit."""
    import onnx
    import onnxruntime

    from .network import build_astromae, count_params

    net = build_astromae()
    manifest: dict[str, Any] = {
        "schema": TEMPLATE_SCHEMA, "model": "astromae", "code_digest": code_digest(),
        "built_with": {"torch": torch.__version__, "onnx": onnx.__version__,
                       "onnxruntime": onnxruntime.__version__, "opset": OPSET},
        "n_params": count_params(net), "num_heads": net.cfg.num_heads,
        "state": {k: list(v.shape) for k, v in net.state_dict().items()}, "graphs": {}}
    os.makedirs(folder, exist_ok=True)
    for image_asinh in (False, True):
        model = _random_model(seed, image_asinh)
        state = prepared_numpy(model)
        graphs = export_graphs(_prepared_module(model), net.cfg.num_heads)
        for part, graph in graphs.items():
            name = graph_name(part, image_asinh)
            if name in manifest["graphs"]:
                continue  # regress does not depend on image_asinh
            recipes = _recipes(graph.graph, state)
            _strip(graph.graph, recipes)
            file = f"{name}.onnx"
            with open(os.path.join(folder, file), "wb") as fh:
                fh.write(graph.SerializeToString())
            manifest["graphs"][name] = {"file": file, "externals": recipes}
    missing = set(GRAPH_NAMES) - set(manifest["graphs"])
    if missing:
        raise ModelError(f"ONNX template: graphs {sorted(missing)} were not built")
    with open(os.path.join(folder, "template.json"), "w") as fh:
        json.dump(manifest, fh, indent=1, sort_keys=True)
        fh.write("\n")
    check_template(Template.load(folder), seed=seed + 1)
    return manifest


def check_template(template: Template, seed: int = 2, rows: int = 40) -> float:
    """Largest |difference| between ``template`` bound to random weights and the same weights exported afresh
    (both modes, with and without asinh); raises ModelError unless the outputs are bit-identical."""
    import onnxruntime as ort

    from .ort_engine import OrtRunner

    r = np.random.default_rng(seed)
    images = r.normal(0, 1, (rows, 5, 32, 32)).astype(np.float32)
    mags = r.uniform(15, 24, (rows, 5)).astype(np.float32)
    worst = 0.0
    for image_asinh in (False, True):
        model = _random_model(seed, image_asinh)
        state = prepared_numpy(model)
        for mode in ("exact", "fast"):
            bound = OrtRunner(state, mode, threads=1, image_asinh=image_asinh, template=template)(images, mags)
            features, regress = build_graphs(_prepared_module(model), mode, template.num_heads)
            opts = ort.SessionOptions()
            opts.intra_op_num_threads = 1
            f = ort.InferenceSession(features, opts, providers=["CPUExecutionProvider"])
            g = ort.InferenceSession(regress, opts, providers=["CPUExecutionProvider"])
            feats = np.concatenate([f.run(None, {"images": images[s:s + 16]})[0] for s in range(0, rows, 16)])
            fresh = g.run(None, {"features": feats, "magnitudes": mags})[0]
            diff = float(np.max(np.abs(bound - fresh)))
            worst = max(worst, diff)
            if not np.array_equal(bound, fresh):
                raise ModelError(f"ONNX template ({mode}, image_asinh={image_asinh}): bound weights differ from a "
                                 f"fresh export by up to {diff:.3g}")
    return worst
