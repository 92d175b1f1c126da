"""ONNX Runtime engine: the CPU path of both inference modes.

The prepared AstroMAE (BatchNorm and Linear chains folded, see ``fast.py``) is exported twice with
``torch.onnx.export``:

* ``features``: images -> the 384 image features (ViT + Inception; 92% of the FLOPs). Each ViT block's
  attention is rewritten into one fused ``com.microsoft.Attention`` node, and ``asinh`` into Log/Sqrt form (ORT's
  own Asinh is scalar code). In ``fast`` mode the blocks' MatMul and Attention nodes are quantised to int8
  dynamically (int8 weights, activations quantised per call); the convolutions stay fp32.
* ``regress``: features + magnitudes -> redshift (the magnitude MLP and fusion layers: 30 MB of fp32 weights).

``features`` runs in chunks of 16 images (activations stay in cache) and ``regress`` in one call per batch (its
weights are read once per batch, not once per chunk). Parallelism is by streams: one session with a single
intra-op thread, called from ``threads`` Python threads on alternating chunks (ORT releases the GIL), which
measured 20-40% faster on 2 cores than one call using 2 intra-op threads.

Export and quantisation take ~2-3 s; the graphs are cached on disk (``cache_dir``) keyed by a hash of the weights,
mode and library versions, so later processes load them in well under a second.
"""

from __future__ import annotations

import hashlib
import inspect
import io
import logging
import os
import sys
import tempfile
import threading
import warnings
from concurrent.futures import ThreadPoolExecutor

import numpy as np
import torch
from torch import nn

from .. import storage
from ..errors import ModelError

#: Images per ``features`` call (measured fastest: 16-32 on a 2-core AVX-512 machine).
FEATURE_CHUNK = 16
OPSET = 17


def available() -> bool:
    """Whether onnxruntime and onnx can be imported."""
    try:
        import onnx  # noqa: F401
        import onnxruntime  # noqa: F401
    except ImportError:
        return False
    return True


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


def quantize_int8(model):
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


def build_graphs(module: nn.Module, mode: str, num_heads: int) -> tuple[bytes, bytes]:
    """Serialized ``features`` and ``regress`` ONNX graphs of a prepared (folded, fp32, CPU) model."""
    module = module.to(memory_format=torch.contiguous_format)
    images, mags = torch.zeros(2, 5, 32, 32), torch.zeros(2, 5)
    features = _export(_Features(module), (images,), ["images"], "features")
    n_blocks = sum(n.name.endswith("/attn/qkv/Add") for n in features.graph.node)
    if fuse_attention(features, num_heads) != n_blocks:
        raise ModelError("ONNX export: could not fuse every attention block")
    rewrite_asinh(features)
    if mode == "fast":
        features = quantize_int8(features)
    with torch.no_grad():
        feats = module.image_features(images)
    regress = _export(_Regress(module), (feats, mags), ["features", "magnitudes"], "z")
    rewrite_asinh(regress)
    return features.SerializeToString(), regress.SerializeToString()


def _cache_key(module: nn.Module, mode: str) -> str:
    import onnxruntime

    h = hashlib.sha256(f"{mode} {OPSET} {torch.__version__} {onnxruntime.__version__}".encode())
    h.update(_code_digest())  # a change to the network or its rewrites invalidates every cached graph
    for name, t in module.state_dict().items():
        h.update(name.encode())
        h.update(t.detach().cpu().contiguous().numpy().tobytes())
    return h.hexdigest()[:32]


def _code_digest() -> bytes:
    """sha256 of the source of the network, its inference rewrites and this exporter."""
    from . import astromae, fast

    h = hashlib.sha256()
    for mod in (astromae, fast, sys.modules[__name__]):
        with open(mod.__file__, "rb") as fh:
            h.update(fh.read())
    return h.digest()


def cache_dir() -> str | None:
    """Where exported graphs are kept: ``$CAI_ONNX_CACHE``, else ``$XDG_CACHE_HOME/cosmicai/onnx`` (default
    ``~/.cache/cosmicai/onnx``); ``CAI_ONNX_CACHE=off`` turns caching off."""
    folder = os.environ.get("CAI_ONNX_CACHE")
    if folder:
        return None if folder.lower() in ("off", "0", "none", "false") else folder
    base = os.environ.get("XDG_CACHE_HOME") or os.path.join(os.path.expanduser("~"), ".cache")
    return os.path.join(base, "cosmicai", "onnx")


def cached_graphs(module: nn.Module, mode: str, num_heads: int, refresh: bool = False) -> tuple[bytes, bytes]:
    """``build_graphs``, kept in ``cache_dir()`` keyed by a hash of the weights, mode and library versions
    (``refresh`` rebuilds). An unwritable cache (a read-only image, say) only costs the rebuild."""
    folder = cache_dir()
    if folder is None:
        return build_graphs(module, mode, num_heads)
    key = _cache_key(module, mode)
    paths = [os.path.join(folder, f"{key}-{part}.onnx") for part in ("features", "regress")]
    if not refresh:
        try:
            return storage.read_bytes(paths[0]), storage.read_bytes(paths[1])
        except OSError:  # StorageError included: not cached yet
            pass
    graphs = build_graphs(module, mode, num_heads)
    try:
        for p, blob in zip(paths, graphs):
            storage.write_bytes(p, blob)  # atomic: a concurrent reader never sees half a graph
    except OSError:
        pass
    return graphs


class OrtRunner:
    """``runner(images [N,5,32,32], magnitudes [N,5]) -> redshift [N]`` (float32 numpy) on ``threads`` streams."""

    def __init__(self, module: nn.Module, mode: str, threads: int, num_heads: int):
        import onnxruntime as ort

        opts = ort.SessionOptions()
        opts.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_ALL
        opts.intra_op_num_threads = 1
        opts.inter_op_num_threads = 1
        opts.log_severity_level = 3
        providers = ["CPUExecutionProvider"]
        for refresh in (False, True):  # a damaged cache entry is rebuilt once
            features, regress = cached_graphs(module, mode, num_heads, refresh=refresh)
            try:
                self._features = ort.InferenceSession(features, opts, providers=providers)
                self._regress = ort.InferenceSession(regress, opts, providers=providers)
                break
            except Exception as exc:  # an ORT build without the contrib ops, say
                if refresh or cache_dir() is None:
                    raise ModelError(f"onnxruntime could not load the exported model: {exc}") from exc
        self.n_features = int(self._regress.get_inputs()[0].shape[1])
        self.threads = max(1, threads)
        self._pool = ThreadPoolExecutor(self.threads, thread_name_prefix="cai-ort") if self.threads > 1 else None
        self._lock = threading.Lock()

    def _streams(self, n: int, step: int, work) -> None:
        starts = list(range(0, n, step))
        if self._pool is None or len(starts) == 1:
            for s in starts:
                work(s)
            return
        lanes = [starts[k::self.threads] for k in range(self.threads)]
        for fut in [self._pool.submit(lambda lane=lane: [work(s) for s in lane]) for lane in lanes if lane]:
            fut.result()

    def __call__(self, images: np.ndarray, magnitudes: np.ndarray) -> np.ndarray:
        n = images.shape[0]
        feats = np.empty((n, self.n_features), dtype=np.float32)
        out = np.empty(n, dtype=np.float32)

        def feature_chunk(s: int) -> None:
            feats[s:s + FEATURE_CHUNK] = self._features.run(None, {"images": images[s:s + FEATURE_CHUNK]})[0]

        step = -(-n // self.threads)

        def regress_chunk(s: int) -> None:
            out[s:s + step] = self._regress.run(None, {"features": feats[s:s + step],
                                                       "magnitudes": magnitudes[s:s + step]})[0]

        with self._lock:  # one batch at a time: the streams already use every thread given
            self._streams(n, FEATURE_CHUNK, feature_chunk)
            self._streams(n, step, regress_chunk)
        return out
