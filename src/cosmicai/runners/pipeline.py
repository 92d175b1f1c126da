"""A whole run on one backend: plan -> backend.map(run_task) over the ranks not yet done -> summarize."""

from __future__ import annotations

import dataclasses
import os
import sys
import time
from typing import Any

from .. import storage
from ..config import URL_FIELDS, RunConfig, canonical_url, parse_task_timeout
from ..errors import CaiError
from ..pipeline.infer import check_fast_once, done_ranks, record_failure, run_task
from ..pipeline.lease import Lease, describe
from ..results import PLAN_NAME, RUN_NAME, SUMMARY_NAME
from ..pipeline.plan import make_plan, plan_contents
from ..pipeline.summarize import IncompleteRunError, incomplete_message, summarize


def _make_backend(config: RunConfig) -> Any:
    from ..backends.base import get_backend

    options = dict(config.backend_options)
    options.setdefault("workers", config.workers)
    options.setdefault("threads", config.threads)
    if config.backend != "local":
        options.setdefault("scheduler", config.scheduler)
        options.setdefault("device", config.device)
    return get_backend(config.backend, **options)


def run(config: RunConfig, backend: Any = None, progress: bool = True, report: bool | None = None) -> dict[str, Any]:
    """Plan, run the missing ranks on ``backend`` (default: from ``config.backend``) and summarize.

    Returns the summary (with ``stages`` and ``failures``); prints the report when ``report`` (default: same as
    ``progress``). Raises IncompleteRunError when ranks failed, unless ``config.allow_failures``.
    """
    config = canonical_config(config)
    if not config.endpoint:
        return _run(config, backend, progress, report)
    # Workers (spawned processes included) read the endpoint from the environment; restore it afterwards.
    before = os.environ.get("CAI_S3_ENDPOINT")
    os.environ["CAI_S3_ENDPOINT"] = config.endpoint
    try:
        return _run(config, backend, progress, report)
    finally:
        if before is None:
            os.environ.pop("CAI_S3_ENDPOINT", None)
        else:
            os.environ["CAI_S3_ENDPOINT"] = before


def canonical_config(config: RunConfig) -> RunConfig:
    """``config`` with its data, result and weights paths canonical (:func:`config.canonical_url`) and its task
    timeout checked, also when it was built directly rather than loaded."""
    changes: dict[str, Any] = {k: canonical_url(getattr(config, k), k) for k in URL_FIELDS if getattr(config, k)}
    changes["task_timeout"] = parse_task_timeout(config.task_timeout)
    changes = {k: v for k, v in changes.items() if v != getattr(config, k)}
    return dataclasses.replace(config, **changes) if changes else config


def _older_spelling(config: RunConfig) -> RunConfig:
    """A plan written before paths were made canonical records them as they were typed (``results``, ``./data``).
    When that plan's paths name the same locations as ``config``'s from this folder, the run is continued with
    the plan's own spelling, so its hash (and its finished ranks) still match. Otherwise ``config`` as it is."""
    if config.overwrite:
        return config
    try:
        url = storage.join(config.result, PLAN_NAME)
        stored = storage.read_json(url) if storage.exists(url) else None
    except CaiError:
        return config
    old = stored.get("config") if isinstance(stored, dict) else None
    if not isinstance(old, dict):
        return config
    spelled = {k: old.get(k) for k in URL_FIELDS}
    if not all(v is None or isinstance(v, str) for v in spelled.values()):
        return config
    try:
        now = {k: canonical_url(v, k) if v else v for k, v in spelled.items()}
    except CaiError:
        return config
    if now == spelled or any(now[k] != getattr(config, k) for k in URL_FIELDS):
        return config  # a canonical plan, or another run: planning compares them
    return dataclasses.replace(config, **spelled)


def _run(config: RunConfig, backend: Any, progress: bool, report: bool | None) -> dict[str, Any]:
    config = _older_spelling(config)
    _check_before_planning(config)
    contents = plan_contents(config)  # data and weights problems are named here, before anything is written
    finished = _finished_summary(config, contents[2])
    if finished is not None:  # nothing to do: report it without writing (works on a read-only result folder)
        finished["ranks_run"], finished["ranks_resumed"] = 0, (finished.get("completeness") or {}).get("ranks_done")
        if (report if report is not None else progress):
            print(format_report(finished))
        return finished
    with Lease(config.result, break_stale=config.break_lease, allow_unsafe=config.allow_unsafe_lease) as lease:
        if lease.took_over is not None:
            print(f"note: took over the lease of {config.result} ({describe(lease.took_over)})",
                  file=sys.stderr)
        return _run_leased(config, backend, progress, report, contents)


def _check_before_planning(config: RunConfig) -> None:
    """Device and weights problems are found here, not inside every worker after planning."""
    from ..errors import ConfigError
    from ..models.registry import resolve_device

    try:
        resolve_device(config.device)
    except CaiError as exc:
        raise ConfigError(f"device: {exc}") from exc
    if config.weights and not storage.exists(config.weights):
        raise ConfigError(f"weights: {config.weights} does not exist")


def _finished_summary(config: RunConfig, digest: str) -> dict[str, Any] | None:
    """The stored summary when ``config``'s plan is already complete under ``config.result`` (read only).

    Any error here (an unreadable result path, refused credentials) means "not finished": planning then reports
    it with the data or result path it concerns."""
    if config.overwrite:
        return None
    try:
        summary_url = storage.join(config.result, SUMMARY_NAME)
        if not storage.exists(summary_url) or not storage.exists(storage.join(config.result, PLAN_NAME)):
            return None
        stored = storage.read_json(summary_url)
        if not isinstance(stored, dict) or not (stored.get("completeness") or {}).get("complete"):
            return None
    except CaiError:
        return None
    return stored if stored.get("plan_hash") == digest else None


def _run_leased(config: RunConfig, backend: Any, progress: bool, report: bool | None,
                contents: tuple[dict[str, Any], list[dict[str, Any]], str]) -> dict[str, Any]:
    t0 = time.perf_counter()
    plan = make_plan(config, contents)
    plan_s = time.perf_counter() - t0
    done = done_ranks(plan)
    todo = [t for t in plan.task_list() if t["rank"] not in done]
    resumed = len(plan.ranks) - len(todo)

    owned = backend is None
    t1 = time.perf_counter()
    failures: dict[int, BaseException] = {}
    ran: list[int] = []
    parts_done = 0
    parts_todo = sum(len(plan.tasks[t["rank"]]) for t in todo)
    if todo:
        from ..backends.base import TaskTimeouts, accepts_timeouts

        if config.mode == "fast" and config.backend == "local" and len(todo) > 1:
            try:  # once per run, before the pool's workers start together
                check_fast_once(plan, todo[0]["rank"])
            except (CaiError, OSError):
                pass  # the ranks meet the same problem and report it by name
        backend = backend or _make_backend(config)
        bar = _progress_bar(plan, todo) if progress else None
        timeouts = TaskTimeouts(config.task_timeout)
        results = (backend.map(run_task, todo, timeouts=timeouts) if timeouts.enabled and accepts_timeouts(backend)
                   else backend.map(run_task, todo))
        try:
            for task, result in results:
                if isinstance(result, BaseException):
                    failures[task["rank"]] = result
                else:
                    ran.append(task["rank"])
                if bar is not None:
                    rows = result.get("rows", 0) if isinstance(result, dict) else 0
                    parts_done += len(plan.tasks[task["rank"]])
                    bar.update(rows)
                    bar.set_postfix_str(f"partitions {parts_done}/{parts_todo}, ranks {len(ran) + len(failures)}/"
                                        f"{len(todo)}, failed {len(failures)}")
        finally:
            if bar is not None:
                bar.close()
            if owned:
                backend.close()
    map_s = time.perf_counter() - t1
    run_info = {"plan_hash": plan.plan_hash, "backend": getattr(backend, "name", config.backend),
                "ranks_run": sorted(ran), "ranks_resumed": resumed, "ranks_failed": sorted(failures),
                "stages": {"plan_s": plan_s, "map_s": map_s if ran else None}}
    for rank, exc in sorted(failures.items()):  # name ranks whose worker died before writing errors/<rank>.json
        record_failure(plan, rank, type(exc).__name__, str(exc) or repr(exc), recorded_by="backend")
    storage.write_json(storage.join(config.result, RUN_NAME), run_info)
    t2 = time.perf_counter()
    summary = summarize(config.result, allow_failures=True)
    # Record the summarize stage too, so summary.json (and any later `summarize`) carries all three stages.
    run_info["stages"]["summarize_s"] = time.perf_counter() - t2
    summary["stages"] = dict(run_info["stages"])
    storage.write_json(storage.join(config.result, RUN_NAME), run_info)
    storage.write_json(storage.join(config.result, SUMMARY_NAME), summary)
    summary["ranks_run"], summary["ranks_resumed"] = len(ran), resumed
    if (report if report is not None else progress):
        print(format_report(summary))
    if not summary["completeness"]["complete"] and not config.allow_failures:
        raise IncompleteRunError(incomplete_message(summary))
    return summary


def _progress_bar(plan: Any, todo: list[dict]) -> Any:
    from tqdm import tqdm

    ranks = {t["rank"] for t in todo}
    rows = [p.get("rows") for r in ranks for p in plan.tasks[r]]
    total = None if any(r is None for r in rows) else sum(rows)
    return tqdm(total=total, unit="rows", desc=f"infer {len(plan.partitions)} partitions",
                file=sys.stderr, dynamic_ncols=True)


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
