"""ONNX Runtime engine: the CPU path of both inference modes, with numpy and onnxruntime alone (no torch).

The package ships a weight-free *template* of AstroMAE's ONNX graphs (``models/astromae/graphs/``, built by
``onnx_export.build_template``): every initializer that depends on the weights is marked external and named with
a recipe. At load, the prepared weights (``folding.prepared_state``: numpy) are bound to it by name
(``SessionOptions.add_external_initializers``, zero-copy): as they are, transposed, or quantised to int8
(``fast``). So any AstroMAE weights run without exporting anything, in any process, in about 0.1 s.

Two graphs per mode:

* ``features``: images -> the 384 image features (ViT + Inception; 92% of the FLOPs), each ViT block's attention
  one fused ``com.microsoft.Attention`` node; in ``fast`` mode the blocks' MatMul and Attention weights in int8
  (activations quantised per call), the convolutions fp32.
* ``regress``: features + magnitudes -> redshift (the magnitude MLP and fusion layers: 30 MB of fp32 weights).

``features`` runs in chunks of 16 images (activations stay in cache) and ``regress`` in one call per batch (its
weights are read once per batch, not once per chunk). Parallelism is by streams: one session with a single
intra-op thread, called from ``threads`` Python threads on alternating chunks (ORT releases the GIL), which
measured 20-40% faster on 2 cores than one call using 2 intra-op threads.
"""

from __future__ import annotations

import functools
import hashlib
import json
import os
import threading
from concurrent.futures import ThreadPoolExecutor
from importlib import resources
from typing import Any

import numpy as np

from ...errors import ModelError
from ..modes import EngineUnavailable
from . import folding

#: Images per ``features`` call (measured fastest: 16-32 on a 2-core AVX-512 machine).
FEATURE_CHUNK = 16
OPSET = 17
TEMPLATE_SCHEMA = "cosmicai.onnx-template/1"
GRAPH_NAMES = ("features-exact", "features-exact-asinh", "features-fast", "features-fast-asinh", "regress")
#: The source files a template depends on (``code_digest``): the network, its rewrites and the exporter.
TEMPLATE_SOURCES = ("network.py", "fast.py", "folding.py", "onnx_export.py", "weights_torch.py")


class OrtUnavailable(EngineUnavailable):
    """onnxruntime cannot run the graphs here (the weights are fine: another engine may run them)."""


def graph_name(part: str, image_asinh: bool) -> str:
    """Template graph name: ``features-<mode>[-asinh]`` or ``regress``."""
    return f"{part}-asinh" if image_asinh and part.startswith("features") else part


def code_digest() -> str:
    """sha256 of the sources a template is built from (``TEMPLATE_SOURCES``, beside this module)."""
    here = os.path.dirname(os.path.abspath(__file__))
    h = hashlib.sha256()
    for name in TEMPLATE_SOURCES:
        with open(os.path.join(here, name), "rb") as fh:
            h.update(name.encode() + b"\0" + fh.read())
    return h.hexdigest()


def template_dir() -> str:
    """Folder of the shipped template."""
    return str(resources.files(__package__).joinpath("graphs"))


class Template:
    """The weight-free graphs and their manifest (``template.json``)."""

    def __init__(self, folder: str, manifest: dict[str, Any]):
        self.folder = folder
        self.manifest = manifest
        self.num_heads = int(manifest["num_heads"])
        self.n_params = int(manifest["n_params"])
        self.state_shapes = {k: tuple(v) for k, v in manifest["state"].items()}

    @classmethod
    def load(cls, folder: str | None = None) -> Template:
        """Read ``folder`` (default: the shipped template); a missing or foreign manifest raises ModelError."""
        folder = folder or template_dir()
        path = os.path.join(folder, "template.json")
        try:
            with open(path, encoding="utf-8") as fh:
                manifest = json.load(fh)
        except (OSError, ValueError) as exc:
            raise ModelError(f"ONNX template {path} cannot be read: {exc}") from exc
        if manifest.get("schema") != TEMPLATE_SCHEMA:
            raise ModelError(f"ONNX template {path}: schema {manifest.get('schema')!r}, expected {TEMPLATE_SCHEMA!r}")
        return cls(folder, manifest)

    def graph(self, name: str) -> tuple[bytes, dict[str, list[str]]]:
        """Serialized graph ``name`` and its external initializers' recipes."""
        entry = self.manifest["graphs"][name]
        with open(os.path.join(self.folder, entry["file"]), "rb") as fh:
            return fh.read(), entry["externals"]


@functools.lru_cache(maxsize=1)
def shipped_template() -> Template:
    """The template in the package (read once per process)."""
    return Template.load()


def external_value(how: str, key: str, state: dict[str, np.ndarray], cache: dict[str, Any]) -> np.ndarray:
    """The array recipe ``[how, key]`` asks for, from the prepared ``state`` (quantisations shared via ``cache``)."""
    if key not in state:
        raise ModelError(f"ONNX template needs prepared tensor '{key}', which the weights do not have")
    if how == "w":
        return state[key]
    if how == "T":
        return np.ascontiguousarray(state[key].T)
    if how.startswith("q8T"):
        if key not in cache:
            cache[key] = folding.quantize_int8(np.ascontiguousarray(state[key].T))
        q, scale, zero = cache[key]
        return {"q8T": q, "q8T.scale": scale, "q8T.zero_point": zero}[how]
    raise ModelError(f"ONNX template: unknown recipe '{how}' for '{key}'")


def _session(blob: bytes, recipes: dict[str, list[str]], state: dict[str, np.ndarray], cache: dict[str, Any],
             keep: list[Any]):
    import onnxruntime as ort

    opts = ort.SessionOptions()
    opts.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_ALL
    opts.intra_op_num_threads = 1
    opts.inter_op_num_threads = 1
    opts.log_severity_level = 3
    names, values = [], []
    for name, (how, key) in recipes.items():
        arr = np.require(external_value(how, key, state, cache), requirements="C")  # keeps 0-d arrays 0-d
        keep.append(arr)  # the OrtValue borrows this memory: it must outlive the session
        names.append(name)
        values.append(ort.OrtValue.ortvalue_from_numpy(arr))
    opts.add_external_initializers(names, values)
    keep.extend(values)
    try:
        return ort.InferenceSession(blob, opts, providers=["CPUExecutionProvider"])
    except Exception as exc:  # an ORT build without the contrib ops, say
        raise OrtUnavailable(f"onnxruntime could not load the AstroMAE graph: {exc}") from exc


class OrtRunner:
    """``runner(images [N,5,32,32], magnitudes [N,5]) -> redshift [N]`` (float32 numpy) on ``threads`` streams,
    from prepared numpy weights bound to the template."""

    def __init__(self, state: dict[str, np.ndarray], mode: str, threads: int, image_asinh: bool = False,
                 template: Template | None = None):
        """``state``: prepared weights and input normalisation (``folding.prepared_state`` + ``norm_state``)."""
        template = template or shipped_template()
        cache: dict[str, Any] = {}
        self._keep: list[Any] = []
        self._features = _session(*template.graph(graph_name(f"features-{mode}", image_asinh)), state, cache,
                                  self._keep)
        self._regress = _session(*template.graph("regress"), state, cache, self._keep)
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
        if n == 0:
            return np.empty(0, dtype=np.float32)
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


def runner_for_weights(raw: dict[str, np.ndarray], norm: Any, mode: str, threads: int,
                       source: str = "weights") -> OrtRunner:
    """An :class:`OrtRunner` for AstroMAE weights ``raw`` (its state dict as numpy arrays, the names of our
    safetensors files) and input normalisation ``norm`` (a ``weights_io.InputNorm``)."""
    from ..weights_io import check_state

    template = shipped_template()
    check_state(template.state_shapes, raw, source)
    state = {**folding.prepared_state(raw), **folding.norm_state(norm)}
    return OrtRunner(state, mode, threads, image_asinh=bool(norm.image_asinh), template=template)
