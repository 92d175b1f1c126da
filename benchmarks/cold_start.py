"""Cold start of a worker: a fresh process from start to its first prediction, and to the end of its first
100 MB partition, in the full install and in the worker install (``cosmicai[worker]``, no torch).

    python benchmarks/cold_start.py [--worker-python PY | --worker-venv DIR] [--full-python PY]
                                    [--modes exact fast] [--repeats 5] [--threads 2] [--partition-mb 100]
                                    [--json out.json] [--profile-out src/cosmicai/simulator/worker_profile.json]

Without ``--worker-python`` a worker venv is made (once) at ``--worker-venv`` (default /tmp/cai-worker-venv) with
``pip install '.[worker]' -c requirements/constraints.txt``. Each sample is a new process (``python -c``):

* *first prediction*: imports (``cosmicai.pipeline.infer``, which a Lambda handler or a pool worker imports) ->
  ``worker_models().get`` (weights read, graphs bound) -> the partition read and decoded -> the first batch
  (``batch_size`` rows, 512 as in a run) predicted. Times are from just before the process is spawned, so
  interpreter start-up counts.
* *partition*: the real rank task (``pipeline.infer.run_task``: fetch, decode, the fast-mode guard, inference in
  batches, the Parquet write and the rank record) for one ~100 MB partition, spawn to exit.

One unmeasured run per install and mode first (the .pyc files and the page cache warm, as in a built image).
Medians of ``--repeats`` are printed. ``--profile-out`` writes the worker profile ``cai plan`` reads
(cold start and per-galaxy seconds of the worker install in the first mode given).
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import subprocess
import sys
import tempfile
import time
from datetime import date

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))

FIRST = r"""
import json, sys, time
t = {}
from cosmicai.models.worker import worker_models
from cosmicai.data.partition import decode
from cosmicai import storage
t["imports"] = time.time()
worker_models().configure(THREADS)
predictor, _, _ = worker_models().get("astromae-demo", None, "cpu", MODE)
t["model"] = time.time()
part = decode(storage.read_bytes(PATH), PATH)
t["decode"] = time.time()
z = predictor.predict(part.images[:BATCH], part.magnitudes[:BATCH], batch_size=BATCH)
t["first"] = time.time()
t["torch_loaded"] = "torch" in sys.modules
print(json.dumps(t))
"""

PARTITION = r"""
import json, resource, sys, time
from cosmicai.models.worker import worker_models
from cosmicai.pipeline import infer
worker_models().configure(THREADS)
record = infer.run_task(RESULT, 0)
print(json.dumps({"end": time.time(), "rows": record["rows"], "phases": record["phases"],
                  "peak_rss_mb": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024,
                  "torch_loaded": "torch" in sys.modules}))
"""


def _child(python: str, code: str, env: dict[str, str]) -> tuple[float, dict]:
    t0 = time.time()
    done = subprocess.run([python, "-c", code], env=env, capture_output=True, text=True, timeout=600)
    if done.returncode != 0:
        raise SystemExit(f"{python}: child failed:\n{done.stderr[-3000:]}")
    return t0, json.loads(done.stdout.strip().splitlines()[-1])


def _substitute(code: str, **values) -> str:
    for key, value in values.items():
        code = code.replace(key, repr(value))
    return code


def _worker_python(venv: str) -> str:
    python = os.path.join(venv, "bin", "python")
    if not os.path.exists(python):
        print(f"making the worker venv {venv} (pip install '.[worker]') ...", flush=True)
        subprocess.run([sys.executable, "-m", "venv", venv], check=True)
        subprocess.run([python, "-m", "pip", "install", "-q", f"{ROOT}[worker]", "-c",
                        os.path.join(ROOT, "requirements", "constraints.txt")], check=True)
    return python


def _site_size_mb(python: str) -> float:
    code = ("import os, sysconfig; sp = sysconfig.get_paths()['purelib']; "
            "print(sum(os.path.getsize(os.path.join(d, f)) for d, _, fs in os.walk(sp) for f in fs "
            "if not os.path.islink(os.path.join(d, f))))")
    out = subprocess.run([python, "-c", code], capture_output=True, text=True, check=True).stdout
    return int(out) / 2**20


def _make_data(folder: str, partition_mb: float) -> tuple[str, int]:
    """One partition of ~``partition_mb`` MiB (the original's bytes a galaxy) of random galaxies, written by the
    dataset writer (``data.split.write_dataset``: partition + manifest); returns its path and rows."""
    import numpy as np

    from cosmicai.data.sources import Chunk
    from cosmicai.data.formats import LEGACY_SAMPLE_BYTES, Partition
    from cosmicai.data.split import partition_name, write_dataset

    rows = int(partition_mb * 2**20 // LEGACY_SAMPLE_BYTES)
    rng = np.random.default_rng(0)
    part = Partition(images=rng.gamma(2.0, 0.05, (rows, 5, 32, 32)).astype(np.float32),
                     magnitudes=rng.uniform(15, 23, (rows, 5)).astype(np.float32),
                     object_id=np.arange(rows, dtype=np.int64), redshift=rng.uniform(0, 0.4, rows).astype(np.float32))
    write_dataset([Chunk("random", 0, part, True)], folder, rows, description="cold-start benchmark")
    return os.path.join(folder, partition_name(1)), rows


def _plan(data: str, result: str, mode: str, batch: int) -> None:
    from cosmicai.config import load_config
    from cosmicai.pipeline.plan import make_plan

    make_plan(load_config({"data": data, "result": result, "mode": mode, "world_size": 1, "batch_size": batch,
                           "workers": 1})[0])


def measure(install: str, python: str, mode: str, args, path: str, data: str, tmp: str) -> dict:
    env = {k: v for k, v in os.environ.items() if k != "PYTHONPATH"}
    env.update({"OMP_NUM_THREADS": str(args.threads)})
    first = _substitute(FIRST, THREADS=args.threads, MODE=mode, PATH=path, BATCH=args.batch_size)
    samples, parts = [], []
    for i in range(args.repeats + 1):  # the first of each kind is the unmeasured warm-up
        t0, t = _child(python, first, env)
        if i:
            samples.append({"imports": t["imports"] - t0, "model": t["model"] - t["imports"],
                            "decode": t["decode"] - t["model"], "first_batch": t["first"] - t["decode"],
                            "first": t["first"] - t0, "torch_loaded": t["torch_loaded"]})
        result = os.path.join(tmp, f"result-{install}-{mode}-{i}")
        _plan(data, result, mode, args.batch_size)
        t0, r = _child(python, _substitute(PARTITION, THREADS=args.threads, RESULT=result), env)
        if i:
            parts.append({"partition": r["end"] - t0, "rows": r["rows"], "peak_rss_mb": r["peak_rss_mb"],
                          "model_load": r["phases"].get("model_load", 0.0), "torch_loaded": r["torch_loaded"]})
    med = {k: statistics.median(s[k] for s in samples) for k in ("imports", "model", "decode", "first_batch", "first")}
    med.update({k: statistics.median(p[k] for p in parts) for k in ("partition", "peak_rss_mb", "model_load")})
    med["rows"] = parts[0]["rows"]
    med["torch_loaded"] = any(s["torch_loaded"] for s in samples) or any(p["torch_loaded"] for p in parts)
    med["first_all"] = [round(s["first"], 3) for s in samples]
    return med


def recorded_command(argv: list[str]) -> str:
    """The command line as another user could rerun it: this machine's venv paths become placeholders."""
    placeholders = {"--worker-python": "PATH/TO/worker/bin/python", "--worker-venv": "PATH/TO/worker-venv"}
    words, skip = [], None
    for word in argv:
        if skip:
            words.append(skip)
            skip = None
            continue
        name, eq, _ = word.partition("=")
        if name in placeholders and eq:
            words.append(f"{name}={placeholders[name]}")
            continue
        skip = placeholders.get(word)
        words.append(word)
    return " ".join(["python benchmarks/cold_start.py", *words])


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--full-python", default=sys.executable)
    p.add_argument("--worker-python", default=None)
    p.add_argument("--worker-venv", default="/tmp/cai-worker-venv")
    p.add_argument("--modes", nargs="+", default=["exact", "fast"], choices=["exact", "fast"])
    p.add_argument("--repeats", type=int, default=5)
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--batch-size", type=int, default=512)
    p.add_argument("--partition-mb", type=float, default=100)
    p.add_argument("--json", default=None)
    p.add_argument("--profile-out", default=None)
    a = p.parse_args(argv)
    installs = {"full": a.full_python, "worker": a.worker_python or _worker_python(a.worker_venv)}
    results: dict[str, dict] = {}
    with tempfile.TemporaryDirectory(prefix="cai-cold-") as tmp:
        data = os.path.join(tmp, "data")
        os.makedirs(data)
        path, rows = _make_data(data, a.partition_mb)
        print(f"partition: {rows} galaxies, {os.path.getsize(path) / 2**20:.1f} MiB; {a.threads} threads, batch "
              f"{a.batch_size}, {a.repeats} runs each (medians, seconds from process spawn)\n")
        print(f"{'install':7} {'mode':5} {'size MiB':>8} {'imports':>7} {'model':>6} {'decode':>6} {'batch 1':>7} "
              f"{'FIRST':>6} {'partition':>9} {'gal/s':>6} {'RSS MB':>6} torch")
        for install, python in installs.items():
            size = _site_size_mb(python)
            for mode in a.modes:
                m = measure(install, python, mode, a, path, data, tmp)
                m["site_packages_mib"] = size
                results[f"{install}-{mode}"] = m
                print(f"{install:7} {mode:5} {size:8.0f} {m['imports']:7.2f} {m['model']:6.2f} {m['decode']:6.2f} "
                      f"{m['first_batch']:7.2f} {m['first']:6.2f} {m['partition']:9.2f} "
                      f"{m['rows'] / m['partition']:6.0f} {m['peak_rss_mb']:6.0f} {'yes' if m['torch_loaded'] else 'no'}",
                      flush=True)
    for mode in a.modes:
        f, w = results[f"full-{mode}"], results[f"worker-{mode}"]
        print(f"\n{mode}: worker / full: first prediction {w['first'] / f['first']:.2f}x, "
              f"partition {w['partition'] / f['partition']:.2f}x, install {w['site_packages_mib'] / f['site_packages_mib']:.2f}x")
    if a.json:
        with open(a.json, "w") as fh:
            json.dump(results, fh, indent=1)
    if a.profile_out:
        mode = a.modes[0]
        w = results[f"worker-{mode}"]
        after_first = max(1, w["rows"] - a.batch_size)  # the first batch is in cold_start_s already
        profile = {
            "schema": "cosmicai.worker-profile/1", "install": "worker", "engine": "onnxruntime", "mode": mode,
            "threads": a.threads, "cold_start_s": round(w["first"], 3), "import_s": round(w["imports"], 3),
            "model_load_s": round(w["model"], 3), "first_batch_s": round(w["first_batch"], 3),
            "per_galaxy_s": round(max(w["partition"] - w["first"], 1e-6) / after_first, 7),
            "partition_mb": a.partition_mb, "galaxies": w["rows"], "partition_s": round(w["partition"], 3),
            "peak_rss_mb": round(w["peak_rss_mb"]),
            "machine": {"cpus": os.cpu_count(), "cpu": _cpu_model(), "python": platform.python_version()},
            "measured_with": recorded_command(argv if argv is not None else sys.argv[1:]),
            "date": date.today().isoformat()}
        with open(a.profile_out, "w") as fh:
            json.dump(profile, fh, indent=1)
            fh.write("\n")
        print(f"wrote {a.profile_out}")
    return 0


def _cpu_model() -> str:
    try:
        with open("/proc/cpuinfo") as fh:
            return next((line.split(":", 1)[1].strip() for line in fh if line.startswith("model name")), "")
    except OSError:
        return platform.processor()


if __name__ == "__main__":
    sys.exit(main())
