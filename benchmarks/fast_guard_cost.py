"""What the fast-mode check costs per worker process on the demo model, measured vs shared once per run.

Each worker is a fresh spawned process that loads the fast model (not counted: every fast run pays it), then:

* ``measured``: loads the exact model and predicts the calibration rows both ways (what every worker process
  paid before the check was shared);
* ``shared``: :func:`cosmicai.models.guard.shared_calibrate` with the run's result folder, after one process of
  the run has measured: the process reads ``fast_check/<key>.json`` instead.

Usage: ``python benchmarks/fast_guard_cost.py [--workers 2] [--threads 1] [--rows 256]``. Prints a Markdown table
of seconds per worker process and the CPU it ran on.
"""

from __future__ import annotations

import argparse
import os
import statistics
import tempfile
import time

from cosmicai.pipeline.infer import _cpu_model


def _worker(job: tuple[str, str, int, str]) -> dict:
    """One worker process: load fast, then run the check the way ``how`` says; returns its timings."""
    how, data_path, threads, result = job
    import numpy as np

    from cosmicai.models.guard import calibrate, shared_calibrate, shared_key
    from cosmicai.models.registry import weights_sha256
    from cosmicai.models.worker import worker_models

    worker_models().configure(threads)
    get_model = worker_models().get
    arrays = np.load(data_path)
    images, mags = arrays["images"], arrays["magnitudes"]
    fast, _, fast_load = get_model("astromae-demo", None, "cpu", "fast")

    def measure():
        exact, _, exact_load = get_model("astromae-demo", None, "cpu", "exact")
        return calibrate(fast, exact, images, mags, policy="fallback", sample="bench", load_seconds=exact_load)

    t0 = time.perf_counter()
    if how == "measured":
        check, reused = measure(), False
    else:
        key = shared_key("astromae-demo", weights_sha256("astromae-demo", None), fast.engine, "cpu", data_path)
        check, reused = shared_calibrate(result, key, "fallback", measure)
    return {"how": how, "seconds": time.perf_counter() - t0, "reused": reused, "mode_used": check.mode_used,
            "max_dz": check.max_dz, "fast_load": fast_load, "pid": os.getpid()}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--workers", type=int, default=2, help="worker processes per wave (default 2)")
    ap.add_argument("--threads", type=int, default=1, help="compute threads per worker process (default 1)")
    ap.add_argument("--rows", type=int, default=256, help="calibration rows (default 256, the guard's)")
    args = ap.parse_args()

    import numpy as np

    from cosmicai.processes import spawn_context
    from cosmicai.data.synth import synthesize

    with tempfile.TemporaryDirectory() as tmp:
        part = synthesize(args.rows, seed=7, workers=1)
        data_path = os.path.join(tmp, "calibration.npz")
        np.savez(data_path, images=part.images, magnitudes=part.magnitudes)
        result = os.path.join(tmp, "result")
        rows = []
        for wave, how in (("before", "measured"), ("after: first process of the run", "shared"),
                          ("after: every later process", "shared")):
            workers = 1 if wave.startswith("after: first") else args.workers
            with spawn_context(hide_main=False).Pool(workers) as pool:  # fresh processes: nothing cached between waves
                out = pool.map(_worker, [(how, data_path, args.threads, result)] * workers)
            rows.append((wave, out))
    print(f"CPU: {_cpu_model()} ({os.cpu_count()} cores); {args.workers} worker process(es) x {args.threads} thread(s); "
          f"{args.rows} calibration rows; demo weights")
    print("| check | processes | seconds per process (mean, max) | reused | mode used | max dz |")
    print("|---|---|---|---|---|---|")
    for wave, out in rows:
        secs = [o["seconds"] for o in out]
        print(f"| {wave} | {len(out)} | {statistics.mean(secs):.2f}, {max(secs):.2f} | "
              f"{sum(o['reused'] for o in out)}/{len(out)} | {out[0]['mode_used']} | {out[0]['max_dz']:.1e} |")


if __name__ == "__main__":
    main()
