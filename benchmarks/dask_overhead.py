"""Per-task scheduling overhead of the Dask backend against the local process pool, on many tiny tasks.

Two workloads on each backend (same worker count, 1 torch thread per worker):

* ``noop``: a function that returns at once (pure scheduling + transport cost);
* ``run_task``: the real pipeline task over ``--partitions`` partitions of ``--rows`` rows each, one per rank.

Overhead per task = (map wall x workers - time spent inside the tasks) / tasks, i.e. the worker-slot time each
task costs beyond its own work; for ``run_task`` the inside time is the records' wall seconds.
Backend start-up (process spawn and a warm-up map) is measured separately and excluded. Usage:

    python benchmarks/dask_overhead.py [--partitions 200] [--rows 2] [--workers 2]
"""

from __future__ import annotations

import argparse
import os
import tempfile
import time

import numpy as np


def noop(result_url: str, rank: int) -> dict:
    """A task that does nothing: the whole cost is the backend's."""
    return {"rank": rank, "total_cpu_time (seconds)": 0.0}


def make_dataset(folder: str, partitions: int, rows: int) -> None:
    """``partitions`` native partitions of ``rows`` random galaxies each, plus the manifest."""
    from cosmicai.data.formats import Manifest, Partition, PartitionEntry, encode_partition, sha256_hex, write_manifest

    os.makedirs(folder, exist_ok=True)
    rng = np.random.default_rng(0)
    entries = []
    for i in range(partitions):
        part = Partition(images=rng.random((rows, 5, 32, 32), dtype=np.float32),
                         magnitudes=rng.uniform(15, 24, (rows, 5)).astype(np.float32),
                         object_id=np.arange(i * rows, (i + 1) * rows, dtype=np.int64),
                         redshift=rng.uniform(0, 0.4, rows).astype(np.float32))
        data = encode_partition(part)
        name = f"part-{i + 1:06d}.safetensors"
        with open(os.path.join(folder, name), "wb") as fh:
            fh.write(data)
        entries.append(PartitionEntry(name=name, rows=rows, bytes=len(data), sha256=sha256_hex(data),
                                      first_row=i * rows))
    write_manifest(folder, Manifest(partitions=entries, has_redshift=True, description="dask_overhead benchmark"))


def timed_map(backend, fn, tasks: list[dict]) -> tuple[float, float, int]:
    """(map wall seconds, seconds inside the tasks, failures)."""
    t0 = time.perf_counter()
    results = list(backend.map(fn, tasks))
    wall = time.perf_counter() - t0
    failed = [r for _, r in results if isinstance(r, BaseException)]
    if failed:
        raise SystemExit(f"{len(failed)} task(s) failed, first: {failed[0]!r}")
    assert len(results) == len(tasks), "a backend lost tasks"
    inside = sum(float(r.get("total_cpu_time (seconds)", 0.0)) for _, r in results)
    return wall, inside, len(results)


def measure(name: str, backend, workers: int, work: dict[str, list[dict]]) -> dict[str, float]:
    from cosmicai.pipeline.infer import run_task

    out: dict[str, float] = {}
    for label, fn in (("noop", noop), ("run_task", run_task)):
        wall, inside, n = timed_map(backend, fn, work[label])
        out[label] = 1000 * (wall * workers - inside) / n
        out[label + "_wall"] = wall
    return out


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--partitions", type=int, default=200)
    parser.add_argument("--rows", type=int, default=2)
    parser.add_argument("--workers", type=int, default=2)
    args = parser.parse_args()

    from cosmicai.runners.registry import make_backend as get_backend
    from cosmicai.config import load_config
    from cosmicai.pipeline.plan import make_plan

    root = tempfile.mkdtemp(prefix="cai-dask-overhead-")
    data = os.path.join(root, "data")
    make_dataset(data, args.partitions, args.rows)
    results: dict[str, dict[str, float]] = {}
    for name, options in (("local", {"in_process": False}), ("dask", {"quiet": True})):
        config, _ = load_config({"data": data, "result": os.path.join(root, f"out-{name}"),
                                 "model": "astromae-random", "batch_size": args.rows, "threads": 1})
        plan = make_plan(config)
        noop_tasks = [{"result_url": "unused", "rank": r} for r in range(args.partitions)]
        work = {"warmup": noop_tasks[: 4 * args.workers], "noop": noop_tasks, "run_task": plan.task_list()}
        t0 = time.perf_counter()
        backend = get_backend(name, workers=args.workers, threads=1, **options)
        timed_map(backend, noop, work["warmup"])  # every worker process up before timing
        start = time.perf_counter() - t0
        try:
            results[name] = measure(name, backend, args.workers, work)
        finally:
            backend.close()
        results[name]["start_s"] = start

    print(f"{args.partitions} tasks ({args.partitions} partitions x {args.rows} rows), {args.workers} workers, "
          f"1 torch thread each; overhead = worker-slot ms per task beyond the task's own work")
    print(f"{'backend':8s} {'start s':>8s} {'noop ms/task':>13s} {'run_task ms/task':>17s} "
          f"{'run_task map wall s':>20s}")
    for name, r in results.items():
        print(f"{name:8s} {r['start_s']:8.2f} {r['noop']:13.2f} {r['run_task']:17.2f} {r['run_task_wall']:20.2f}")
    loc, dsk = results["local"], results["dask"]
    print(f"ratio dask/local: noop {dsk['noop'] / loc['noop']:.2f}x, run_task {dsk['run_task'] / loc['run_task']:.2f}x "
          f"overhead; run_task map wall {dsk['run_task_wall'] / loc['run_task_wall']:.2f}x")


if __name__ == "__main__":
    main()
