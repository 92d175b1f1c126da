"""AWS Lambda handlers: thin wrappers over the pipeline's three stages (one image, three CMDs).

* ``initialize`` - ``load_config`` + ``make_plan``; returns a small state for the Distributed Map.
* ``infer``      - one Map item ``{"result_url", "rank"}`` -> ``run_task``; raises on failure so Step Functions
  Retry/Catch apply. ``{"action": "record_failure", ...}`` (the Catch) records the error in ``errors/<rank>.json``.
* ``summarize``  - ``summarize(result_url, allow_failures)``; returns a small status.

The model named by ``CAI_MODEL`` (weights ``CAI_WEIGHTS``, mode ``CAI_MODE``, inference threads ``CAI_THREADS``) is
loaded when this module is imported, i.e. during the Lambda INIT phase, and warm invocations reuse it. The image
(Dockerfile) is the torch-free worker install: it bakes in ``astromae-demo`` (weights and ONNX graph templates are
package data), so nothing is exported or cached at INIT. The stack's locations come from
``CAI_DATA_BUCKET``/``CAI_DATA_PREFIX`` and ``CAI_RESULT_BUCKET``/``CAI_RESULT_PREFIX``; ``CAI_MAX_CONCURRENCY``,
``CAI_TOLERATED_FAILURE_PERCENTAGE`` and ``CAI_ALLOW_FAILURES`` are the Map defaults.
"""

from __future__ import annotations

import json
import os
import time
from typing import Any

from ...errors import ConfigError

_INIT_STARTED = time.perf_counter()
_INVOCATIONS = 0
#: Execution settings an event may carry beside the run config (under the key "aws").
AWS_OPTIONS = ("max_concurrency", "tolerated_failure_percentage")


def _env_int(name: str, default: int) -> int:
    raw = os.environ.get(name, "")
    try:
        return int(raw) if raw.strip() else default
    except ValueError as exc:
        raise ConfigError(f"environment {name}={raw!r} is not an integer") from exc


def _env_bool(name: str, default: bool) -> bool:
    raw = os.environ.get(name, "").strip().lower()
    return default if not raw else raw in ("1", "true", "yes", "on")


def warm_model() -> float | None:
    """Load ``CAI_MODEL`` into the pipeline's per-process model cache; returns the seconds it took."""
    name = os.environ.get("CAI_MODEL")
    if not name:
        return None
    from ...pipeline.infer import configure_worker, get_model

    if os.environ.get("CAI_THREADS"):
        configure_worker(_env_int("CAI_THREADS", 1))
    _, _, seconds = get_model(name, os.environ.get("CAI_WEIGHTS") or None, "cpu", os.environ.get("CAI_MODE", "exact"))
    return seconds


MODEL_LOAD_S = warm_model()
INIT_S = time.perf_counter() - _INIT_STARTED


def _split_s3(url: str) -> tuple[str, str]:
    if not url.startswith("s3://"):
        raise ConfigError(f"result: the AWS backend needs an s3:// result URL (the Map reads tasks.json from S3), got {url!r}")
    bucket, _, key = url[len("s3://"):].partition("/")
    return bucket, key.strip("/")


def _inside(url: str, bucket_var: str, prefix_var: str) -> bool:
    bucket = os.environ.get(bucket_var)
    if not bucket:
        return True
    prefix = os.environ.get(prefix_var, "").strip("/")
    b, key = _split_s3(url) if url.startswith("s3://") else ("", url)
    return b == bucket and (not prefix or key == prefix or key.startswith(prefix + "/"))


def _location(bucket_var: str, prefix_var: str) -> str:
    prefix = os.environ.get(prefix_var, "").strip("/")
    return f"s3://{os.environ.get(bucket_var)}/{prefix}".rstrip("/")


def _run_config(event: dict[str, Any]) -> tuple[dict[str, Any], dict[str, Any], str | None]:
    """Split an Initialize event into (run config, aws options, execution name)."""
    config = event.get("config", event)
    if not isinstance(config, dict):
        raise ConfigError(f"Initialize event: the run config must be a JSON object, got {type(config).__name__}")
    config = dict(config)
    options = config.pop("aws", None) or {}
    if not isinstance(options, dict) or set(options) - set(AWS_OPTIONS):
        raise ConfigError(f"Initialize event: 'aws' must be an object with keys {list(AWS_OPTIONS)}, got {options!r}")
    return config, options, event.get("execution_name") if "config" in event else None


def initialize(event: dict[str, Any], context: Any = None) -> dict[str, Any]:
    """Plan the run and return the small state the Map needs (its items are read from tasks.json in S3)."""
    from ...config import load_config
    from ...pipeline.plan import make_plan
    from ...results import TASKS_NAME

    raw, options, execution = _run_config(event)
    overrides: dict[str, Any] = {}
    if "result" not in raw and "result_path" not in raw:
        if not os.environ.get("CAI_RESULT_BUCKET"):
            raise ConfigError("Initialize event: no 'result' URL and no CAI_RESULT_BUCKET to put the run under")
        run_id = execution or time.strftime("run-%Y%m%dT%H%M%SZ", time.gmtime())
        overrides["result"] = f"{_location('CAI_RESULT_BUCKET', 'CAI_RESULT_PREFIX')}/{run_id}"
    for key, var in (("model", "CAI_MODEL"), ("weights", "CAI_WEIGHTS"), ("mode", "CAI_MODE")):
        if key not in raw and os.environ.get(var):
            overrides[key] = os.environ[var]
    config, unused = load_config(raw, **overrides)
    bucket, key = _split_s3(config.result)
    if not _inside(config.result, "CAI_RESULT_BUCKET", "CAI_RESULT_PREFIX"):
        raise ConfigError(f"result: {config.result} is outside this stack's result location "
                          f"{_location('CAI_RESULT_BUCKET', 'CAI_RESULT_PREFIX')}/ (the only place its IAM role may write)")
    if not _inside(config.data, "CAI_DATA_BUCKET", "CAI_DATA_PREFIX"):
        raise ConfigError(f"data: {config.data} is outside this stack's data location "
                          f"{_location('CAI_DATA_BUCKET', 'CAI_DATA_PREFIX')}/ (the only place its IAM role may read)")
    plan = make_plan(config)
    percent = float(options.get("tolerated_failure_percentage",
                                os.environ.get("CAI_TOLERATED_FAILURE_PERCENTAGE") or 0))
    if not 0.0 <= percent <= 100.0:
        raise ConfigError(f"aws.tolerated_failure_percentage must be within 0-100, got {percent}")
    concurrency = int(options.get("max_concurrency", _env_int("CAI_MAX_CONCURRENCY", 0)))
    if concurrency < 0:
        raise ConfigError(f"aws.max_concurrency must be >= 0 (0 = no limit), got {concurrency}")
    return {"result_url": config.result, "plan_hash": plan.plan_hash, "tasks_bucket": bucket,
            "tasks_key": f"{key}/{TASKS_NAME}" if key else TASKS_NAME, "num_tasks": len(plan.ranks),
            "partitions": len(plan.partitions), "world_size": plan.world_size,
            "max_concurrency": concurrency, "tolerated_failure_percentage": percent,
            "allow_failures": bool(config.allow_failures or _env_bool("CAI_ALLOW_FAILURES", False)),
            "unused_keys": unused}


def _task(event: dict[str, Any]) -> tuple[str, int]:
    try:
        result_url, rank = event["result_url"], int(event["rank"])
    except (KeyError, TypeError, ValueError) as exc:
        raise ConfigError(f"infer event must be {{'result_url': URL, 'rank': int}}, got {event!r}") from exc
    return result_url, rank


def infer(event: dict[str, Any], context: Any = None) -> dict[str, Any]:
    """Run one rank (a Map item); raises on failure so the state machine's Retry and Catch apply."""
    global _INVOCATIONS
    if event.get("action") == "record_failure":
        return record_failure(event)
    from ...pipeline.infer import run_task

    result_url, rank = _task(event)
    _INVOCATIONS += 1
    first = _INVOCATIONS == 1
    t0 = time.perf_counter()
    record = run_task(result_url, rank, plan_hash=event.get("plan_hash"), task=event.get("task"))
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


def record_failure(event: dict[str, Any]) -> dict[str, Any]:
    """The Catch of a rank: keep the pipeline's ``errors/<rank>.json`` or, when the task died without writing one
    (timeout, out of memory), write it from the Step Functions error so Summarize names the rank."""
    from ...pipeline.infer import record_failure as record_rank_failure
    from ...pipeline.plan import load_plan

    result_url, rank = _task(event)
    error_type, message = _error_details(event.get("error"))
    out = record_rank_failure(load_plan(result_url), rank, error_type, message, "step-functions-catch")
    if "message" in out:
        out["message"] = out["message"][:500]
    if out.get("recorded_by") == "step-functions-catch":
        out["recorded_by"] = "catch"
    return out


def summarize(event: dict[str, Any], context: Any = None) -> dict[str, Any]:
    """Gather the run; raises IncompleteRunError naming failed ranks unless ``allow_failures`` is true."""
    from ...results import SUMMARY_NAME
    from ...pipeline.summarize import summarize as summarize_run
    from ... import storage

    if not isinstance(event.get("result_url"), str):
        raise ConfigError(f"Summarize event needs 'result_url', got keys {sorted(event)}")
    summary = summarize_run(event["result_url"], allow_failures=bool(event.get("allow_failures", False)))
    comp = summary.get("completeness", {})
    out = {"result_url": event["result_url"], "summary_url": storage.join(event["result_url"], SUMMARY_NAME),
           "complete": bool(comp.get("complete")), "failed_ranks": comp.get("failed_ranks", []),
           "missing_ranks": comp.get("missing_ranks", []), "rows_in": comp.get("rows_in"),
           "rows_out": comp.get("rows_out"), "samples_per_s": summary.get("samples_per_s")}
    if event.get("map_error"):
        out["map_error"] = event["map_error"]
    return out
