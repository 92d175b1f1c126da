"""Runner overhead: the same run on each runner of the registry that runs here, against the local backend run
alongside, in one process on one machine.

A run is plan + infer over ``--ranks`` ranks (one partition of ``--rows`` galaxies each) + summarize, with
``--workers`` workers of 1 thread each. Each runner gets a fresh result folder per repeat; the first repeat warms
caches and is not reported. The ratio is each runner's median wall time over the local backend's. The extra
time of a runner, spread over its task slots, is printed per task (``(wall - local wall) * workers / ranks``).

    python benchmarks/runner_overhead.py [--runners local,lithops,dask] [--ranks 20] [--rows 100] [--workers 2]
                                         [--repeats 3] [--model astromae-demo]
"""

from __future__ import annotations

import argparse
import os
import shutil
import statistics
import tempfile
import time

from pipeline_overhead import make_dataset

from cosmicai.pipeline.infer import _cpu_model as cpu_name


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--runners", default="local,lithops")
    ap.add_argument("--ranks", type=int, default=20)
    ap.add_argument("--rows", type=int, default=100)
    ap.add_argument("--workers", type=int, default=2)
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--model", default="astromae-demo")
    args = ap.parse_args()

    import cosmicai

    names = ["local"] + [n for n in args.runners.split(",") if n and n != "local"]
    tmp = tempfile.mkdtemp(prefix="cai-runner-overhead-")
    walls: dict[str, list[float]] = {n: [] for n in names}
    maps: dict[str, list[float]] = {n: [] for n in names}
    try:
        data = os.path.join(tmp, "data")
        os.makedirs(data)
        make_dataset(data, args.ranks * args.rows, args.ranks)
        for repeat in range(args.repeats + 1):
            for name in names:
                result = os.path.join(tmp, f"{name}-{repeat}")
                t0 = time.perf_counter()
                out = cosmicai.run(data, result, backend=name, model=args.model, workers=args.workers, threads=1,
                                   world_size=args.ranks, batch_size=args.rows)
                wall = time.perf_counter() - t0
                assert out.complete and out.summary["completeness"]["rows_out"] == args.ranks * args.rows
                if repeat:
                    walls[name].append(wall)
                    maps[name].append(out.summary["stages"]["map_s"])
                shutil.rmtree(result)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    base = statistics.median(walls["local"])
    print(f"cpu {cpu_name()}, {os.cpu_count()} cores; {args.ranks} ranks x {args.rows} rows, {args.workers} workers "
          f"x 1 thread, {args.model}, median of {args.repeats}")
    print(f"{'runner':8} {'wall s':>8} {'map s':>8} {'ratio':>7} {'extra s/task':>13}")
    for name in names:
        wall, map_s = statistics.median(walls[name]), statistics.median(maps[name])
        extra = (wall - base) * args.workers / args.ranks
        print(f"{name:8} {wall:8.2f} {map_s:8.2f} {wall / base:7.2f} {extra:13.2f}")


if __name__ == "__main__":
    main()
