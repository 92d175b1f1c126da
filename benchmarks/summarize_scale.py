"""Summarize at scale: wall time and peak RSS of ``summarize`` over a format-faithful result tree.

    python benchmarks/summarize_scale.py                      # 10,240 ranks x 5,113 rows, local and S3
    python benchmarks/summarize_scale.py --ranks 2048 --where local
    python benchmarks/summarize_scale.py --dir /tmp/sumbench --keep   # build once; later runs reuse the tree

The tree is made by the pipeline's own code: ``make_plan`` writes ``plan.json`` and ``tasks.json`` for a
dataset manifest of ``--ranks`` partitions of ``--rows`` rows (one partition per rank, the default world size),
and ``infer.run_task`` writes every ``predictions/<rank>.parquet`` and ``ranks/<rank>.json``. Only the work
before the writers is replaced: the partition fetch returns synthetic arrays (no image data is materialised) and
the model returns a prepared prediction, so the files are exactly what a real run writes.

Each measurement runs ``summarize`` in a fresh subprocess and reports its wall time and its peak RSS
(``ru_maxrss`` of that child, from ``os.wait4``). ``--where s3`` serves the same folder through a local S3
server (``tests/s3server.py``: ``rclone serve s3`` on 127.0.0.1) and summarizes ``s3://bench/<tree>``.
Local reads come from the page cache after the build (the tree is about 1 GB at the default size).
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import sys
import tempfile
import time
from concurrent.futures import ProcessPoolExecutor

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
BUCKET = "bench"

_PLAN = None


def _tree_names(ranks: int, rows: int) -> tuple[str, str]:
    return f"data-{ranks}x{rows}", f"result-{ranks}x{rows}"


def _write_manifest(data_dir: str, ranks: int, rows: int) -> None:
    from cosmicai.data.formats import Manifest, PartitionEntry, write_manifest

    # Partition files are never read (the fetch is replaced), so only the manifest exists; sizes and hashes are
    # plausible values so plan.json has its real shape.
    nbytes = rows * 20_508
    entries = [PartitionEntry(name=f"part-{i + 1:06d}.safetensors", rows=rows, bytes=nbytes,
                              sha256=f"{i:064x}", first_row=i * rows) for i in range(ranks)]
    write_manifest(data_dir, Manifest(partitions=entries, has_redshift=True,
                                      description="benchmarks/summarize_scale.py (no partition files)"))


class _PreparedPredictor:
    """Returns the prediction the fake fetch stored in the magnitudes: |z| in column 0, its sign in column 1 (21 for
    negative, else 20), so every magnitude stays in the physical range (the images are a zero-stride view)."""

    def predict(self, images, magnitudes, batch_size=None):
        import numpy as np

        return np.where(magnitudes[:, 1] > 20.5, -magnitudes[:, 0], magnitudes[:, 0])


def _worker_init(result_url: str) -> None:
    """Replace the fetch and the model in this process; everything that writes stays the pipeline's."""
    import numpy as np

    from cosmicai.data.formats import Partition
    from cosmicai.models.worker import worker_models
    from cosmicai.pipeline import infer
    from cosmicai.pipeline.plan import load_plan

    global _PLAN
    _PLAN = load_plan(result_url)
    zero_images = np.zeros((1, 5, 32, 32), dtype=np.float32)

    def fake_fetch(part, allow_nonfinite):
        n = int(part["rows"])
        index = int(part["name"].split("-")[1].split(".")[0])
        rng = np.random.default_rng(index)
        z_true = rng.gamma(2.0, 0.08, n).astype(np.float32)
        z_pred = (z_true + rng.normal(0, 0.02, n) * (1 + z_true)).astype(np.float32)
        outliers = rng.random(n) < 0.01
        z_pred[outliers] = rng.uniform(0, 1, int(outliers.sum())).astype(np.float32)
        mags = rng.uniform(15, 24, (n, 5)).astype(np.float32)
        mags[:, 0] = np.abs(z_pred)
        mags[:, 1] = np.where(z_pred < 0, 21.0, 20.0)
        first = (index - 1) * n
        data = Partition(images=np.broadcast_to(zero_images, (n, 5, 32, 32)), magnitudes=mags,
                         object_id=np.arange(first, first + n, dtype=np.int64), redshift=z_true)
        return data, 0.0, 0.0

    infer._fetch = fake_fetch
    worker_models().get = lambda *a, **k: (_PreparedPredictor(), False, 0.0)
    infer.load_plan = lambda url: _PLAN


def _run_ranks(args: tuple[str, list[int]]) -> int:
    from cosmicai.pipeline import infer

    result_url, ranks = args
    for rank in ranks:
        infer.run_task(result_url, rank)
    return len(ranks)


def build(root: str, ranks: int, rows: int, jobs: int) -> str:
    """Write the dataset manifest, the plan and every rank's outputs under ``root/bench``; returns the tree path."""
    from cosmicai.config import load_config
    from cosmicai.pipeline.plan import make_plan

    data_name, tree_name = _tree_names(ranks, rows)
    data_dir = os.path.join(root, BUCKET, data_name)
    tree = os.path.join(root, BUCKET, tree_name)
    marker = os.path.join(root, f"{tree_name}.built")
    if os.path.exists(marker):
        print(f"reusing {tree}")
        return tree
    shutil.rmtree(tree, ignore_errors=True)
    os.makedirs(data_dir, exist_ok=True)
    t0 = time.perf_counter()
    _write_manifest(data_dir, ranks, rows)
    config, _ = load_config({"data": data_dir, "result": tree, "model": "astromae-demo", "batch_size": 512,
                             "workers": 1, "threads": 1})
    plan = make_plan(config)
    order = plan.ranks
    step = max(1, len(order) // (jobs * 20))
    chunks = [(tree, order[i:i + step]) for i in range(0, len(order), step)]
    done = 0
    with ProcessPoolExecutor(max_workers=jobs, initializer=_worker_init, initargs=(tree,)) as pool:
        for n in pool.map(_run_ranks, chunks):
            done += n
            if done == len(order) or done // step % 20 == 0:
                print(f"  built {done}/{len(order)} ranks", flush=True)
    print(f"built {tree}: {ranks} ranks x {rows} rows in {time.perf_counter() - t0:.0f} s")
    open(marker, "w").write(json.dumps({"ranks": ranks, "rows": rows}))
    return tree


_CHILD = r"""
import json, sys, time
t0 = time.perf_counter()
from cosmicai.pipeline.summarize import summarize
t1 = time.perf_counter()
s = summarize(sys.argv[1])
t2 = time.perf_counter()
c = s["completeness"]
print(json.dumps({"import_s": t1 - t0, "summarize_s": t2 - t1, "complete": c["complete"], "rows_out": c["rows_out"],
                  "ranks_done": c["ranks_done"], "metrics": s.get("metrics")}))
"""


def _measure_isolated(url: str) -> dict:
    """Run summarize(url) in a fresh interpreter: its wall time, what it reported, and its own peak RSS from
    ``os.wait4`` (not RUSAGE_CHILDREN, a maximum over every child this process ever had)."""
    r_out, w_out = os.pipe()
    t0 = time.perf_counter()
    pid = os.fork()
    if pid == 0:  # the child: exec a fresh interpreter running summarize
        os.close(r_out)
        os.dup2(w_out, 1)
        os.execv(sys.executable, [sys.executable, "-c", _CHILD, url])
    os.close(w_out)
    chunks = []
    while True:
        block = os.read(r_out, 65536)
        if not block:
            break
        chunks.append(block)
    os.close(r_out)
    _, status, usage = os.wait4(pid, 0)
    wall = time.perf_counter() - t0
    if os.waitstatus_to_exitcode(status) != 0:
        raise SystemExit(f"summarize of {url} failed (exit {os.waitstatus_to_exitcode(status)})")
    info = json.loads(b"".join(chunks).decode().strip().splitlines()[-1])
    info["wall_s"] = wall
    info["peak_rss_mib"] = usage.ru_maxrss / 1024  # Linux: KiB
    return info


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--ranks", type=int, default=10_240)
    ap.add_argument("--rows", type=int, default=5_113, help="rows per rank (one partition per rank)")
    ap.add_argument("--where", choices=("local", "s3", "both"), default="both")
    ap.add_argument("--dir", help="folder for the tree (default: a temporary folder, removed at the end)")
    ap.add_argument("--keep", action="store_true", help="keep the tree (with --dir, a later run reuses it)")
    ap.add_argument("--jobs", type=int, default=os.cpu_count() or 1, help="processes building the tree")
    ap.add_argument("--repeat", type=int, default=1)
    args = ap.parse_args(argv)

    root = args.dir or tempfile.mkdtemp(prefix="cai-sumbench-")
    os.makedirs(root, exist_ok=True)
    rows_total = args.ranks * args.rows
    results = []
    try:
        tree = build(root, args.ranks, args.rows, args.jobs)
        targets = []
        if args.where in ("local", "both"):
            targets.append(("local", tree))
        server = None
        if args.where in ("s3", "both"):
            sys.path.insert(0, os.path.join(REPO, "tests"))
            from s3server import S3Server

            server = S3Server(bucket=BUCKET, data_dir=root).start()
            targets.append(("s3", f"s3://{BUCKET}/{os.path.basename(tree)}"))
        try:
            for where, url in targets:
                for _ in range(args.repeat):
                    info = _measure_isolated(url)
                    if not info["complete"] or info["rows_out"] != rows_total:
                        raise SystemExit(f"{where}: summarize reported {info}")
                    results.append((where, info))
                    print(f"{where:5s} {args.ranks:6d} ranks x {args.rows} rows: wall {info['wall_s']:7.1f} s "
                          f"(summarize {info['summarize_s']:.1f} s), peak RSS {info['peak_rss_mib']:7.0f} MiB",
                          flush=True)
        finally:
            if server is not None:
                server.stop()
                server.restore_env()
    finally:
        if not args.keep:
            shutil.rmtree(root, ignore_errors=True)
    print("\n| ranks | rows/rank | where | wall s | peak RSS MiB |\n|---|---|---|---|---|")
    for where, info in results:
        print(f"| {args.ranks} | {args.rows} | {where} | {info['wall_s']:.1f} | {info['peak_rss_mib']:.0f} |")
    return 0


if __name__ == "__main__":
    sys.exit(main())
