"""AstroMAE (the network, the authors' checkpoint import, folding, the ONNX template and engine, the CUDA feed)
and the registration of the shipped models, made exactly as a plug-in makes its own (``register_model``):

* ``astromae-demo`` — the shipped demo weights (``weights/astromae-demo.safetensors``, trained on synthetic
  galaxies; NOT the paper's SDSS weights), loaded in fp32. Their card ``weights/astromae-demo.json`` says what
  they were trained on and the redshift range of their training labels.
* ``astromae`` — AstroMAE with your weights: ``weights=`` a URL (any storage URL) of a safetensors file
  (``cai model import-cai`` makes one from the original checkpoint), a plain ``.pt`` state dict, or the
  original pickled checkpoint (read with the restricted unpickler).
* ``astromae-random`` — seeded random initialisation, for tests and benchmarks only (predictions are meaningless).

Importing this package loads no torch: the factories (``load.py``) are imported on first use.
"""

from __future__ import annotations

from ..catalog import register_model

from .files import demo_weights_path

#: AstroMAE runs on either engine (ONNX Runtime on CPU through the shipped graph template).
ENGINES = ("torch", "onnxruntime")

register_model("astromae-demo", "cosmicai.models.astromae.load:load_demo", weights=demo_weights_path(), engines=ENGINES,
               weights_origin="the demo weights shipped with cosmicai")
register_model("astromae", "cosmicai.models.astromae.load:load_weights", engines=ENGINES,
               needs_weights="a safetensors file (make one from the original checkpoint with `cai model import-cai`)")
register_model("astromae-random", "cosmicai.models.astromae.load:load_random", reads_weights=False, engines=ENGINES,
               card={"origin": "seeded random initialisation", "trained_on": "nothing (untrained)",
                     "caveat": "random weights for tests and benchmarks: the predictions are meaningless"})
