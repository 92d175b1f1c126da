"""Pipeline overhead: whole-pipeline wall time vs pure model compute on the same data and model.

The pipeline run is plan + infer (local backend, 1 in-process worker with every thread) + summarize, reading
native partitions from a temp folder and writing every output. The baseline is ``predictor.predict`` on the
same arrays already in memory. The model is loaded (and cached) before either is timed, so both measure
steady-state work; the one-off model load is printed separately. Target: ratio <= 1.15.

    python benchmarks/pipeline_overhead.py [--galaxies 1024] [--partitions 4] [--world-size N] [--repeats 2]
                                           [--model astromae-random]
"""

from __future__ import annotations

import argparse
import os
import shutil
import tempfile
import time

import numpy as np


def make_dataset(folder: str, n: int, parts: int, seed: int = 0) -> tuple[np.ndarray, np.ndarray]:
    """Random-but-valid galaxies as ``parts`` native partitions + manifest; returns the in-memory arrays."""
    from cosmicai.data.formats import Manifest, Partition, PartitionEntry, encode_partition, sha256_hex, write_manifest

    rng = np.random.default_rng(seed)
    images = rng.random((n, 5, 32, 32), dtype=np.float32)
    mags = rng.uniform(15, 24, (n, 5)).astype(np.float32)
    z = rng.uniform(0, 0.4, n).astype(np.float32)
    entries, bounds = [], np.linspace(0, n, parts + 1).astype(int)
    for i, (a, b) in enumerate(zip(bounds[:-1], bounds[1:])):
        data = encode_partition(Partition(images[a:b], mags[a:b], np.arange(a, b, dtype=np.int64), z[a:b]))
        name = f"part-{i + 1:06d}.safetensors"
        with open(os.path.join(folder, name), "wb") as fh:
            fh.write(data)
        entries.append(PartitionEntry(name, int(b - a), len(data), sha256_hex(data), int(a)))
    write_manifest(folder, Manifest(partitions=entries, description="pipeline_overhead benchmark"))
    return images, mags


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--galaxies", type=int, default=1024)
    ap.add_argument("--partitions", type=int, default=4)
    ap.add_argument("--batch-size", type=int, default=256)
    ap.add_argument("--repeats", type=int, default=2)
    ap.add_argument("--model", default="astromae-random")
    ap.add_argument("--mode", default="exact")
    ap.add_argument("--threads", type=int, default=None, help="torch threads (default: every core)")
    ap.add_argument("--world-size", type=int, default=None, help="ranks (default: one per partition)")
    args = ap.parse_args()

    import torch

    from cosmicai.backends.local import LocalBackend
    from cosmicai.config import RunConfig
    from cosmicai.models.worker import worker_models
    from cosmicai.runners.pipeline import run

    threads = args.threads or os.cpu_count() or 1
    tmp = tempfile.mkdtemp(prefix="cai-overhead-")
    try:
        data = os.path.join(tmp, "data")
        os.makedirs(data)
        images, mags = make_dataset(data, args.galaxies, args.partitions)
        worker_models().configure(threads)
        t0 = time.perf_counter()
        predictor, _, _ = worker_models().get(args.model, None, "cpu", args.mode)
        load_s = time.perf_counter() - t0
        predictor.predict(images[:args.batch_size], mags[:args.batch_size], batch_size=args.batch_size)  # warm-up

        compute, pipeline = [], []
        for rep in range(args.repeats):
            t0 = time.perf_counter()
            predictor.predict(images, mags, batch_size=args.batch_size)
            compute.append(time.perf_counter() - t0)

            config = RunConfig(data=data, result=os.path.join(tmp, f"result-{rep}"), model=args.model,
                               mode=args.mode, batch_size=args.batch_size, workers=1, threads=threads,
                               world_size=args.world_size)
            t0 = time.perf_counter()
            summary = run(config, backend=LocalBackend(workers=1, threads=threads), progress=False, report=False)
            pipeline.append(time.perf_counter() - t0)
            assert summary["completeness"]["complete"] and summary["rows"] == args.galaxies
        best_c, best_p = min(compute), min(pipeline)
        print(f"model {args.model} ({args.mode}), {args.galaxies} galaxies in {args.partitions} partitions, "
              f"batch {args.batch_size}, torch threads {torch.get_num_threads()}, repeats {args.repeats}")
        print(f"model load (once, excluded from both): {load_s:.2f} s")
        print(f"pure model compute : {best_c:.3f} s  ({args.galaxies / best_c:.1f} galaxies/s)   runs {compute}")
        print(f"whole pipeline     : {best_p:.3f} s  ({args.galaxies / best_p:.1f} galaxies/s)   runs {pipeline}")
        phases = summary["phases_total_s"]
        print("pipeline phases (s): " + ", ".join(f"{k} {v:.3f}" for k, v in phases.items())
              + f"; plan {summary['stages']['plan_s']:.3f}, summarize {summary['stages']['summarize_s']:.3f}")
        ratio = best_p / best_c
        other = pipeline[-1] - phases["inference"]
        print(f"pipeline time outside model inference (last run): {other:.3f} s "
              f"= {other / best_c:.1%} of pure compute")
        print(f"overhead ratio (pipeline / compute): {ratio:.3f}x  (target <= 1.15x: {'OK' if ratio <= 1.15 else 'MISSED'})")
    finally:
        shutil.rmtree(tmp, ignore_errors=True)


if __name__ == "__main__":
    main()
