"""Stage 3, summarize: check a run is complete and gather its outputs into one table and one report.

Writes ``combined_data.json`` (the original's list of per-rank records), ``predictions.parquet`` (one table in
plan order: rank, partition, row) and ``summary.json``. Only reads what the ranks wrote, so running it twice
gives the same files.
"""

from __future__ import annotations

import math
from collections import defaultdict
from datetime import datetime
from typing import Any

from .. import storage
from ..data.formats import INPUT_BITS_PER_SAMPLE
from ..errors import CaiError, DataError
from .metrics import redshift_metrics
from .plan import Plan, load_plan
from .records import (COMBINED_NAME, ERRORS_DIR, ORIGINAL_KEYS, PREDICTIONS_NAME, RANKS_DIR, RUN_NAME, SUMMARY_NAME,
                      predictions_url, rank_of)

PHASES = ("fetch", "decode", "model_load", "fast_check", "inference", "write", "wait")


class IncompleteRunError(CaiError):
    """Some ranks are missing or failed, or rows in != rows out."""


def _read_records(plan: Plan, folder: str) -> dict[int, dict[str, Any]]:
    out = {}
    urls = [u for u in storage.list_files(storage.join(plan.result_url, folder), ".json") if rank_of(u) is not None]
    for url, rec in zip(urls, storage.map_urls(storage.read_json, urls)):
        if isinstance(rec, BaseException):
            raise rec
        if isinstance(rec, dict) and rec.get("plan_hash") == plan.plan_hash:
            out[rank_of(url)] = rec
    return out


def _ts(value: str) -> float:
    return datetime.fromisoformat(value).timestamp()


def _busy_seconds(records: list[dict[str, Any]]) -> float:
    """Length of the union of the tasks' [started, finished] intervals (idle gaps between resumes excluded)."""
    spans = sorted((_ts(r["started_at"]), _ts(r["finished_at"])) for r in records)
    total, cur_s, cur_e = 0.0, None, None
    for s, e in spans:
        if cur_e is None or s > cur_e:
            if cur_e is not None:
                total += cur_e - cur_s
            cur_s, cur_e = s, e
        else:
            cur_e = max(cur_e, e)
    if cur_e is not None:
        total += cur_e - cur_s
    return total


def _clean(obj: Any) -> Any:
    """Replace NaN/inf by None so summary.json is strict JSON."""
    if isinstance(obj, float) and not math.isfinite(obj):
        return None
    if isinstance(obj, dict):
        return {k: _clean(v) for k, v in obj.items()}
    if isinstance(obj, list):
        return [_clean(v) for v in obj]
    return obj


def summarize(result_url: str, allow_failures: bool = False) -> dict[str, Any]:
    """Check completeness against the plan, write the combined outputs and return the summary.

    Raises IncompleteRunError naming missing or failed ranks (and any row-count mismatch) unless
    ``allow_failures``; the files are written either way.
    """
    import pyarrow as pa
    import pyarrow.parquet as pq

    plan = load_plan(result_url)
    records = _read_records(plan, RANKS_DIR)
    errors = {r: e for r, e in _read_errors(plan).items() if r not in records}
    planned = plan.ranks
    stray = sorted(set(records) - set(planned))
    if stray:
        raise DataError(f"{result_url}: records for ranks {stray} that are not in the plan")
    failed = sorted(r for r in errors if r in planned)
    missing = sorted(r for r in planned if r not in records and r not in errors)

    tables, problems = [], []
    rows_in = rows_out = 0
    part_done: dict[str, int] = {}
    unreadable: list[int] = []
    order = sorted(records)
    sources = storage.map_urls(_pq_source, [predictions_url(result_url, rank) for rank in order])
    for rank, source in zip(order, sources):
        rec = records[rank]
        try:
            if isinstance(source, BaseException):
                raise source
            table = pq.read_table(source)
        except (pa.ArrowException, OSError, CaiError) as exc:
            problems.append(f"rank {rank}: {predictions_url(result_url, rank)} is unreadable ({exc}); "
                            f"a rerun redoes this rank")
            unreadable.append(rank)
            continue
        names = [p["name"] for p in plan.tasks[rank]]
        if rec.get("partitions") != names:
            problems.append(f"rank {rank} processed {rec.get('partitions')} but the plan assigns {names}")
        counts = _partition_counts(table)
        for p in plan.tasks[rank]:
            expected = p["rows"] if p.get("rows") is not None else rec.get("partition_rows", {}).get(p["name"])
            got = int(counts.get(p["name"], 0))
            rows_in += int(expected or 0)
            if expected is None or got != int(expected):
                problems.append(f"partition {p['name']} (rank {rank}): {expected} rows in, {got} rows out")
            part_done[p["name"]] = part_done.get(p["name"], 0) + 1
        rows_out += table.num_rows
        tables.append(table)
    for rank in unreadable:
        del records[rank]
    missing = sorted(missing + unreadable)
    twice = sorted(name for name, count in part_done.items() if count > 1)
    if twice:
        problems.append(f"partition(s) {twice[:10]} were predicted more than once")
    combined = _combine(tables) if tables else None

    planned_rows = plan.total_rows
    summary: dict[str, Any] = {
        "result_url": result_url, "data_url": plan.data_url, "plan_hash": plan.plan_hash,
        "model": plan.config.get("model"), "mode": plan.config.get("mode"), "device": plan.config.get("device"),
        "batch_size": plan.config.get("batch_size"), "world_size": plan.world_size,
        "completeness": {
            "complete": not (missing or failed or problems) and len(part_done) == len(plan.partitions),
            "ranks_planned": len(planned), "ranks_done": len(records), "missing_ranks": missing,
            "failed_ranks": failed, "partitions_planned": len(plan.partitions), "partitions_done": len(part_done),
            "rows_planned": planned_rows, "rows_in": rows_in, "rows_out": rows_out, "problems": problems},
        "failures": [{k: errors[r].get(k) for k in ("rank", "partitions", "error_type", "message")}
                     for r in failed],
    }
    summary.update(_timing(plan, records, rows_out))
    summary.update(_modes_used(plan, records))
    summary["metrics"] = _metrics(combined)

    ordered = [_original_first(records[r]) for r in sorted(records)]
    storage.write_json(storage.join(result_url, COMBINED_NAME), _clean(ordered))
    if combined is not None:
        sink = pa.BufferOutputStream()
        pq.write_table(combined, sink)
        storage.write_bytes(storage.join(result_url, PREDICTIONS_NAME), sink.getvalue().to_pybytes())
    else:
        storage.remove(storage.join(result_url, PREDICTIONS_NAME))
    summary = _clean(summary)
    storage.write_json(storage.join(result_url, SUMMARY_NAME), summary)

    if not summary["completeness"]["complete"] and not allow_failures:
        raise IncompleteRunError(incomplete_message(summary))
    return summary


def _pq_source(url: str) -> Any:
    import pyarrow as pa

    path = storage.local_path(url)
    return path if path is not None else pa.BufferReader(storage.read_bytes(url))


def _partition_counts(table: Any) -> dict[str, int]:
    import pyarrow as pa
    import pyarrow.compute as pc

    if not table.num_rows:
        return {}
    col = table.column("partition").cast(pa.string()).combine_chunks()
    vc = pc.value_counts(col)
    return dict(zip(vc.field("values").to_pylist(), vc.field("counts").to_pylist()))


def _read_errors(plan: Plan) -> dict[int, dict[str, Any]]:
    return _read_records(plan, ERRORS_DIR)


def _combine(tables: list[Any]) -> Any:
    import pyarrow as pa

    cast = []
    for t in tables:
        idx = t.schema.get_field_index("partition")
        if pa.types.is_dictionary(t.schema.field(idx).type):
            t = t.set_column(idx, "partition", t.column("partition").cast(pa.string()))
        cast.append(t)
    combined = pa.concat_tables(cast, promote_options="default")
    order = ["object_id", "partition", "row", "z_pred", "z_true", "flag"]
    return combined.select([c for c in order if c in combined.column_names])


def _original_first(rec: dict[str, Any]) -> dict[str, Any]:
    out = {k: rec[k] for k in ORIGINAL_KEYS if k in rec}
    out.update({k: v for k, v in rec.items() if k not in out})
    return out


def _timing(plan: Plan, records: dict[int, dict[str, Any]], rows_out: int) -> dict[str, Any]:
    recs = list(records.values())
    busy = _busy_seconds(recs) if recs else 0.0
    run_info = storage.read_json(storage.join(plan.result_url, RUN_NAME)) \
        if storage.exists(storage.join(plan.result_url, RUN_NAME)) else {}
    stage = run_info.get("stages", {}) if run_info.get("plan_hash") == plan.plan_hash else {}
    # The backend-measured map stage includes worker start-up; use it when that run did every rank.
    if stage.get("map_s") and set(run_info.get("ranks_run", [])) >= set(records) and records:
        map_s, source = float(stage["map_s"]), "backend map stage (includes worker start-up)"
    else:
        map_s, source = busy, "union of task intervals"
    bits = rows_out * INPUT_BITS_PER_SAMPLE
    phases_total = {p: sum(float(r.get("phases", {}).get(p, 0.0)) for r in recs) for p in PHASES}
    workers: dict[str, dict[str, Any]] = defaultdict(lambda: {"tasks": 0, "rows": 0, "task_seconds": 0.0})
    for r in recs:
        cpu = r.get("cpu", {})
        w = workers[f"{cpu.get('host', '?')}:{cpu.get('pid', '?')}"]
        w["tasks"] += 1
        w["rows"] += int(r.get("rows", 0))
        w["task_seconds"] += float(r.get("total_cpu_time (seconds)", 0.0))
    for w in workers.values():
        s = w["task_seconds"]
        w["samples_per_s"] = w["rows"] / s if s > 0 else None
        w["throughput_bps"] = w["rows"] * INPUT_BITS_PER_SAMPLE / s if s > 0 else None
    return {
        "stages": stage,
        "map_wall_s": map_s, "map_wall_source": source, "task_busy_s": busy,
        "rows": rows_out, "input_bits": bits,
        "throughput_bps": bits / map_s if map_s > 0 else None,
        "samples_per_s": rows_out / map_s if map_s > 0 else None,
        "phases_total_s": phases_total,
        "phases_mean_s": {p: v / len(recs) for p, v in phases_total.items()} if recs else {},
        "cold_starts": sum(1 for r in recs if r.get("cold_start")),
        "workers": dict(sorted(workers.items())),
        "peak_rss_mb": max((float(r.get("peak_rss_mb", 0.0)) for r in recs), default=None),
        "nonfinite_rows": sum(int(r.get("nonfinite_rows", 0)) for r in recs),
    }


def _modes_used(plan: Plan, records: dict[int, dict[str, Any]]) -> dict[str, Any]:
    """The mode each rank predicted in, and the fast-mode guard's measurements (max |dz| over the ranks)."""
    used = sorted({str(r.get("mode_used") or r.get("mode")) for r in records.values()})
    out: dict[str, Any] = {"mode_used": used[0] if len(used) == 1 else used}
    checks = {rank: r["fast_check"] for rank, r in records.items() if isinstance(r.get("fast_check"), dict)}
    if plan.config.get("mode") == "fast":
        measured = [c["max_dz"] for c in checks.values() if c.get("max_dz") is not None]
        out["fast_check"] = {
            "policy": plan.config.get("fast_guard") or "fallback",
            "tolerance": next((c["tolerance"] for c in checks.values()), None),
            "max_dz": max(measured) if measured else None,
            "rows_compared": sum(int(c.get("rows", 0)) for c in checks.values()),
            "ranks_in_exact": sorted(rank for rank, c in checks.items() if c.get("mode_used") == "exact"),
            "seconds": sum(float(c.get("seconds", 0.0)) for c in checks.values()),
        }
    return out


def _metrics(table: Any) -> dict[str, Any] | None:
    if table is None or "z_true" not in table.column_names:
        return None
    zt = table.column("z_true").to_numpy(zero_copy_only=False)
    zp = table.column("z_pred").to_numpy(zero_copy_only=False)
    return redshift_metrics(zp, zt)


def incomplete_message(summary: dict[str, Any]) -> str:
    """One line naming what is missing or failed in an incomplete run."""
    comp = summary["completeness"]
    parts = [f"{summary['result_url']}: run incomplete"]
    if comp["missing_ranks"]:
        parts.append(f"missing ranks {comp['missing_ranks']}")
    for f in summary["failures"]:
        parts.append(f"rank {f['rank']} failed ({f['error_type']}: {f['message']})")
    parts.extend(comp["problems"][:5])
    return "; ".join(parts) + "; rerun `cai run` with the same config to resume the missing ranks"
