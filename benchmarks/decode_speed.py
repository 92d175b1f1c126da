"""Decode speed of one 100 MB partition (5,113 samples): native safetensors vs the original .pt.

    nice -n 10 python benchmarks/decode_speed.py [--rows 5113] [--repeat 7]

Each path must end with validated arrays ready for the model, every image value having been read:
  native/bytes   formats.decode_partition on bytes already in memory (as after an S3 GET): zero-copy views,
                 the finiteness check reads every value
  native/mmap    partition.read_partition on a local file: memory map + the same check (reads every page)
  legacy/torch   torch.load(weights_only=True) of the original TensorDataset .pt, bytes in memory (copies all)
  legacy/cai     cosmicai's legacy reader (the same, plus the global scan, checks and float32 magnitudes)
Times are the best of --repeat; the "+sum" column adds a float64 sum over the images (an explicit touch).
Prints each path's speed-up over legacy/torch (the original's decode). Target: native >= 5x.
"""

from __future__ import annotations

import argparse
import io
import os
import tempfile
import time

import numpy as np


def best_of(repeat: int, fn) -> float:
    times = []
    for _ in range(repeat):
        t0 = time.perf_counter()
        fn()
        times.append(time.perf_counter() - t0)
    return min(times)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--rows", type=int, default=5113, help="samples in the partition (5,113 = original 100 MB)")
    ap.add_argument("--repeat", type=int, default=7)
    args = ap.parse_args()

    import torch
    from torch.utils.data import TensorDataset

    from cosmicai.data.formats import Partition, decode_partition, encode_partition
    from cosmicai.data.legacy import read_legacy_pt, write_legacy_pt
    from cosmicai.data.partition import read_partition

    torch.set_num_threads(1)
    rng = np.random.default_rng(0)
    n = args.rows
    part = Partition(rng.random((n, 5, 32, 32), dtype=np.float32), rng.uniform(14, 24, (n, 5)).astype(np.float32),
                     np.arange(n, dtype=np.int64), rng.uniform(0, 0.4, n).astype(np.float32))
    native = encode_partition(part)
    legacy = write_legacy_pt(part)
    expect = float(part.images.sum(dtype=np.float64))
    print(f"partition: {n} samples; native {len(native) / 2**20:.1f} MiB, legacy .pt {len(legacy) / 2**20:.1f} MiB")

    def touch(images) -> None:
        got = float(np.asarray(images).sum(dtype=np.float64))
        assert abs(got - expect) < 1e-6 * abs(expect), (got, expect)

    with tempfile.TemporaryDirectory() as tmp:
        path = os.path.join(tmp, "part-000001.safetensors")
        with open(path, "wb") as fh:
            fh.write(native)

        paths = {
            "native/bytes": lambda: decode_partition(native).images,
            "native/mmap": lambda: read_partition(path).images,
            "legacy/torch": lambda: torch_images(),
            "legacy/cai": lambda: read_legacy_pt(legacy).images,
        }

        def torch_images():
            with torch.serialization.safe_globals([TensorDataset]):
                return torch.load(io.BytesIO(legacy), weights_only=True).tensors[0].numpy()

        plain = {name: best_of(args.repeat, fn) for name, fn in paths.items()}
        summed = {name: best_of(args.repeat, lambda fn=fn: touch(fn())) for name, fn in paths.items()}
    base, base_sum = plain["legacy/torch"], summed["legacy/torch"]
    print(f"{'path':13s} {'decode':>9s} {'speed-up':>9s} {'+sum':>9s} {'speed-up':>9s}")
    for name in paths:
        print(f"{name:13s} {plain[name] * 1000:7.1f}ms {base / plain[name]:8.1f}x "
              f"{summed[name] * 1000:7.1f}ms {base_sum / summed[name]:8.1f}x")
    worst = min(base / plain["native/bytes"], base / plain["native/mmap"])
    print(f"native decode speed-up over the original .pt decode: {worst:.1f}x (target >= 5x): "
          f"{'PASS' if worst >= 5 else 'BELOW TARGET'}")


if __name__ == "__main__":
    main()
