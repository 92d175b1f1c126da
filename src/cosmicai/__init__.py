"""cosmicai: Cloud-based Astronomy Inference (CAI).

Run a pre-trained astronomy foundation model (first: AstroMAE redshift regression) over large galaxy
datasets, fanned out over local processes, a Dask cluster, Lithops functions or AWS Lambda, in three stages:
plan -> infer -> summarize (see ``cosmicai.pipeline``).

The Python API (imported on first use, so ``import cosmicai`` stays light)::

    result = cosmicai.run("galaxies/", "results/", model="astromae-demo")   # -> RunResult
    result.metrics, result.failures, result.predictions()                   # pyarrow Table
    result = cosmicai.open("results/")                                      # a finished run, read only
    z = cosmicai.predict(images, magnitudes)                                # arrays in memory
"""

from __future__ import annotations

from typing import Any

__version__ = "0.1.0"
__all__ = ["RunResult", "__version__", "load_model", "open", "predict", "run"]


def __getattr__(name: str) -> Any:
    if name in ("run", "open", "predict", "load_model", "RunResult"):
        from . import api

        return getattr(api, name)
    raise AttributeError(f"module 'cosmicai' has no attribute {name!r}")
