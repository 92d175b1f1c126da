"""Calibrate the Distributed Map simulator on the published CAI runs and report predicted vs published.

What is compared (see docs/simulator.md):

* ``total_execution_time.csv`` - the Step Functions execution's total duration, per (partition MB,
  data GB) cell, mean of its runs, against the simulated ``total_s`` (Initialize + Map + Summarize);
* ``state_machine_logs.csv`` - per cell, the mean ``inference_duration`` (the Distributed Map state)
  against the simulated ``map_s``, and the mean ``total_duration`` against ``total_s``.

The per-rank records (``result-partition-*/**/combined_data.json``) give the fixed shape parameters:
the lognormal jitter of task durations and the straggler rate and factor. The free parameters (launch
rate, cold start, seconds per sample, the Initialize/Summarize base times and Summarize's per-rank cost)
are fitted by a coordinate search in log space minimising the mean absolute log error (numpy only).

Run ``python -m cosmicai.simulator.calibrate`` to print the table for the stored defaults, ``--fit`` to
refit and print the fitted parameters.
"""

from __future__ import annotations

import argparse
import csv
import json
import math
import os
import sys
from dataclasses import dataclass
from pathlib import Path
from typing import Iterable, Sequence

import numpy as np

from ..analysis.cost import lambda_cost
from ..errors import DataError
from ..lambda_limits import MAX_MEMORY_MB
from .simulate import DEFAULT_PARAMS, MIB, Params, Workload, simulate

#: The memory of the original's published runs: Lambda's maximum.
PUBLISHED_MEMORY_MB = MAX_MEMORY_MB

GIB = 1024**3
#: Parameters the fit moves, with their (low, high) bounds.
FREE_PARAMS: dict[str, tuple[float, float]] = {
    "launch_rate": (0.2, 500.0),
    "launch_doubling_s": (1.0, 600.0),
    "launch_rate_max": (10.0, 2000.0),
    "cold_start_s": (2.0, 60.0),
    "per_sample_s": (2e-4, 0.05),
    "init_base_s": (0.1, 30.0),
    "summarize_base_s": (0.1, 30.0),
    "summarize_per_rank_s": (1e-4, 0.5),
}


@dataclass(frozen=True)
class Cell:
    """One published measurement: a (partition, data) cell's mean over its runs."""

    source: str            # "total_execution_time" or "state_machine_logs"
    metric: str            # "total" (whole execution) or "map" (the Distributed Map state)
    partition_mb: float
    data_gb: float
    ranks: int
    observed_s: float
    runs: tuple[float, ...]

    def workload(self, memory_mb: float = float(PUBLISHED_MEMORY_MB)) -> Workload:
        """The simulated workload of this cell (the original ran at 10,240 MB)."""
        return Workload(data_bytes=int(round(self.data_gb * GIB)),
                        partition_bytes=int(round(self.partition_mb * MIB)), memory_mb=memory_mb)


def reference_dir(path: str | os.PathLike | None = None) -> Path | None:
    """The published CAI results folder: ``path``, ``$CAI_REFERENCE_DIR``, or the CAI reference folder kept
    beside the checkout; None when none exists."""
    candidates = [path, os.environ.get("CAI_REFERENCE_DIR")] if path or os.environ.get("CAI_REFERENCE_DIR") \
        else [Path(__file__).resolve().parents[3].parent / "shared" / "reference" / "cai",
              Path.cwd().parent / "shared" / "reference" / "cai"]
    for cand in candidates:
        if cand and (Path(cand) / "results" / "total_execution_time.csv").is_file():
            return Path(cand)
    if path:
        raise DataError(f"{path}: not a CAI reference folder (no results/total_execution_time.csv)")
    return None


def _duration(text: str, where: str) -> float:
    # "mm:ss.mmm" as written by the original's notebooks
    try:
        minutes, seconds = text.strip().split(":")
        return int(minutes) * 60 + float(seconds)
    except ValueError:
        raise DataError(f"{where}: duration {text!r} is not mm:ss.mmm") from None


def _rows(path: Path) -> list[dict[str, str]]:
    if not path.is_file():
        raise DataError(f"{path}: missing")
    with open(path, newline="") as fh:
        return list(csv.DictReader(fh))


def load_cells(ref: Path) -> list[Cell]:
    """Every published cell from ``total_execution_time.csv`` and ``state_machine_logs.csv``."""
    groups: dict[tuple, list[float]] = {}
    ranks: dict[tuple, int] = {}
    path = ref / "results" / "total_execution_time.csv"
    for i, row in enumerate(_rows(path), start=2):
        try:
            key = ("total_execution_time", "total", float(row["partition(MB)"]), float(row["data(GB)"]))
            ranks[key] = int(float(row["num_worlds"]))
        except (KeyError, ValueError) as exc:
            raise DataError(f"{path}:{i}: bad row ({exc})") from None
        groups.setdefault(key, []).append(_duration(row["duration"], f"{path}:{i}"))
    path = ref / "results" / "state_machine_logs.csv"
    if path.is_file():
        for i, row in enumerate(_rows(path), start=2):
            try:
                part, data = float(row["partition (MB)"]), float(row["data (GB)"])
                for metric, col in (("map", "inference_duration (s)"), ("total", "total_duration (s)")):
                    key = ("state_machine_logs", metric, part, data)
                    ranks[key] = int(row["num_worlds"])
                    groups.setdefault(key, []).append(float(row[col]))
            except (KeyError, ValueError) as exc:
                raise DataError(f"{path}:{i}: bad row ({exc})") from None
    return [Cell(src, metric, part, data, ranks[(src, metric, part, data)], float(np.mean(v)), tuple(v))
            for (src, metric, part, data), v in sorted(groups.items())]


def load_records(ref: Path) -> dict[float, list[list[dict]]]:
    """Per-rank records of the main runs (not the batch-size sweeps), by partition MB: a list per run."""
    out: dict[float, list[list[dict]]] = {}
    for path in sorted(ref.glob("result-partition-*MB/*/*/combined_data.json")):
        part = float(path.parts[-4].split("-")[-1].removesuffix("MB"))
        try:
            records = json.loads(path.read_text())
        except json.JSONDecodeError as exc:
            raise DataError(f"{path}: not JSON ({exc})") from None
        if not isinstance(records, list):
            raise DataError(f"{path}: expected a list of per-rank records")
        out.setdefault(part, []).append(records)
    return out


def record_shape(records_by_part: dict[float, list[list[dict]]]) -> dict[str, float]:
    """Jitter sigma, straggler rate/factor and seconds per sample from the per-rank records.

    Each run's task times are divided by the run's median (so partition size and run-to-run drift
    cancel). Sigma = IQR(log ratio) / 1.349 of the bulk; a straggler is a task above twice its run's
    median, and the factor is the median ratio of those. Seconds per sample = median of
    ``total_cpu_time (seconds)`` / samples over full partitions (as recorded; see docs/simulator.md).
    """
    ratios, per_sample = [], []
    for runs in records_by_part.values():
        for records in runs:
            t = np.array([float(r["total_cpu_time (seconds)"]) for r in records])
            sps = np.array([float(r["sample_persec"]) for r in records])
            samples = t * sps
            full = samples >= 0.9 * samples.max()
            ratios.append(t[full] / np.median(t[full]))
            per_sample.extend(1.0 / sps[full])
    r = np.concatenate(ratios)
    slow = r > 2.0
    q25, q75 = np.percentile(np.log(r[~slow]), [25, 75])
    return {"jitter_sigma": float((q75 - q25) / 1.349), "straggler_prob": float(slow.mean()),
            "straggler_factor": float(np.median(r[slow])) if slow.any() else 1.0,
            "per_sample_s": float(np.median(per_sample)), "tasks": int(r.size)}


@dataclass(frozen=True)
class Row:
    """One line of the validation table."""

    cell: Cell
    predicted_s: float

    @property
    def error(self) -> float:
        """Signed relative error of the prediction."""
        return self.predicted_s / self.cell.observed_s - 1.0


def predict(cells: Sequence[Cell], params: Params, seeds: Sequence[int] = (0, 1, 2)) -> list[Row]:
    """Simulated value of each cell's metric, the mean over ``seeds`` (one run per workload and seed)."""
    cache: dict[tuple, tuple[float, float]] = {}
    rows = []
    for cell in cells:
        key = (cell.partition_mb, cell.data_gb)
        if key not in cache:
            sims = [simulate(cell.workload(), params, seed=s, keep_timeline=False) for s in seeds]
            cache[key] = (float(np.mean([r.map_s for r in sims])), float(np.mean([r.total_s for r in sims])))
        map_s, total_s = cache[key]
        rows.append(Row(cell, map_s if cell.metric == "map" else total_s))
    return rows


def median_ape(rows: Iterable[Row]) -> float:
    """Median absolute percentage error (as a fraction)."""
    return float(np.median([abs(r.error) for r in rows]))


def _loss(rows: Sequence[Row]) -> float:
    return float(np.mean([abs(math.log(r.predicted_s / r.cell.observed_s)) for r in rows]))


def fit(cells: Sequence[Cell], start: Params = DEFAULT_PARAMS, free: Sequence[str] = tuple(FREE_PARAMS),
        rounds: int = 8, seeds: Sequence[int] = (0, 1, 2), verbose: bool = False) -> tuple[Params, float]:
    """Coordinate search in log space over the ``free`` parameters, each within its FREE_PARAMS bounds:
    move a parameter by the step factor while the loss falls, halve the step (in log) when no move
    helps. Returns (params, mean |log error|)."""
    params = start.with_(**{n: min(FREE_PARAMS[n][1], max(FREE_PARAMS[n][0], getattr(start, n))) for n in free})
    best = _loss(predict(cells, params, seeds))
    step = math.log(2.0)
    for rnd in range(rounds):
        improved = False
        for name in free:
            lo, hi = FREE_PARAMS[name]
            for direction in (1.0, -1.0):
                while True:
                    value = min(hi, max(lo, getattr(params, name) * math.exp(direction * step)))
                    if value == getattr(params, name):
                        break
                    trial = params.with_(**{name: value})
                    loss = _loss(predict(cells, trial, seeds))
                    if loss < best - 1e-9:
                        params, best, improved = trial, loss, True
                    else:
                        break
        if verbose:
            print(f"round {rnd + 1}: step x{math.exp(step):.3f}, mean |log error| {best:.4f}", file=sys.stderr)
        if not improved:
            step /= 2.0
    return params, best


def format_table(rows: Sequence[Row]) -> str:
    """The predicted vs published table, one line per cell, with the median error."""
    lines = [f"{'source':<21} {'metric':<6} {'part MB':>7} {'data GB':>8} {'ranks':>6} "
             f"{'published s':>11} {'runs':>20} {'predicted s':>11} {'error':>7}"]
    for r in rows:
        c = r.cell
        runs = ",".join(f"{v:.0f}" for v in c.runs)
        lines.append(f"{c.source:<21} {c.metric:<6} {c.partition_mb:>7g} {c.data_gb:>8g} {c.ranks:>6} "
                     f"{c.observed_s:>11.1f} {runs:>20} {r.predicted_s:>11.1f} {r.error:>+7.1%}")
    errs = [abs(r.error) for r in rows]
    lines.append(f"cells: {len(rows)}  median |error|: {median_ape(rows):.1%}  mean |error|: "
                 f"{np.mean(errs):.1%}  within 20%: {sum(e <= 0.2 for e in errs)}/{len(errs)}")
    return "\n".join(lines)


#: The original's headline run as published: 12.6 GB (659,817 galaxies) on 517 Lambdas at 10,240 MB in 28 s.
PAPER_RUNS: tuple[dict, ...] = ({"data_gb": 12.6, "seconds": 28.0, "ranks": 517, "partition_mb": 25.0,
                                 "memory_mb": PUBLISHED_MEMORY_MB},)


def _record_dir(ref: Path, partition_mb: float, data_gb: float) -> Path | None:
    name = {12.6: "total", 1000.0: "total1000GB"}.get(data_gb)
    if name is None and float(data_gb).is_integer() and data_gb <= 10:
        name = f"{int(data_gb)}GB"
    folder = ref / f"result-partition-{partition_mb:g}MB" / str(name)
    return folder if name and folder.is_dir() else None


def _record_cost(ref: Path | None, partition_mb: float, data_gb: float, ranks: int, arch: str) -> dict | None:
    """Cost of a published cell: ranks x the mean recorded task seconds (mean over runs) at 10,240 MB."""
    folder = _record_dir(ref, partition_mb, data_gb) if ref else None
    if folder is None:
        return None
    means = []
    for path in sorted(folder.glob("*/combined_data.json")):
        records = json.loads(path.read_text())
        means.append(float(np.mean([float(r["total_cpu_time (seconds)"]) for r in records])))
    if not means:
        return None
    mean_s = float(np.mean(means))
    cost = lambda_cost(ranks, mean_s, PUBLISHED_MEMORY_MB, arch=arch)
    return {"usd": cost["total"], "mean_task_s": mean_s, "records": str(folder)}


def published_figures(data_bytes: int, reference: str | None = None, arch: str = "x86_64") -> list[dict]:
    """The published figures for the published data size closest to ``data_bytes`` (within 3%, so
    ``1TB`` finds the 1000 GB runs): the paper's headline run and the reference CSV cells, each with its
    cost estimated from the per-rank records where they exist."""
    data_gb = data_bytes / GIB
    ref = reference_dir(reference)
    cells = load_cells(ref) if ref is not None else []
    sizes = {run["data_gb"] for run in PAPER_RUNS} | {c.data_gb for c in cells}
    nearest = min(sizes, key=lambda g: abs(g - data_gb))
    if abs(nearest - data_gb) > 0.03 * nearest:
        return []
    out = []
    for run in PAPER_RUNS:
        if run["data_gb"] == nearest:
            cost = _record_cost(ref, run["partition_mb"], run["data_gb"], run["ranks"], arch)
            out.append({"source": "paper", "metric": "inference", **run, "cost": cost})
    for cell in cells:
        if cell.data_gb == nearest:
            out.append({"source": cell.source, "metric": cell.metric, "data_gb": cell.data_gb,
                        "seconds": cell.observed_s, "runs": list(cell.runs), "ranks": cell.ranks,
                        "partition_mb": cell.partition_mb, "memory_mb": PUBLISHED_MEMORY_MB,
                        "cost": _record_cost(ref, cell.partition_mb, cell.data_gb, cell.ranks, arch)})
    return out


def format_published(figures: Sequence[dict]) -> str:
    """One line per published figure."""
    lines = []
    for f in figures:
        cost = f.get("cost")
        cost_text = (f"; cost ~${cost['usd']:.3f} ({f['ranks']} x mean recorded {cost['mean_task_s']:.1f} s)"
                     if cost else "; cost: no per-rank records")
        runs = f" (runs {', '.join(f'{v:.1f}' for v in f['runs'])})" if f.get("runs") else ""
        lines.append(f"published [{f['source']}, {f['metric']}]: {f['data_gb']:g} GB, {f['partition_mb']:g} MB "
                     f"partitions, {f['ranks']} ranks at {f['memory_mb']} MB: {f['seconds']:.1f} s{runs}{cost_text}")
    return "\n".join(lines)


def main(argv: Sequence[str] | None = None) -> int:
    """``python -m cosmicai.simulator.calibrate [--reference DIR] [--fit] [--seed N]``."""
    ap = argparse.ArgumentParser(prog="python -m cosmicai.simulator.calibrate", description=__doc__.split("\n")[0])
    ap.add_argument("--reference", help="the published CAI results folder (default $CAI_REFERENCE_DIR)")
    ap.add_argument("--fit", action="store_true", help="refit the free parameters before printing")
    ap.add_argument("--seeds", type=int, default=3, help="simulations averaged per cell (seeds 0..N-1)")
    args = ap.parse_args(argv)
    return run_calibration(args.reference, do_fit=args.fit, seeds=tuple(range(max(1, args.seeds))))


def run_calibration(reference: str | None = None, do_fit: bool = False, seeds: Sequence[int] = (0, 1, 2),
                    out=sys.stdout) -> int:
    """Print the validation table (after an optional refit); exit code 0, or 2 when no reference."""
    ref = reference_dir(reference)
    if ref is None:
        print("calibrate: the published CAI results folder was not found (set $CAI_REFERENCE_DIR or give "
              "--reference DIR)", file=sys.stderr)
        return 2
    cells = load_cells(ref)
    params = DEFAULT_PARAMS
    shape = record_shape(load_records(ref))
    print(f"per-rank records: {shape['tasks']} tasks; jitter sigma {shape['jitter_sigma']:.3f}, "
          f"stragglers {shape['straggler_prob']:.1%} at x{shape['straggler_factor']:.2f}, recorded "
          f"{shape['per_sample_s'] * 1e3:.2f} ms/sample", file=out)
    if do_fit:
        start = params.with_(jitter_sigma=shape["jitter_sigma"], straggler_prob=shape["straggler_prob"],
                             straggler_factor=shape["straggler_factor"])
        params, loss = fit(cells, start, seeds=seeds, verbose=True)
        print("fitted: " + ", ".join(f"{k}={getattr(params, k):.6g}" for k in
                                     ("jitter_sigma", "straggler_prob", "straggler_factor", *FREE_PARAMS)),
              file=out)
    print(format_table(predict(cells, params, seeds)), file=out)
    return 0


if __name__ == "__main__":
    sys.exit(main())
