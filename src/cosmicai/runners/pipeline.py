"""A whole run on one backend: plan -> backend.map(run_task) over the ranks not yet done -> summarize."""

from __future__ import annotations

import dataclasses
import os
import sys
import time
from typing import Any, Callable

from .. import storage
from ..config import URL_FIELDS, RunConfig, canonical_url, parse_task_timeout
from ..errors import CaiError
from ..pipeline.infer import check_fast_once, done_ranks, record_failure, run_task
from ..pipeline.lease import Lease, describe
from ..pipeline.report import format_report
from ..results import RunFolder, RunResult
from .registry import backend_options, make_backend as build_backend
from ..pipeline.plan import make_plan, plan_contents
from ..pipeline.summarize import IncompleteRunError, incomplete_message, summarize


def run(config: RunConfig, backend: Any = None, progress: bool = True, report: bool | None = None,
        make_backend: Callable[[RunConfig], Any] | None = None) -> dict[str, Any]:
    """Plan, run the missing ranks on a backend and summarize: ``backend`` (kept open), else the one
    ``make_backend(config)`` gives (its caller closes it), else a new one of ``config.backend``, closed at the end.
    The backend is built only when ranks remain to be done.

    Returns the summary (with ``stages`` and ``failures``); prints the report when ``report`` (default: same as
    ``progress``). Raises IncompleteRunError when ranks failed, unless ``config.allow_failures``.
    """
    config = canonical_config(config)
    if backend is not None:
        make_backend = lambda _config: backend  # noqa: E731
    if not config.endpoint:
        return _run(config, make_backend, progress, report)
    # Workers (spawned processes included) read the endpoint from the environment; restore it afterwards.
    before = os.environ.get("CAI_S3_ENDPOINT")
    os.environ["CAI_S3_ENDPOINT"] = config.endpoint
    try:
        return _run(config, make_backend, progress, report)
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
        url = RunFolder(config.result).plan
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


def _run(config: RunConfig, make_backend: Callable[[RunConfig], Any] | None, progress: bool, report: bool | None) -> dict[str, Any]:
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
        return _run_leased(config, make_backend, progress, report, contents)


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
        folder = RunFolder(config.result)
        summary_url = folder.summary
        if not storage.exists(summary_url) or not storage.exists(folder.plan):
            return None
        stored = storage.read_json(summary_url)
        if not isinstance(stored, dict) or not (stored.get("completeness") or {}).get("complete"):
            return None
    except CaiError:
        return None
    return stored if stored.get("plan_hash") == digest else None


def _run_leased(config: RunConfig, make_backend: Callable[[RunConfig], Any] | None, progress: bool, report: bool | None,
                contents: tuple[dict[str, Any], list[dict[str, Any]], str]) -> dict[str, Any]:
    t0 = time.perf_counter()
    plan = make_plan(config, contents)
    plan_s = time.perf_counter() - t0
    done = done_ranks(plan)
    todo = [t for t in plan.task_list() if t["rank"] not in done]
    resumed = len(plan.ranks) - len(todo)

    owned = make_backend is None
    backend = None
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
        if make_backend is None:
            backend = build_backend(config.backend, **backend_options(config))
        else:
            backend = make_backend(config)
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
    run_info = {"plan_hash": plan.plan_hash, "backend": getattr(backend, "name", None) or config.backend,
                "ranks_run": sorted(ran), "ranks_resumed": resumed, "ranks_failed": sorted(failures),
                "stages": {"plan_s": plan_s, "map_s": map_s if ran else None}}
    for rank, exc in sorted(failures.items()):  # name ranks whose worker died before writing errors/<rank>.json
        record_failure(plan, rank, type(exc).__name__, str(exc) or repr(exc), recorded_by="backend")
    storage.write_json(RunFolder(config.result).run, run_info)  # written once; summarize reads its stages
    summary = summarize(config.result, allow_failures=True)
    summary["ranks_run"], summary["ranks_resumed"] = len(ran), resumed
    if (report if report is not None else progress):
        print(format_report(summary))
    if not summary["completeness"]["complete"] and not config.allow_failures:
        raise IncompleteRunError(incomplete_message(summary))
    return summary


class PipelineRunner:
    """A ``backend`` entry as a runner: plan here, ``backend.map(run_task)`` over the ranks, summarize here. The
    backend is built on the first run that has ranks to do, from that run's options, and serves every later run
    until :meth:`close`."""

    def __init__(self, name: str):
        self.name, self.backend = name, None

    def _backend_for(self, config: RunConfig) -> Any:
        if self.backend is None:
            self.backend = build_backend(self.name, **backend_options(config))
        return self.backend

    def run(self, config: RunConfig | dict[str, Any], *, progress: bool = False, report: bool = False) -> RunResult:
        """Run ``config`` (a RunConfig, or a mapping :func:`config.load_config` accepts) here and on the backend."""
        from ..config import load_config

        if not isinstance(config, RunConfig):
            config, _ = load_config(dict(config), backend=self.name)
        elif config.backend != self.name:
            config = dataclasses.replace(config, backend=self.name)
        summary = run(config, make_backend=self._backend_for, progress=progress, report=report)
        return RunResult(summary.get("result_url") or config.result, summary)

    def close(self) -> None:
        if self.backend is not None:
            backend, self.backend = self.backend, None
            backend.close()

    def __enter__(self) -> "PipelineRunner":
        return self

    def __exit__(self, *exc: Any) -> None:
        self.close()


def _progress_bar(plan: Any, todo: list[dict]) -> Any:
    from tqdm import tqdm

    ranks = {t["rank"] for t in todo}
    rows = [p.get("rows") for r in ranks for p in plan.tasks[r]]
    total = None if any(r is None for r in rows) else sum(rows)
    return tqdm(total=total, unit="rows", desc=f"infer {len(plan.partitions)} partitions",
                file=sys.stderr, dynamic_ncols=True)
