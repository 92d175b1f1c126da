"""AWS Lambda handlers: thin wrappers over the pipeline's three stages (one image, three CMDs).

* ``initialize`` - ``load_config`` + ``make_plan``; returns a small state for the Distributed Map.
* ``infer``      - one Map item (an element of ``tasks.json``) -> ``run_task``; raises on failure so Step Functions
  Retry/Catch apply. ``{"action": "record_failure", ...}`` (the Catch) records the error in ``errors/<rank>.json``.
* ``summarize``  - ``summarize(result_url, allow_failures)``; returns a small status.

They trust nothing in an event that the plan does not say (:mod:`.trust`): Initialize accepts data, weights and
results only in the stack's locations and models only from the stack's list, before anything is read or imported;
infer runs an item only when it equals the one the plan wrote for its rank (``task_digests.txt``); every malformed
event is one ConfigError line, which Lambda returns as the invocation's errorType/errorMessage.

The model named by ``CAI_MODEL`` (weights ``CAI_WEIGHTS``, mode ``CAI_MODE``, inference threads ``CAI_THREADS``) is
loaded when this module is imported, i.e. during the Lambda INIT phase, and warm invocations reuse it. The image
(Dockerfile) is the torch-free worker install: it bakes in ``astromae-demo`` (weights and ONNX graph templates are
package data), so nothing is exported or cached at INIT. The stack's locations come from
``CAI_DATA_BUCKET``/``CAI_DATA_PREFIX``, ``CAI_RESULT_BUCKET``/``CAI_RESULT_PREFIX`` and
``CAI_WEIGHTS_BUCKET``/``CAI_WEIGHTS_PREFIX``, its extra models from ``CAI_ALLOWED_MODELS``; ``CAI_MAX_CONCURRENCY``,
``CAI_TOLERATED_FAILURE_PERCENTAGE`` and ``CAI_ALLOW_FAILURES`` are the Map defaults.
"""

from __future__ import annotations

import dataclasses
import json
import os
import time
from typing import Any

from ...errors import ConfigError
from . import trust

_INIT_STARTED = time.perf_counter()
_INVOCATIONS = 0
#: Execution settings an event may carry beside the run config (under the key "aws").
AWS_OPTIONS = ("max_concurrency", "tolerated_failure_percentage")


def _env_number(name: str, default: Any, kind: type = int) -> Any:
    raw = os.environ.get(name, "")
    try:
        return kind(raw) if raw.strip() else default
    except ValueError as exc:
        what = "an integer" if kind is int else "a number"
        raise ConfigError(f"environment {name}={raw!r} is not {what}") from exc


def _env_bool(name: str, default: bool) -> bool:
    raw = os.environ.get(name, "").strip().lower()
    return default if not raw else raw in ("1", "true", "yes", "on")


def warm_model() -> float | None:
    """Load ``CAI_MODEL`` into this worker's models (``WorkerModels``); returns the seconds it took."""
    name = os.environ.get("CAI_MODEL")
    if not name:
        return None
    from ...models.worker import worker_models

    models = worker_models()
    if os.environ.get("CAI_THREADS"):
        models.configure(_env_number("CAI_THREADS", 1))
    _, _, seconds = models.get(name, os.environ.get("CAI_WEIGHTS") or None, "cpu", os.environ.get("CAI_MODE", "exact"))
    return seconds


MODEL_LOAD_S = warm_model()
INIT_S = time.perf_counter() - _INIT_STARTED


def _run_config(event: Any) -> tuple[dict[str, Any], dict[str, Any], str | None]:
    """Split an Initialize event into (run config, aws options, execution name)."""
    event = trust.event_object(event, "Initialize")
    execution = None
    if "config" in event:
        trust.check_keys(event, ("config", "execution_name"), "Initialize")
        if "execution_name" in event:
            execution = trust.execution_name(event["execution_name"])
    config = event.get("config", event)
    if not isinstance(config, dict):
        raise ConfigError(f"Initialize event: the run config must be a JSON object, got {type(config).__name__}")
    config = dict(config)
    options = config.pop("aws", None) or {}
    if not isinstance(options, dict) or set(options) - set(AWS_OPTIONS):
        raise ConfigError(f"Initialize event: 'aws' must be an object with keys {list(AWS_OPTIONS)}, got {options!r}")
    return config, options, execution


def _map_settings(options: dict[str, Any]) -> tuple[int, float]:
    """(MaxConcurrency, ToleratedFailurePercentage) of the run: its 'aws' options, else the stack's defaults."""
    from ...lambda_limits import MAP_MAX_CHILDREN

    concurrency = options["max_concurrency"] if "max_concurrency" in options else _env_number("CAI_MAX_CONCURRENCY", 0)
    percent = options.get("tolerated_failure_percentage",
                          _env_number("CAI_TOLERATED_FAILURE_PERCENTAGE", 0.0, float))
    return (trust.integer_option(concurrency, "aws.max_concurrency", 0, MAP_MAX_CHILDREN),
            trust.number_option(percent, "aws.tolerated_failure_percentage", 0.0, 100.0))




def initialize(event: Any, context: Any = None) -> dict[str, Any]:
    """Plan the run and return the small state the Map needs (its items are read from tasks.json in S3).

    The data, weights and result must lie in the stack's locations and the model must be one of the stack's
    (:mod:`.trust`); both are checked before anything is read, imported or written."""
    from ...config import load_config
    from ...pipeline.plan import make_plan
    from ...results import RunFolder

    raw, options, execution = _run_config(event)
    concurrency, percent = _map_settings(options)
    overrides: dict[str, Any] = {}
    if "result" not in raw and "result_path" not in raw:
        place = trust.location("result")
        if place is None:
            raise ConfigError("Initialize event: no 'result' URL and no CAI_RESULT_BUCKET to put the run under")
        run_id = execution or time.strftime("run-%Y%m%dT%H%M%SZ", time.gmtime())
        overrides["result"] = trust.run_result_url(place.url, run_id)
    for key, var in (("model", "CAI_MODEL"), ("weights", "CAI_WEIGHTS"), ("mode", "CAI_MODE")):
        if key not in raw and os.environ.get(var):
            overrides[key] = os.environ[var]
    config, unused = load_config(raw, **overrides)
    trust.check_model(config.model)
    config = dataclasses.replace(config, result=trust.result_url(config.result), data=trust.data_url(config.data),
                                 weights=trust.weights_url(config.weights))
    bucket = config.result[len("s3://"):].partition("/")[0]
    plan = make_plan(config)
    return {"result_url": config.result, "plan_hash": plan.plan_hash, "tasks_bucket": bucket,
            "tasks_key": RunFolder(config.result).tasks[len(f"s3://{bucket}/"):], "num_tasks": len(plan.ranks),
            "partitions": len(plan.partitions), "world_size": plan.world_size,
            "max_concurrency": concurrency, "tolerated_failure_percentage": percent,
            "allow_failures": bool(config.allow_failures or _env_bool("CAI_ALLOW_FAILURES", False)),
            "unused_keys": unused}


#: The keys of a Map item (one element of tasks.json, :meth:`Plan.task_list`).
TASK_KEYS = ("result_url", "rank", "plan_hash", "task")
RECORD_FAILURE_KEYS = ("action", "result_url", "rank", "plan_hash", "error")


def _task_item(event: Any) -> dict[str, Any]:
    """The checked Map item of an infer event; its task is then verified against the plan's digest."""
    event = trust.event_object(event, "infer")
    trust.check_keys(event, TASK_KEYS, "infer")
    missing = [k for k in TASK_KEYS if k not in event]
    if missing:
        raise ConfigError(f"infer event must be a task item of tasks.json {{'result_url': URL, 'rank': int, "
                          f"'plan_hash': str, 'task': object}}; missing {', '.join(missing)}")
    item = dict(event)
    item["result_url"] = _run_url(event["result_url"])
    trust.rank_of(event["rank"])
    trust.plan_hash_of(event["plan_hash"])
    task = event["task"]
    if not isinstance(task, dict) or not isinstance(task.get("config"), dict) or not isinstance(
            task.get("partitions"), list):
        raise ConfigError("infer event: 'task' must be an object with 'config' and 'partitions'")
    _check_task_locations(task)
    return item


def _run_url(url: Any, field: str = "result_url") -> str:
    """A run folder named by an event: written exactly as the plan writes it, under the result location."""
    if not isinstance(url, str):
        raise ConfigError(f"{field} must be a string URL, got {type(url).__name__}")
    if trust.location("result") is None:
        return url
    canonical = trust.result_url(url, field)
    if canonical != url:
        raise ConfigError(f"{field}: {url!r} is not written as the plan writes it ({canonical})")
    return url


def _check_task_locations(task: dict[str, Any]) -> None:
    """The model, weights and partitions a task names are the stack's (no I/O: checked before anything is read)."""
    cfg = task["config"]
    trust.check_model(cfg.get("model"), "task.config.model")
    trust.weights_url(cfg.get("weights"), "task.config.weights")
    for i, part in enumerate(task["partitions"]):
        url = part.get("url") if isinstance(part, dict) else None
        if trust.location("data") is not None and trust.data_url(url, f"task.partitions[{i}].url") != url:
            raise ConfigError(f"task.partitions[{i}].url: {url!r} is not written as the plan writes it")


def infer(event: Any, context: Any = None) -> dict[str, Any]:
    """Run one rank (a Map item); raises on failure so the state machine's Retry and Catch apply.

    The item must be the one the plan wrote for its rank (checked against ``task_digests.txt``): partitions,
    config and model come from the plan only, and an item for a rank the plan does not have writes nothing."""
    global _INVOCATIONS
    if isinstance(event, dict) and event.get("action") == "record_failure":
        return record_failure(event)
    from ...pipeline.infer import run_task
    from ...pipeline.plan import verify_task_item

    item = _task_item(event)
    verify_task_item(item)
    rank = item["rank"]
    _INVOCATIONS += 1
    first = _INVOCATIONS == 1
    t0 = time.perf_counter()
    record = run_task(item["result_url"], rank, plan_hash=item["plan_hash"], task=item["task"])
    return {"rank": rank, "status": "ok", "rows": record.get("rows"), "seconds": round(time.perf_counter() - t0, 3),
            "container_first_invocation": first, "init_s": round(INIT_S, 3) if first else None,
            "plan_hash": record.get("plan_hash")}


def _error_details(error: Any) -> tuple[str, str]:
    """(error type, message) from a Catch's ``{"Error", "Cause"}``; the Cause of a Lambda error is its JSON payload."""
    if not isinstance(error, dict):
        return "Unknown", str(error)
    name, cause = str(error.get("Error", "Unknown")), error.get("Cause", "")
    try:
        payload = json.loads(cause) if isinstance(cause, str) and cause.startswith("{") else None
    except json.JSONDecodeError:
        payload = None
    if isinstance(payload, dict) and "errorMessage" in payload:
        return str(payload.get("errorType", name)), str(payload["errorMessage"])
    return name, str(cause)


def record_failure(event: Any) -> dict[str, Any]:
    """The Catch of a rank: keep the pipeline's ``errors/<rank>.json`` or, when the task died without writing one
    (timeout, out of memory), write it from the Step Functions error so Summarize names the rank.

    Only for a rank of the plan now under the result URL, and (when the event names one) of the same plan hash."""
    from ...pipeline.infer import record_failure as record_rank_failure
    from ...pipeline.plan import load_plan

    event = trust.event_object(event, "record_failure")
    trust.check_keys(event, RECORD_FAILURE_KEYS, "record_failure")
    if "result_url" not in event or "rank" not in event:
        raise ConfigError("record_failure event needs 'result_url' and 'rank'")
    result_url, rank = _run_url(event["result_url"]), trust.rank_of(event["rank"])
    plan = load_plan(result_url)
    if "plan_hash" in event and trust.plan_hash_of(event["plan_hash"]) != plan.plan_hash:
        raise ConfigError(f"{result_url}: the failure belongs to plan {event['plan_hash'][:12]} but the plan there "
                          f"is {plan.plan_hash[:12]}; nothing was recorded")
    if rank not in plan.ranks:
        raise ConfigError(f"{result_url}: rank {rank} is not in the plan (ranks {plan.ranks[0]}-{plan.ranks[-1]}); "
                          "nothing was recorded")
    error_type, message = _error_details(event.get("error"))
    out = record_rank_failure(plan, rank, error_type, message, "step-functions-catch")
    if "message" in out:
        out["message"] = out["message"][:500]
    if out.get("recorded_by") == "step-functions-catch":
        out["recorded_by"] = "catch"
    return out


def summarize(event: Any, context: Any = None) -> dict[str, Any]:
    """Gather the run; raises IncompleteRunError naming failed ranks unless ``allow_failures`` is true."""
    from ...results import RunFolder
    from ...pipeline.summarize import summarize as summarize_run

    event = trust.event_object(event, "Summarize")
    if "result_url" not in event:
        raise ConfigError(f"Summarize event needs 'result_url', got keys {sorted(map(str, event))}")
    result_url = _run_url(event["result_url"])
    allow = trust.bool_option(event.get("allow_failures", False), "allow_failures")
    summary = summarize_run(result_url, allow_failures=allow)
    comp = summary.get("completeness", {})
    out = {"result_url": result_url, "summary_url": RunFolder(result_url).summary,
           "complete": bool(comp.get("complete")), "failed_ranks": comp.get("failed_ranks", []),
           "missing_ranks": comp.get("missing_ranks", []), "rows_in": comp.get("rows_in"),
           "rows_out": comp.get("rows_out"), "samples_per_s": summary.get("samples_per_s")}
    if event.get("map_error"):
        out["map_error"] = event["map_error"]
    return out
