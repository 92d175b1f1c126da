"""The run config: a native JSON/YAML config or the original CAI payload (``demo input.json``).

Native keys are the fields of :class:`RunConfig`. The original payload (keys ``bucket``, ``file_limit``,
``batch_size``, ``object_type``, ``S3_object_name``, ``script``, ``result_path``, ``data_bucket``,
``data_prefix``, optional ``world_size``) is detected and mapped:

* ``data``   = ``s3://{data_bucket}/{data_prefix}``
* ``result`` = ``s3://{bucket}/{result_path}``

``script``, ``object_type`` and ``S3_object_name`` are accepted and reported as unused. For testing without S3,
``bucket_root`` (``cai run --bucket-root DIR``) maps every ``s3://BUCKET/...`` of a payload onto
``DIR/BUCKET/...``, and ``bucket_map`` (``{"cosmicai-data": "/data/cai"}``) maps single buckets onto any URL.
"""

from __future__ import annotations

import dataclasses
import difflib
import json
import os
from dataclasses import dataclass, field
from typing import Any

from .errors import ConfigError

MODES = ("exact", "fast")
LEGACY_KEYS = ("bucket", "file_limit", "batch_size", "object_type", "S3_object_name", "script", "result_path",
               "data_bucket", "data_prefix", "world_size")
LEGACY_UNUSED = ("object_type", "S3_object_name", "script")
#: Keys that only steer how a config is read, not the run itself.
LOADER_KEYS = ("bucket_root", "bucket_map")
#: Config fields that change what a run computes; only these enter the plan (and its hash).
PLAN_FIELDS = ("data", "result", "model", "weights", "batch_size", "file_limit", "world_size", "mode", "device",
               "drop_nonfinite", "fast_guard")
#: What a fast-mode run does when fast and exact disagree on its weights (cosmicai.models.guard).
FAST_GUARDS = ("fallback", "strict", "off")


@dataclass
class RunConfig:
    """Everything one run needs. See docs/pipeline.md for each field."""

    data: str
    result: str
    model: str = "astromae-demo"
    weights: str | None = None
    batch_size: int = 512
    file_limit: int | None = None
    world_size: int | None = None
    mode: str = "exact"
    fast_guard: str = "fallback"
    device: str = "cpu"
    workers: int | None = None
    threads: int | None = None
    backend: str = "local"
    allow_failures: bool = False
    drop_nonfinite: bool = False
    prefetch: bool = True
    overwrite: bool = False
    break_lease: bool = False
    scheduler: str | None = None
    endpoint: str | None = None
    backend_options: dict[str, Any] = field(default_factory=dict)

    def plan_dict(self) -> dict[str, Any]:
        """The fields that define the plan (workers, threads, backend... may change between resumes)."""
        return {k: getattr(self, k) for k in PLAN_FIELDS}

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)


FIELDS = tuple(f.name for f in dataclasses.fields(RunConfig))
_INT_FIELDS = {"batch_size": 1, "file_limit": 1, "world_size": 1, "workers": 1, "threads": 1}
_BOOL_FIELDS = ("allow_failures", "drop_nonfinite", "prefetch", "overwrite", "break_lease")
_STR_FIELDS = ("data", "result", "model", "weights", "mode", "fast_guard", "device", "backend", "scheduler", "endpoint")


def is_legacy_payload(raw: dict[str, Any]) -> bool:
    """True for the original CAI payload (it names ``data_bucket``/``data_prefix`` or ``bucket``+``result_path``)."""
    return "data_bucket" in raw or "data_prefix" in raw or ("bucket" in raw and "result_path" in raw)


def load_config(source: str | dict[str, Any] | None = None, **overrides: Any) -> tuple[RunConfig, list[str]]:
    """Read a run config (file path/URL, dict, or None) and apply ``overrides`` (None values are ignored).

    Returns the validated config and the keys that were accepted but are not used (legacy payload keys).
    Raises ConfigError naming the file or key at fault.
    """
    origin = "config"
    if source is None:
        raw: dict[str, Any] = {}
    elif isinstance(source, dict):
        raw = dict(source)
    else:
        origin = str(source)
        raw = _read_source(origin)
    overrides = {k: v for k, v in overrides.items() if v is not None}
    bucket_root = overrides.pop("bucket_root", None) or raw.pop("bucket_root", None)
    bucket_map: dict[str, str] = {}
    for given in (raw.pop("bucket_map", None), overrides.pop("bucket_map", None)):
        if given is not None and not isinstance(given, dict):
            raise ConfigError(f"bucket_map: expected a mapping of bucket name -> URL, got {type(given).__name__}")
        bucket_map.update(given or {})

    unused: list[str] = []
    if is_legacy_payload(raw):
        values, unused = _map_legacy(raw, origin)
    else:
        _check_keys(raw, FIELDS, origin)
        values = dict(raw)
    _check_keys(overrides, FIELDS, "overrides")
    values.update(overrides)
    for key in ("data", "result"):
        if isinstance(values.get(key), str):
            values[key] = _map_bucket(values[key], bucket_root, bucket_map)
    return _build(values, origin), unused


def _read_source(origin: str) -> dict[str, Any]:
    from . import storage
    from .errors import StorageError

    try:
        text = storage.read_bytes(origin)
    except StorageError as exc:
        raise ConfigError(f"cannot read run config {origin}: {exc}") from exc
    if origin.endswith((".yaml", ".yml")):
        try:
            import yaml
        except ImportError as exc:
            raise ConfigError(f"{origin}: reading YAML needs PyYAML (pip install pyyaml); or use JSON") from exc
        try:
            raw = yaml.safe_load(text)
        except yaml.YAMLError as exc:
            raise ConfigError(f"{origin}: not valid YAML ({exc})") from exc
    else:
        try:
            raw = json.loads(text)
        except (UnicodeDecodeError, json.JSONDecodeError) as exc:
            raise ConfigError(f"{origin}: not valid JSON ({exc})") from exc
    if not isinstance(raw, dict):
        raise ConfigError(f"{origin}: a run config must be a JSON object, got {type(raw).__name__}")
    return raw


def _check_keys(raw: dict[str, Any], known: tuple[str, ...], origin: str) -> None:
    for key in raw:
        if key not in known:
            close = difflib.get_close_matches(str(key), list(known) + list(LEGACY_KEYS), n=1, cutoff=0.6)
            hint = f"; did you mean '{close[0]}'?" if close else f"; known keys: {', '.join(known)}"
            raise ConfigError(f"{origin}: unknown key '{key}'{hint}")


def _map_legacy(raw: dict[str, Any], origin: str) -> tuple[dict[str, Any], list[str]]:
    _check_keys(raw, LEGACY_KEYS + FIELDS, origin)
    for key in ("data_bucket", "data_prefix", "bucket", "result_path"):
        if key in raw and (not isinstance(raw[key], str) or not raw[key].strip()):
            raise ConfigError(f"{origin}: payload key '{key}' must be a non-empty string, got {raw[key]!r}")
    if "data_bucket" not in raw or "data_prefix" not in raw:
        missing = [k for k in ("data_bucket", "data_prefix") if k not in raw]
        raise ConfigError(f"{origin}: no data path: the CAI payload lacks {missing} (data = s3://data_bucket/data_prefix)")
    values: dict[str, Any] = {k: v for k, v in raw.items() if k in FIELDS and k not in LEGACY_KEYS}
    values["data"] = f"s3://{raw['data_bucket']}/{raw['data_prefix'].strip('/')}"
    if "bucket" in raw and "result_path" in raw:
        values["result"] = f"s3://{raw['bucket']}/{raw['result_path'].strip('/')}"
    for key in ("file_limit", "batch_size", "world_size"):
        if key in raw:
            values[key] = raw[key]
    unused = [k for k in LEGACY_UNUSED if k in raw]
    return values, unused


def _map_bucket(url: str, bucket_root: str | None, bucket_map: dict[str, str]) -> str:
    if not url.startswith("s3://"):
        return url
    bucket, _, rest = url[len("s3://"):].partition("/")
    if bucket in bucket_map:
        base = str(bucket_map[bucket])
    elif bucket_root:
        base = os.path.join(str(bucket_root), bucket)
    else:
        return url
    return base.rstrip("/") + ("/" + rest if rest else "")


def _to_int(key: str, value: Any, origin: str) -> int | None:
    if value is None:
        return None
    if isinstance(value, bool):
        raise ConfigError(f"{origin}: '{key}' must be an integer, got {value!r}")
    if isinstance(value, str):
        try:
            value = int(value.strip())
        except ValueError as exc:
            raise ConfigError(f"{origin}: '{key}' must be an integer, got {value!r}") from exc
    if isinstance(value, float) and value.is_integer():
        value = int(value)
    if not isinstance(value, int):
        raise ConfigError(f"{origin}: '{key}' must be an integer, got {value!r}")
    if value < _INT_FIELDS[key]:
        raise ConfigError(f"{origin}: '{key}' must be >= {_INT_FIELDS[key]}, got {value}")
    return value


def _build(values: dict[str, Any], origin: str) -> RunConfig:
    if not values.get("data"):
        raise ConfigError(f"{origin}: no data path: set 'data' (cai run --data URL) to the dataset folder")
    if not values.get("result"):
        raise ConfigError(f"{origin}: no result path: set 'result' (cai run --result URL) for the outputs")
    for key in _INT_FIELDS:
        if key in values:
            values[key] = _to_int(key, values[key], origin)
    if values.get("batch_size") is None:
        values.pop("batch_size", None)
    for key in _BOOL_FIELDS:
        if key in values and not isinstance(values[key], bool):
            raise ConfigError(f"{origin}: '{key}' must be true or false, got {values[key]!r}")
    for key in _STR_FIELDS:
        if values.get(key) is not None and not isinstance(values[key], str):
            raise ConfigError(f"{origin}: '{key}' must be a string, got {values[key]!r}")
    if values.get("mode", "exact") not in MODES:
        raise ConfigError(f"{origin}: 'mode' must be one of {'|'.join(MODES)}, got {values['mode']!r}")
    if values.get("fast_guard", "fallback") not in FAST_GUARDS:
        raise ConfigError(f"{origin}: 'fast_guard' must be one of {'|'.join(FAST_GUARDS)}, "
                          f"got {values['fast_guard']!r}")
    if "backend_options" in values and not isinstance(values["backend_options"], dict):
        raise ConfigError(f"{origin}: 'backend_options' must be an object")
    backend = values.get("backend", "local")
    if values.get("scheduler") and backend != "dask":
        raise ConfigError(f"{origin}: 'scheduler' ({values['scheduler']!r}) applies only to the dask backend, but the "
                          f"backend is {backend!r}: add --backend dask, or drop --scheduler")
    for key in ("data", "result"):
        values[key] = normalize_url(values[key])
    return RunConfig(**values)


def normalize_url(url: str) -> str:
    """One spelling per location: trailing slashes dropped, ``.``/``..`` and doubled slashes collapsed in local
    paths, so ``res/`` and ``res`` name the same run."""
    if "://" in url:
        proto, rest = url.split("://", 1)
        return f"{proto}://{rest.rstrip('/')}" if rest.rstrip("/") else url
    return os.path.normpath(url) if url else url
