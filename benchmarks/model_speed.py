"""AstroMAE CPU inference speed: the original CAI worker loop against our exact and fast predictors.

The original loop is reproduced faithfully: a torch DataLoader over a TensorDataset, batch 512, the whole
loop inside ``torch.profiler.profile(activities=[ProfilerActivity.CPU], profile_memory=True)`` and
``torch.no_grad()``, ``gc.collect()`` after every batch, the straightforward (unfolded, non-SDPA) model
wrapped in ``nn.DataParallel`` as the original checkpoint is. All methods run alternately in one process on
the same partition (5,113 samples by default) with the same weights and thread count; the median of the
repeats is reported, with achieved GFLOP/s against a GEMM rate measured here. Ours are timed on both engines
(ONNX Runtime, the CPU default, and torch) unless ``--engine`` picks one.

    python benchmarks/model_speed.py [--samples 5113] [--repeats 3] [--threads N] [--engine both|onnxruntime|torch]
                                     [--model astromae-demo]
                                     [--data PARTITION_URL]   (default: 5,113 freshly synthesised galaxies)
"""

from __future__ import annotations

import argparse
import functools
import gc
import os
import statistics
import sys
import time

import numpy as np
import torch
from torch.profiler import ProfilerActivity, profile
from torch.utils.data import DataLoader, TensorDataset

from cosmicai.models.astromae import demo_weights_path
from cosmicai.models.astromae.network import flops_per_image
from cosmicai.models.registry import load_model


def original_loop(model: torch.nn.Module, images: np.ndarray, mags: np.ndarray, batch: int = 512) -> np.ndarray:
    """The original CAI worker's inference loop (see the module docstring)."""
    loader = DataLoader(TensorDataset(torch.from_numpy(images), torch.from_numpy(mags)), batch_size=batch,
                        shuffle=False)
    device = torch.device("cpu")
    preds = []
    model.eval()
    with profile(activities=[ProfilerActivity.CPU], profile_memory=True), torch.no_grad():
        for image, magnitude in loader:
            image, magnitude = image.to(device), magnitude.to(device)
            preds.append(model(image, magnitude).cpu().numpy())
            gc.collect()
    return np.concatenate(preds)


def gemm_gflops(threads: int, n: int = 1024, reps: int = 5) -> float:
    """Best fp32 GEMM rate (GFLOP/s) at the benchmark's thread count."""
    a, b = torch.randn(n, n), torch.randn(n, n)
    torch.mm(a, b)
    best = float("inf")
    for _ in range(reps):
        t = time.perf_counter()
        torch.mm(a, b)
        best = min(best, time.perf_counter() - t)
    return 2 * n ** 3 / best / 1e9


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--samples", type=int, default=5113)
    p.add_argument("--repeats", type=int, default=3)
    p.add_argument("--threads", type=int, default=None, help="default: every CPU this process may use")
    p.add_argument("--compile", action="store_true", help="also time both modes under torch.compile "
                   "(prints the one-off compile time each process would pay)")
    p.add_argument("--data", default=None, help="a partition URL to use (default: synthesise --samples galaxies)")
    p.add_argument("--engine", choices=("both", "onnxruntime", "torch"), default="both",
                   help="which of our engines to time (default both)")
    p.add_argument("--model", default=None, help="astromae-demo when its weights exist, else astromae-random")
    args = p.parse_args(argv)
    name = args.model or ("astromae-demo" if os.path.exists(demo_weights_path()) else "astromae-random")
    engines = ["onnxruntime", "torch"] if args.engine == "both" else [args.engine]
    predictors = {}
    for engine in engines:
        for mode in ("exact", "fast"):
            t = time.perf_counter()
            predictors[f"{mode} ({engine})"] = load_model(name, mode=mode, threads=args.threads, engine=engine)
            print(f"load {mode} ({engine}): {time.perf_counter() - t:.1f} s", flush=True)
    exact = next(iter(predictors.values()))
    threads = torch.get_num_threads()
    original = torch.nn.DataParallel(exact.module)  # the straightforward module, as pickled originally
    if args.data:
        from cosmicai.data.partition import read_partition

        part = read_partition(args.data)
        part = part.take(slice(0, min(args.samples, len(part))))
    else:
        from cosmicai.data.synth import synthesize

        part = synthesize(args.samples, seed=1, first_id=30_000_000)  # realistic galaxies, unseen in training
    images, mags = part.images, part.magnitudes
    args.samples = len(part)

    methods = {"original loop": lambda: original_loop(original, images, mags)}
    for label, pred in predictors.items():
        methods[label] = functools.partial(pred.predict, images, mags, batch_size=512)
    if args.compile:
        for mode in ("exact", "fast"):
            pred = load_model(name, mode=mode, threads=args.threads, compile=True, engine="torch")
            t = time.perf_counter()
            pred.predict(images[:512], mags[:512])
            pred.predict(images[:100], mags[:100])  # a ragged last batch compiles a second shape
            print(f"torch.compile ({mode}): {time.perf_counter() - t:.1f} s of compilation in this process")
            methods[f"{mode} (torch.compile)"] = functools.partial(pred.predict, images, mags, batch_size=512)
    outputs = {k: f() for k, f in methods.items()}  # warm-up, and a correctness check below
    times: dict[str, list[float]] = {k: [] for k in methods}
    for _ in range(args.repeats):
        for k, f in methods.items():
            t = time.perf_counter()
            f()
            times[k].append(time.perf_counter() - t)
    gemm = gemm_gflops(threads)
    flop = flops_per_image(exact.module)
    print(f"model {name}, {args.samples} samples, {threads} thread(s), median of {args.repeats}; "
          f"{flop / 1e9:.3f} GFLOP/image; fp32 GEMM {gemm:.1f} GFLOP/s")
    print("speed-up = median over repeats of (original loop time / method time) within the same repeat, which "
          "cancels the machine's slow drifts; [min-max] over repeats")
    for k in methods:
        rate = args.samples / statistics.median(times[k])
        ratios = [o / t for o, t in zip(times["original loop"], times[k])]
        diff = float(np.max(np.abs(outputs[k] - outputs["original loop"])))
        print(f"{k:21s} {rate:7.1f} samples/s  x{statistics.median(ratios):5.2f} [{min(ratios):.2f}-{max(ratios):.2f}]"
              f"  {rate * flop / 1e9:6.1f} GFLOP/s ({100 * rate * flop / 1e9 / gemm:5.1f}% of GEMM)  "
              f"max |dz| vs original {diff:.2e}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
