"""Accuracy of every engine and mode against the straightforward module, and the fast-mode guard's cost.

    python benchmarks/model_accuracy.py [--galaxies 2000] [--weights URL] [--threads 2]

Renders held-out synthetic galaxies (``synthesize(N, seed=7, first_id=40_000_000)``, never seen in training),
predicts them with the plain fp32 module (no rewrites) and with each engine in exact and fast mode, and prints
max |dz| against the plain module plus MAE, bias, precision and R^2 of each. Then times the guard the way a
fast-mode run pays it: loading the exact model beside the fast one and comparing 256 rows.
"""

from __future__ import annotations

import argparse
import os
import sys
import time

import numpy as np


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--galaxies", type=int, default=2000)
    p.add_argument("--weights", default=None, help="safetensors URL (default: the demo weights)")
    p.add_argument("--threads", type=int, default=2)
    a = p.parse_args(argv)

    import torch

    from cosmicai import storage
    from cosmicai.data.synth import synthesize
    from cosmicai.models.guard import calibrate, max_dz
    from cosmicai.models.astromae import demo_weights_path
    from cosmicai.models.astromae.load import astromae_from_weights
    from cosmicai.models.registry import load_model
    from cosmicai.pipeline.metrics import redshift_metrics

    torch.set_num_threads(a.threads)
    weights = a.weights or demo_weights_path()
    name = "astromae" if a.weights else "astromae-demo"
    part = synthesize(a.galaxies, seed=7, first_id=40_000_000, workers=a.threads)
    images, mags, z_true = part.images, part.magnitudes, part.redshift
    plain = astromae_from_weights(storage.read_bytes(weights), weights).eval()
    with torch.inference_mode():
        ref = np.concatenate([plain(torch.from_numpy(images[i:i + 256]), torch.from_numpy(mags[i:i + 256])).numpy()
                              for i in range(0, len(images), 256)])
    rows = [("plain module", ref)]
    for engine in ("onnxruntime", "torch"):
        for mode in ("exact", "fast"):
            pred = load_model(name, weights=a.weights, mode=mode, engine=engine, threads=a.threads)
            rows.append((f"{engine} {mode}", pred.predict(images, mags)))
    print(f"{a.galaxies} held-out galaxies, weights {weights}")
    print(f"{'engine, mode':<18} {'max|dz| vs plain':>16} {'MAE':>9} {'bias':>9} {'precision':>9} {'R2':>7}")
    for label, z in rows:
        m = redshift_metrics(z, z_true)
        print(f"{label:<18} {max_dz(z, ref) if label != 'plain module' else 0.0:>16.1e} {m['MAE']:>9.6f} "
              f"{m['Bias']:>9.6f} {m['Precision']:>9.6f} {m['R2']:>7.4f}")

    for cache in ("cold", "warm"):
        if cache == "cold":
            os.environ["CAI_ONNX_CACHE"] = "off"
        else:
            os.environ.pop("CAI_ONNX_CACHE", None)
            load_model(name, weights=a.weights, mode="exact", threads=a.threads)  # fills the cache
        fast = load_model(name, weights=a.weights, mode="fast", threads=a.threads)
        t0 = time.perf_counter()
        exact = load_model(name, weights=a.weights, mode="exact", threads=a.threads)
        check = calibrate(fast, exact, images, mags, load_seconds=time.perf_counter() - t0)
        print(f"guard ({cache} graph cache): {check.seconds:.2f} s for {check.rows} rows "
              f"(exact model load included), max |dz| {check.max_dz:.1e}, mode used {check.mode_used}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
