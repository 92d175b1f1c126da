"""``cai bench``: the original's experiment grid, laid out like its result trees.

For every partition size P and data size S, ``runs`` runs at the sweep batch size go to
``ROOT/result-partition-<P>/<S>/<run>/``; for the batch-size sweep (data size ``batch_data``, default the
smallest S) every batch size b goes to ``ROOT/result-partition-<P>/<S>/Batches/<b>/<run>/``. Each run's
stage wall times are appended to ``ROOT/results/state_machine_logs.csv`` (the original's columns and place: its
``aws/stats.py`` runs unchanged from ROOT), so ``cai stats``
and ``cai plot`` work on ROOT directly. Datasets of each size are resampled from ``--data``
(:mod:`cosmicai.data.resample`) under ``ROOT/datasets/<P>/<S>/``; ``ROOT/bench.json`` lists every run with
the distinct samples it used. The grid runs each distinct configuration once: a batch-sweep cell identical to a
data-size-sweep cell (same P, S, batch size and run) gets a copy of that run's summary and records, marked
``same_as`` in bench.json, instead of a second run.
"""

from __future__ import annotations

import csv
import io
import math
import re
import time
from dataclasses import dataclass, field
from typing import Any, Callable, Sequence

from .. import storage
from ..errors import ConfigError
from ..results import LOGS_DIR, LOGS_NAME, RunFolder
from ..sizes import UNITS, parse_size
from ..analysis.stats import LOG_COLUMNS



def size_label(text: str) -> str:
    """A folder label for a size: ``1GB``, ``25MB``, ``0.5MB`` (the user's number, upper-case unit)."""
    parse_size(text, "mb")
    t = str(text).strip().replace(" ", "")
    num = t.rstrip("bBkKmMgGtTiI")
    unit = t[len(num):].upper().replace("IB", "B") or "MB"
    return f"{float(num):g}{unit}"


@dataclass
class BenchSpec:
    """The grid: data URL, sizes, partition sizes, batch sizes, runs, backend and run options."""

    data: str
    out: str
    sizes: Sequence[str]
    partitions: Sequence[str]
    batch_sizes: Sequence[int] = (32, 64, 128, 256, 512)
    runs: int = 3
    backend: str = "local"
    model: str = "astromae-demo"
    weights: str | None = None
    sweep_batch: int | None = None
    batch_data: str | None = None
    mode: str = "cycle"
    seed: int = 0
    workers: int | None = None
    threads: int | None = None
    run_mode: str = "exact"
    device: str = "cpu"
    scheduler: str | None = None
    extra: dict[str, Any] = field(default_factory=dict)

    def check(self) -> None:
        from ..runners.registry import entry

        if entry(self.backend).kind == "runner" and not (self.data.startswith("s3://")
                                                         and self.out.startswith("s3://")):
            raise ConfigError(f"--backend {self.backend} runs in the cloud: --data and --out must be s3:// URLs "
                              f"it reaches")
        if not self.sizes or not self.partitions:
            raise ConfigError("--sizes and --partitions need at least one size each")
        if self.runs < 1:
            raise ConfigError(f"--runs must be >= 1, got {self.runs}")
        if any(b < 1 for b in self.batch_sizes):
            raise ConfigError(f"--batch-sizes must be positive, got {list(self.batch_sizes)}")
        for s in [*self.sizes, *self.partitions, *([self.batch_data] if self.batch_data else [])]:
            parse_size(s, "mb")
        if self.batch_data and size_label(self.batch_data) not in {size_label(s) for s in self.sizes}:
            raise ConfigError(f"--batch-data {self.batch_data} is not one of --sizes {list(self.sizes)}")


_LABEL = re.compile(r"([0-9.eE+-]+)([A-Za-z]*)")


def label_size(label: str, unit: str) -> float:
    """The size a folder label (:func:`size_label`) names, in ``unit`` (``"MB"``, ``"GB"``).

    The label's number times a ratio of binary units, a power of two, so the conversion is exact: ``0.1GB`` is
    0.1 GB, ``0.5MB`` 0.00048828125 GB, ``25MB`` 25 MB. Not the label's byte count (``parse_size``) divided
    back: that is rounded to whole bytes, and 0.1 GB would come out as 0.09999999962747097.
    """
    match = _LABEL.fullmatch(label)
    if not match:
        raise ConfigError(f"cannot read the size label {label!r}")
    number, label_unit = match.groups()
    return float(number) * (UNITS[(label_unit or "MB").lower()] / UNITS[unit.lower()])


def size_text(label: str, unit: str) -> str:
    """A label's size in ``unit`` written as the CSV tables write it: the folder's number (``0.1``, ``12.6``),
    a float's shortest repr, with ``.0`` for whole numbers (``1.0``) like the original's pandas-written tables;
    ``partition (MB)`` is written without it (``25``), as there."""
    value = label_size(label, unit)
    if unit.upper() == "MB" and value.is_integer():
        return str(int(value))
    return repr(value)


def _log_row(partition: str, size: str, batch: int, varying: bool, run: int, summary: dict[str, Any]) -> list[str]:
    """One ``state_machine_logs.csv`` row. Sizes are written as the run's folders name them (``partition`` and
    ``size`` are folder labels), so the row joins ``result_stats.csv`` on ``partition (MB)`` and ``data (GB)``."""
    from ..analysis.stats import stage_durations

    total, map_s = stage_durations(summary)
    return [size_text(partition, "MB"), size_text(size, "GB"), str(batch), str(varying), str(run),
            str(summary.get("world_size")),
            "" if total is None else repr(round(total, 2)), "" if map_s is None else repr(round(map_s, 2))]


def _append_log(url: str, row: list[str]) -> None:
    text = storage.read_bytes(url).decode() if storage.exists(url) else ""
    buf = io.StringIO()
    w = csv.writer(buf)
    if not text:
        w.writerow(LOG_COLUMNS)
    w.writerow(row)
    storage.write_bytes(url, (text + buf.getvalue()).encode())


def _runner(spec: BenchSpec) -> tuple[Callable[[Any], dict[str, Any]], Callable[[], None]]:
    """(run one config -> summary, close) on the spec's runner; one runner (and its backend) serves the grid. For
    a runner that runs whole runs elsewhere (AWS), ``stages.total_s`` is each run's wall time as seen from here."""
    from ..runners import get_runner
    from ..runners.registry import entry, runner_options

    options = {k: v for k, v in spec.extra.items() if k in runner_options(spec.backend) and v is not None}
    runner = get_runner(spec.backend, **options)
    remote = entry(spec.backend).kind == "runner"

    def run_one(cfg: Any) -> dict[str, Any]:
        t0 = time.perf_counter()
        summary = runner.run(cfg).summary
        if remote:
            summary["stages"] = {**(summary.get("stages") or {}), "total_s": time.perf_counter() - t0}
        return summary

    return run_one, runner.close


def bench(spec: BenchSpec, log: Callable[[str], None] = print) -> dict[str, Any]:
    """Run the grid; returns ``bench.json``'s content (every run: where, summary figures, distinct samples)."""
    from ..config import load_config
    from ..data.resample import resample

    spec.check()
    sizes = [size_label(s) for s in spec.sizes]
    parts = [size_label(p) for p in spec.partitions]
    sweep_batch = spec.sweep_batch or max(spec.batch_sizes)
    batch_data = size_label(spec.batch_data) if spec.batch_data else min(sizes, key=lambda s: parse_size(s, "mb"))
    log_url = storage.join(spec.out, LOGS_DIR, LOGS_NAME)
    storage.remove(log_url)
    runner, close = _runner(spec)
    done: list[dict[str, Any]] = []
    datasets: dict[str, Any] = {}
    t_all = time.perf_counter()
    try:
        for p in parts:
            for s in sizes:
                ds_url = storage.join(spec.out, "datasets", p, s)
                info = resample(spec.data, ds_url, parse_size(s, "gb"), parse_size(p, "mb"), spec.mode, spec.seed)
                datasets[f"{p}/{s}"] = {"url": ds_url, **info.__dict__}
                log(f"dataset {p}/{s}: {info.rows} rows in {info.partitions} partitions, "
                    f"{info.distinct_samples} distinct samples ({info.epochs:.2f} passes over the source)")
                grid = [(None, sweep_batch)]
                if s == batch_data:
                    grid += [(b, b) for b in spec.batch_sizes]
                ran: dict[tuple[int, int], str] = {}  # (batch, run) -> result already computed at this p/s
                for varying, batch in grid:
                    for run in range(1, spec.runs + 1):
                        sub = [f"result-partition-{p}", s] + (["Batches", str(varying)] if varying else []) + [str(run)]
                        result = storage.join(spec.out, *sub)
                        same_as = ran.get((batch, run))
                        if same_as is None:
                            cfg, _ = load_config(None, data=ds_url, result=result, model=spec.model,
                                                 weights=spec.weights, batch_size=batch, mode=spec.run_mode,
                                                 device=spec.device,
                                                 backend=spec.backend, scheduler=spec.scheduler,
                                                 workers=spec.workers, threads=spec.threads, overwrite=True)
                            summary = runner(cfg)
                            ran[(batch, run)] = result
                        else:  # the identical configuration already ran: its files stand for this cell too
                            summary = _copy_run(same_as, result)
                        _append_log(log_url, _log_row(p, s, batch, varying is not None, run, summary))
                        entry = {"result": result, "partition": p, "size": s, "batch_size": batch,
                                 "batch_varying": varying is not None, "run": run, "same_as": same_as,
                                 "ranks": summary.get("world_size"), "rows": summary.get("rows"),
                                 "distinct_samples": info.distinct_samples, "map_wall_s": summary.get("map_wall_s"),
                                 "throughput_bps": summary.get("throughput_bps"),
                                 "complete": (summary.get("completeness") or {}).get("complete")}
                        done.append(entry)
                        log(f"  {'/'.join(sub)}: {entry['rows']} rows ({info.distinct_samples} distinct), map "
                            f"{_f(entry['map_wall_s'])} s, {_f((entry['throughput_bps'] or 0) / 1e6)} Mbit/s"
                            + (f" (same configuration as {same_as}: not run again)" if same_as else ""))
    finally:
        close()
    report = {"data": spec.data, "backend": spec.backend, "model": spec.model, "sweep_batch": sweep_batch,
              "batch_data": batch_data, "resample_mode": spec.mode, "seed": spec.seed, "datasets": datasets,
              "runs": done, "wall_s": time.perf_counter() - t_all}
    storage.write_json(storage.join(spec.out, "bench.json"), report)
    return report


def _copy_run(src: str, dst: str) -> dict[str, Any]:
    """Copy a finished run's summary and combined records (what the tables read) to ``dst``; returns the summary."""
    source, target = RunFolder(src), RunFolder(dst)
    for field_ in ("summary", "combined"):
        storage.write_bytes(getattr(target, field_), storage.read_bytes(getattr(source, field_)))
    return storage.read_json(target.summary)


def _f(x: Any) -> str:
    return "n/a" if x is None or (isinstance(x, float) and math.isnan(x)) else f"{x:.3g}"
