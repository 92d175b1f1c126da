"""The human report of a run's summary (``cai run``, ``cai report``, ``cai aws run`` print it)."""

from __future__ import annotations

from typing import Any


def _fmt(value: Any, spec: str = ".3g", unit: str = "") -> str:
    if value is None:
        return "n/a"
    return f"{value:{spec}}{unit}"


def _weights_lines(summary: dict[str, Any]) -> list[str]:
    """The weights used (file or built-in, sha256, origin, what they were trained on, their caveat) and the
    predictions outside their training range."""
    w = summary.get("weights")
    if not isinstance(w, dict):
        return []
    sha = f", sha256 {w['sha256'][:12]}" if w.get("sha256") else ""
    origin = f": {w['origin']}" if w.get("origin") else ""
    lines = [f"  weights: {w.get('model')} ({w.get('file') or 'built-in'}{sha}){origin}"]
    if w.get("trained_on"):
        lines.append(f"  trained on: {w['trained_on']}")
    if w.get("caveat"):
        lines.append(f"  NOTE: {w['caveat']}")
    out = summary.get("outside_training_range")
    if isinstance(out, dict):
        if out.get("known"):
            lo, hi = out["range"]
            more = " ..." if out["n_partitions"] > len(out["partitions"]) else ""
            where = f", in {out['n_partitions']} partition(s): {', '.join(out['partitions'])}{more}" if out["rows"] \
                else ""
            lines.append(f"  outside the training range z {lo:g}..{hi:g}: {out['rows']} row(s) (column "
                         f"outside_training_range; scored like the rest){where}")
        else:
            lines.append("  training range of these weights: unknown (no prediction is marked outside it)")
    return lines


def format_report(summary: dict[str, Any]) -> str:
    """The human report of a summary: stages, phases, throughput, workers, memory, metrics, completeness."""
    comp = summary.get("completeness", {})
    st = summary.get("stages") or {}
    lines = [f"run {summary.get('result_url')}  (model {summary.get('model')}, mode {summary.get('mode')}, "
             f"batch {summary.get('batch_size')}, {comp.get('ranks_planned')} ranks)",
             f"  complete: {comp.get('complete')}  ranks {comp.get('ranks_done')}/{comp.get('ranks_planned')}  "
             f"partitions {comp.get('partitions_done')}/{comp.get('partitions_planned')}  "
             f"rows in {comp.get('rows_in')} / out {comp.get('rows_out')}"]
    lines.extend(_weights_lines(summary))
    if comp.get("missing_ranks"):
        lines.append(f"  missing ranks: {comp['missing_ranks']}")
    for f in summary.get("failures", []):
        lines.append(f"  FAILED rank {f['rank']} {f['partitions']}: {f['error_type']}: {f['message']}")
    for p in comp.get("problems", []):
        lines.append(f"  problem: {p}")
    bad = summary.get("nonfinite_predictions") or {}
    if bad.get("rows"):
        more = " ..." if bad["n_partitions"] > len(bad["partitions"]) else ""
        lines.append(f"  non-finite predictions: {bad['rows']} row(s) flagged, {bad['from_finite_inputs']} from finite "
                     f"inputs, in {bad['n_partitions']} partition(s): {', '.join(bad['partitions'])}{more}")
    oor = summary.get("out_of_range") or {}
    if oor.get("rows"):
        more = " ..." if oor["n_partitions"] > len(oor["partitions"]) else ""
        lo, hi = oor["magnitude_range"]
        lines.append(f"  out-of-range inputs: {oor['rows']} row(s) flagged, predicted but not scored "
                     f"({oor['magnitudes']} with magnitudes outside {lo:g}..{hi:g}, {oor['pixels']} with pixels "
                     f"beyond +-{oor['pixel_limit']:g}), in {oor['n_partitions']} partition(s): "
                     f"{', '.join(oor['partitions'])}{more}")
    dup = summary.get("duplicate_ids") or {}
    if dup.get("rows"):
        lines.append(f"  duplicate object ids: {dup['ids']} id(s) appear more than once ({dup['rows']} extra row(s)), "
                     f"e.g. {', '.join(map(str, dup['examples']))}")
    fc = summary.get("fast_check")
    if fc:
        if fc.get("max_dz") is None:
            lines.append("  fast mode: guard off (fast not compared with exact on these weights)")
        else:
            fell = fc.get("ranks_in_exact") or []
            lines.append(f"  fast mode: max |dz| vs exact {fc['max_dz']:.2e} on {fc['rows_compared']} calibration "
                         f"rows (tolerance {fc['tolerance']:g}, {fc['seconds']:.2f} s)"
                         + (f"; OVER TOLERANCE: {len(fell)} rank(s) predicted in exact mode instead" if fell
                            else "; predictions in fast mode"))
    lines.append("  stages (wall s): plan " + _fmt(st.get("plan_s"), ".2f") + ", map " + _fmt(st.get("map_s"), ".2f")
                 + ", summarize " + _fmt(st.get("summarize_s"), ".2f")
                 + (f"  [{summary.get('ranks_resumed')} rank(s) resumed]" if summary.get("ranks_resumed") else ""))
    ph = summary.get("phases_total_s") or {}
    lines.append("  phases (s, summed over ranks): " + ", ".join(f"{k} {v:.2f}" for k, v in ph.items()))
    lines.append(f"  throughput: {_fmt(summary.get('samples_per_s'), '.1f')} samples/s, "
                 f"{_fmt((summary.get('throughput_bps') or 0) / 1e6, '.2f')} Mbit/s over a map stage of "
                 f"{_fmt(summary.get('map_wall_s'), '.2f')} s ({summary.get('map_wall_source')})")
    for name, w in (summary.get("workers") or {}).items():
        lines.append(f"  worker {name}: {w['tasks']} task(s), {w['rows']} rows, "
                     f"{_fmt(w.get('samples_per_s'), '.1f')} samples/s")
    lines.append(f"  peak memory: {_fmt(summary.get('peak_rss_mb'), '.0f')} MB RSS per worker (max); "
                 f"cold starts {summary.get('cold_starts')}")
    m = summary.get("metrics")
    if m:
        lines.append(f"  metrics (n={m['n']}, excluded {m['n_excluded']}): MAE {_fmt(m['MAE'], '.4f')}  "
                     f"MSE {_fmt(m['MSE'], '.5f')}  Bias {_fmt(m['Bias'], '.4f')}  "
                     f"Precision {_fmt(m['Precision'], '.4f')}  R2 {_fmt(m['R2'], '.4f')}  "
                     f"outliers {_fmt(m['outlier_fraction'], '.3f')}")
    if summary.get("catalog_columns"):
        lines.append(f"  catalogue columns carried into predictions.parquet: {', '.join(summary['catalog_columns'])}")
    lines.append(f"  outputs: {summary.get('result_url')}/{{predictions.parquet,summary.json,combined_data.json}}")
    return "\n".join(lines)
