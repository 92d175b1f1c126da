"""The paper's figures (PNG and PDF, matplotlib Agg) from result trees or from one run.

Tree figures (``cai plot RESULTS_ROOT``): map-stage / per-rank time and throughput against data size, one
line per partition size; time and throughput against batch size. Run figures (``cai plot RUN``): the redshift
distribution n(z) of the predictions (with the true n(z) overlaid when the data has redshifts); predicted
against true redshift as a 2-D density with the metrics in the legend; a per-worker timeline of each rank's
phases. The original's published trees have no per-phase times, so they only give the tree figures.
"""

from __future__ import annotations

import csv
import io
from datetime import datetime
from typing import Any

import numpy as np

from .. import storage
from ..errors import DataError
from ..results import RunFolder
from . import stats

PHASE_COLORS = {"model_load": "#7f7f7f", "fetch": "#1f77b4", "decode": "#ff7f0e", "inference": "#2ca02c",
                "write": "#d62728"}


def _plt():
    import matplotlib

    matplotlib.use("Agg", force=True)
    import matplotlib.pyplot as plt

    return plt


def _save(fig, out: str, name: str) -> list[str]:
    """Save ``fig`` as ``out/name.png`` and ``out/name.pdf`` (through storage); returns the URLs."""
    urls = []
    for ext in ("png", "pdf"):
        buf = io.BytesIO()
        fig.savefig(buf, format=ext, dpi=130 if ext == "png" else None, bbox_inches="tight")
        url = storage.join(out, f"{name}.{ext}")
        storage.write_bytes(url, buf.getvalue())
        urls.append(url)
    _plt().close(fig)
    return urls


def _mean_sd(values: list[float]) -> tuple[float, float]:
    arr = np.asarray(values, dtype=float)
    return float(arr.mean()), float(arr.std(ddof=1)) if arr.size > 1 else 0.0


def _map_seconds(run: stats.RunStats) -> float | None:
    url = RunFolder(run.path).summary
    if not storage.exists(url):
        return None
    return stats.stage_durations(storage.read_json(url))[1]


def _state_machine_durations(root: str) -> dict[tuple[float, float, str], float]:
    """(partition MB, data GB, run) -> whole state-machine duration (s) from the original's
    total_execution_time.csv (absent for our trees)."""
    for cand in (storage.join(root, "total_execution_time.csv"), storage.join(root, "results", "total_execution_time.csv")):
        if storage.exists(cand):
            out: dict[tuple[float, float, str], float] = {}
            for row in csv.DictReader(io.StringIO(storage.read_bytes(cand).decode())):
                mins, _, secs = row["duration"].partition(":")
                out[(float(row["partition(MB)"]), float(row["data(GB)"]), row["run"].strip())] = (
                    float(mins) * 60 + float(secs))
            return out
    return {}


def _by_key(durations: dict[tuple[float, float, str], float]) -> dict[float, dict[float, list[float]]]:
    series: dict[float, dict[float, list[float]]] = {}
    for (p, gb, _), sec in durations.items():
        series.setdefault(p, {}).setdefault(gb, []).append(sec)
    return series


def _size_series(runs: list[stats.RunStats], value) -> dict[float, dict[float, list[float]]]:
    series: dict[float, dict[float, list[float]]] = {}
    for r in runs:
        v = value(r)
        if r.batch_size is None and v is not None:
            series.setdefault(r.partition_mb, {}).setdefault(r.data_gb, []).append(v)
    return series


def _in_units(series: dict[Any, dict[float, list[float]]]) -> tuple[dict[Any, dict[float, list[float]]], str]:
    """Data sizes in MB when every size is below 1 GB (tiny benchmark grids), else in GB."""
    if max((x for s in series.values() for x in s), default=1.0) >= 1.0:
        return series, "data size (GB)"
    return {k: {x * 1024: v for x, v in s.items()} for k, s in series.items()}, "data size (MB)"


def _line_panel(ax, series: dict[Any, dict[Any, list[float]]], xlabel: str, ylabel: str, title: str,
                colors: dict[Any, str], label_fmt=lambda p: f"{p:g} MB partitions", logx: bool = False) -> None:
    """One line per key (mean of the runs, error bar = standard deviation), a fixed colour per key."""
    from matplotlib.ticker import FuncFormatter

    for key in sorted(series):
        xs = sorted(series[key])
        ms = [_mean_sd(series[key][x]) for x in xs]
        ax.errorbar(xs, [m for m, _ in ms], yerr=[s for _, s in ms], marker="o", capsize=3, label=label_fmt(key),
                    color=colors[key])
    ax.set_xlabel(xlabel)
    ax.set_ylabel(ylabel)
    ax.set_title(title)
    if logx:
        ax.set_xscale("log", base=2)
        ax.xaxis.set_major_formatter(FuncFormatter(lambda v, _: f"{v:g}"))
    ax.grid(alpha=0.3)
    ax.legend(fontsize=8)


def plot_tree(root: str, out: str) -> list[str]:
    """Sweep figures for the result tree under ``root``; returns the written file URLs."""
    plt = _plt()
    runs = stats.find_runs(root)
    files: list[str] = []
    sweep = [r for r in runs if r.batch_size is None]
    sm = _state_machine_durations(root)
    keys = sorted({r.partition_mb for r in runs} | {k[0] for k in sm})
    colors = {k: f"C{i % 10}" for i, k in enumerate(keys)}
    if sweep:
        map_s = _size_series(sweep, _map_seconds)
        panels = [(_size_series(sweep, lambda r: r.cpu_time), "per-rank time (s, IQR-filtered mean)",
                   "Per-rank inference time vs data size")]
        if map_s:
            panels.insert(0, (map_s, "map-stage wall time (s)", "Map-stage time vs data size"))
        elif sm:
            panels.insert(0, (_by_key(sm), "state machine duration (s)", "Whole-run time vs data size"))
        fig, axes = plt.subplots(1, len(panels), figsize=(6 * len(panels), 4.2), squeeze=False)
        for ax, (series, ylabel, title) in zip(axes[0], panels):
            series, xlabel = _in_units(series)
            _line_panel(ax, series, xlabel, ylabel, title, colors, logx=True)
        files += _save(fig, out, "time_vs_data_size")

        panels = [(_size_series(sweep, lambda r: r.throughput / 1e9), "sum of per-rank throughput (Gbit/s)",
                   "Throughput vs data size (original definition)")]
        honest = _size_series(sweep, _honest_bps)
        if honest:
            panels.append((honest, "bits / map-stage wall time (Gbit/s)", "Honest throughput vs data size"))
        elif sm:
            whole = _size_series(sweep, lambda r: r.total_bits / sm[(r.partition_mb, r.data_gb, r.run)] / 1e9
                                 if (r.partition_mb, r.data_gb, r.run) in sm else None)
            if whole:
                panels.append((whole, "total bits / state machine duration (Gbit/s)",
                               "Whole-run throughput vs data size"))
        fig, axes = plt.subplots(1, len(panels), figsize=(6 * len(panels), 4.2), squeeze=False)
        for ax, (series, ylabel, title) in zip(axes[0], panels):
            series, xlabel = _in_units(series)
            _line_panel(ax, series, xlabel, ylabel, title, colors, logx=True)
        files += _save(fig, out, "throughput_vs_data_size")

    groups = stats.batch_groups(runs)
    if groups:
        fig, (ax1, ax2) = plt.subplots(1, 2, figsize=(12, 4.2))
        t_series = {k: {} for k in groups}
        b_series = {k: {} for k in groups}
        for key, members in groups.items():
            for r in members:
                t_series[key].setdefault(r.batch_size, []).append(r.cpu_time)
                b_series[key].setdefault(r.batch_size, []).append(r.throughput / 1e9)
        fmt = lambda k: f"{k[0]:g} MB partitions, " + (f"{k[1]:g} GB" if k[1] >= 1 else f"{k[1] * 1024:g} MB")  # noqa: E731
        gcolors = {k: f"C{i % 10}" for i, k in enumerate(sorted(groups))}
        _line_panel(ax1, t_series, "batch size", "per-rank time (s, IQR-filtered mean)", "Time vs batch size",
                    gcolors, fmt, logx=True)
        _line_panel(ax2, b_series, "batch size", "sum of per-rank throughput (Gbit/s)",
                    "Throughput vs batch size", gcolors, fmt, logx=True)
        files += _save(fig, out, "batch_size")
    if not files:
        raise DataError(f"{root}: nothing to plot")
    return files


def _honest_bps(run: stats.RunStats) -> float | None:
    seconds = _map_seconds(run)
    rows = [rec.get("rows") for rec in run.records]
    if not seconds or any(not isinstance(n, int) for n in rows):
        return None
    from ..data.formats import INPUT_BITS_PER_SAMPLE

    return sum(rows) * INPUT_BITS_PER_SAMPLE / seconds / 1e9


def _read_predictions(run_url: str):
    import pyarrow.parquet as pq

    url = RunFolder(run_url).predictions
    if not storage.exists(url):
        raise DataError(f"{run_url}: no predictions.parquet (run `cai run` to completion first)")
    import pyarrow as pa

    return pq.read_table(pa.BufferReader(storage.read_bytes(url)), use_threads=False)  # see RunResult.predictions


def _column(table, name: str) -> np.ndarray:
    return table.column(name).to_numpy(zero_copy_only=False).astype(float)


def nz_figure(table):
    """The n(z) figure of a predictions table: a histogram of ``z_pred`` over the rows not flagged (and finite),
    with the histogram of ``z_true`` over the same rows drawn as a step line when the table has it.

    Returns the matplotlib Figure (its axes' first container holds the predicted counts)."""
    zp = _column(table, "z_pred")
    keep = np.isfinite(zp)
    if "flag" in table.column_names:
        keep &= ~table.column("flag").to_numpy(zero_copy_only=False).astype(bool)
    zt = _column(table, "z_true") if "z_true" in table.column_names else None
    shown = zp[keep]
    truth = zt[keep & np.isfinite(zt)] if zt is not None else np.empty(0)
    both = np.concatenate([shown, truth])
    lo, hi = (float(both.min()), float(both.max())) if both.size else (0.0, 1.0)
    if hi - lo < 1e-6:
        lo, hi = lo - 0.05, hi + 0.05
    edges = np.linspace(lo, hi, int(np.clip(np.sqrt(max(shown.size, 1)), 10, 60)) + 1)
    plt = _plt()
    fig, ax = plt.subplots(figsize=(6.4, 4.2))
    ax.hist(shown, bins=edges, color="C0", alpha=0.6, label=f"predicted (N = {shown.size:,})")
    if zt is not None:
        ax.hist(truth, bins=edges, histtype="step", color="C3", lw=1.6, label=f"true (N = {truth.size:,})")
    excluded = int(zp.size - shown.size)
    ax.set_xlabel("redshift z")
    ax.set_ylabel("galaxies per bin")
    ax.set_title("Redshift distribution n(z)" + (f"  ({excluded:,} flagged row(s) excluded)" if excluded else ""))
    ax.grid(alpha=0.3)
    ax.legend(fontsize=8)
    return fig


def plot_nz(run_url: str, out: str) -> list[str]:
    """``redshift_nz``: n(z) of the run's predictions (and of the true redshifts when present)."""
    return _save(nz_figure(_read_predictions(run_url)), out, "redshift_nz")


def plot_predictions(run_url: str, out: str) -> list[str]:
    """Predicted vs true redshift density (``predictions.parquet``) with the metrics in the legend."""
    from ..pipeline.metrics import redshift_metrics

    url = RunFolder(run_url).predictions
    table = _read_predictions(run_url)
    if "z_true" not in table.column_names:
        raise DataError(f"{url}: no z_true column (the dataset has no true redshifts), nothing to compare")
    zp = table.column("z_pred").to_numpy(zero_copy_only=False).astype(float)
    zt = table.column("z_true").to_numpy(zero_copy_only=False).astype(float)
    m = redshift_metrics(zp, zt)
    ok = np.isfinite(zp) & np.isfinite(zt)
    plt = _plt()
    fig, ax = plt.subplots(figsize=(5.6, 5))
    lo = float(min(zt[ok].min(), zp[ok].min())) if ok.any() else 0.0
    hi = float(max(zt[ok].max(), zp[ok].max())) if ok.any() else 1.0
    log_scale = ok.sum() > 1000
    hb = ax.hexbin(zt[ok], zp[ok], gridsize=60, bins="log" if log_scale else None, mincnt=1, cmap="viridis",
                   extent=(lo, hi, lo, hi))
    fig.colorbar(hb, ax=ax, label="galaxies per cell" + (" (log scale)" if log_scale else ""))
    ax.plot([lo, hi], [lo, hi], "r--", lw=1, label="z_pred = z_true")
    text = (f"N = {m['n']:,}\nMAE = {m['MAE']:.4f}\nMSE = {m['MSE']:.5f}\nBias = {m['Bias']:.4f}\n"
            f"Precision = {m['Precision']:.4f}\nR$^2$ = {m['R2']:.4f}\noutliers = {m['outlier_fraction']:.3f}")
    ax.plot([], [], " ", label=text)
    ax.legend(loc="upper left", fontsize=8, framealpha=0.8)
    ax.set_xlabel("true redshift")
    ax.set_ylabel("predicted redshift")
    ax.set_title("Predicted vs true redshift")
    return _save(fig, out, "redshift_scatter")


def _ts(text: Any) -> float | None:
    if not isinstance(text, str):
        return None
    try:
        return datetime.fromisoformat(text.replace("Z", "+00:00")).timestamp()
    except ValueError:
        return None


def plot_timeline(run_url: str, out: str) -> list[str]:
    """Per-worker timeline: each rank's span (started_at..finished_at), split into its phases' durations.

    The records hold phase totals, not per-phase timestamps: within a rank's bar the phases are drawn end to
    end in their own lengths (fetch/decode overlap inference when prefetching, so they may exceed the span).
    """
    records = storage.read_json(RunFolder(run_url).combined)
    if not isinstance(records, list) or not records:
        raise DataError(f"{run_url}/combined_data.json: expected a non-empty list of per-rank records")
    rows = []
    for i, rec in enumerate(records):
        phases = rec.get("phases")
        t0, t1 = _ts(rec.get("started_at")), _ts(rec.get("finished_at"))
        if not isinstance(phases, dict) or t0 is None or t1 is None:
            raise DataError(f"{run_url}/combined_data.json[{i}]: no 'phases' and start/finish timestamps "
                            f"(the original CAI records have none: a timeline needs our per-rank records)")
        cpu = rec.get("cpu") or {}
        worker = f"{cpu.get('host', '?')}:{cpu.get('pid', '?')}"
        rows.append((worker, rec.get("rank", i), t0, t1, phases))
    origin = min(r[2] for r in rows)
    workers = sorted({r[0] for r in rows})
    plt = _plt()
    fig, ax = plt.subplots(figsize=(10, 1.2 + 0.5 * len(workers)))
    seen = set()
    for worker, rank, t0, t1, phases in rows:
        y = workers.index(worker)
        ax.barh(y, t1 - t0, left=t0 - origin, height=0.8, color="none", edgecolor="black", lw=0.8)
        left = t0 - origin
        for name, color in PHASE_COLORS.items():
            width = float(phases.get(name) or 0.0)
            if width <= 0:
                continue
            ax.barh(y, width, left=left, height=0.6, color=color, label=None if name in seen else name)
            seen.add(name)
            left += width
        ax.text(t0 - origin, y + 0.42, f"r{rank}", fontsize=7, va="bottom")
    ax.set_yticks(range(len(workers)), workers, fontsize=8)
    ax.set_xlabel("seconds since the first rank started")
    ax.set_title("Per-worker timeline (outline: rank span; bars: phase durations)")
    ax.legend(loc="upper left", bbox_to_anchor=(1.01, 1.0), fontsize=8)
    ax.grid(axis="x", alpha=0.3)
    return _save(fig, out, "timeline")


def plot(target: str, out: str) -> list[str]:
    """Every figure ``target`` supports: a single run (has combined_data.json) or a tree of runs."""
    if storage.exists(RunFolder(target).combined):
        files = []
        errors = []
        for fn in (plot_nz, plot_predictions, plot_timeline):
            try:
                files += fn(target, out)
            except DataError as exc:
                errors.append(str(exc))
        if not files:
            raise DataError("; ".join(errors))
        return files
    return plot_tree(target, out)

