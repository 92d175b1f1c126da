"""The run config: a native JSON/YAML config or the original CAI payload (``demo input.json``).

Native keys are the fields of :class:`RunConfig`. The original payload (keys ``bucket``, ``file_limit``,
``batch_size``, ``object_type``, ``S3_object_name``, ``script``, ``result_path``, ``data_bucket``,
``data_prefix``, optional ``world_size``) is detected and mapped:

* ``data``   = ``s3://{data_bucket}/{data_prefix}``
* ``result`` = ``s3://{bucket}/{result_path}``

``script``, ``object_type`` and ``S3_object_name`` are accepted and reported as unused. For testing without S3,
``bucket_root`` (``cai run --bucket-root DIR``) maps every ``s3://BUCKET/...`` of a payload onto
``DIR/BUCKET/...``, and ``bucket_map`` (``{"cosmicai-data": "/data/cai"}``) maps single buckets onto any URL.

A run is identified by what it names, not how it is spelled: the local paths of ``data``, ``result`` and
``weights`` are made canonical when a config is loaded (``~`` and ``$VAR`` expanded as :func:`storage.expand`
does, made absolute with symbolic links resolved, ``.``/``..``/doubled slashes collapsed, a ``file://`` prefix
dropped), and ``s3://`` URLs
lose doubled slashes and ``.`` segments, so ``results``, ``./results/`` and ``/abs/path/results`` are one run.
"""

from __future__ import annotations

import dataclasses
import difflib
import json
import math
import os
from dataclasses import dataclass, field
from typing import Any

from .errors import ConfigError
from .models.modes import MODES

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
#: Fields holding a URL or path, made canonical on load (:func:`canonical_url`).
URL_FIELDS = ("data", "result", "weights")
#: The largest run config file read, in bytes (a run config is a few hundred bytes).
MAX_CONFIG_BYTES = 1 << 20
#: How deeply a run config may nest, and how many values it may hold (YAML aliases counted each time they are used).
MAX_CONFIG_DEPTH = 32
MAX_CONFIG_NODES = 100_000
#: ``task_timeout`` values meaning "no timeout", besides 0.
NO_TIMEOUT = ("none", "off")


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
    allow_unsafe_lease: bool = False
    #: Seconds a rank may run before it is failed and its worker killed: "auto" (derived from the measured time
    #: per row, see backends.base.TaskTimeouts), a number > 0, or 0 for no timeout.
    task_timeout: float | str = "auto"
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
_BOOL_FIELDS = ("allow_failures", "drop_nonfinite", "prefetch", "overwrite", "break_lease", "allow_unsafe_lease")
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
    _check_shape(raw, origin)
    _check_shape(overrides, "overrides")
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
    raw = _parse(origin, _read_bounded(origin))
    if not isinstance(raw, dict):
        raise ConfigError(f"{origin}: a run config must be a JSON object, got {type(raw).__name__}")
    _check_shape(raw, origin)
    return raw


def _read_bounded(origin: str) -> bytes:
    """The config file's bytes; a file over :data:`MAX_CONFIG_BYTES` is refused before it is read."""
    from . import storage
    from .errors import StorageError

    limit = f"{MAX_CONFIG_BYTES // 1024} KiB"
    try:
        size = storage.size(origin)
        if size is not None and size > MAX_CONFIG_BYTES:
            raise ConfigError(f"{origin}: {size} bytes is too large for a run config (at most {limit})")
        text = storage.read_bytes(origin)
    except StorageError as exc:
        raise ConfigError(f"cannot read run config {origin}: {exc}") from exc
    if len(text) > MAX_CONFIG_BYTES:  # grew after the size check
        raise ConfigError(f"{origin}: {len(text)} bytes is too large for a run config (at most {limit})")
    return text


def _parse(origin: str, text: bytes) -> Any:
    too_deep = f"{origin}: nested too deeply to be a run config (at most {MAX_CONFIG_DEPTH} levels)"
    if origin.endswith((".yaml", ".yml")):
        try:
            import yaml
        except ImportError as exc:
            raise ConfigError(f"{origin}: reading YAML needs PyYAML (pip install pyyaml); or use JSON") from exc
        try:
            return yaml.safe_load(text)
        except RecursionError:
            raise ConfigError(too_deep) from None
        except yaml.YAMLError as exc:
            raise ConfigError(f"{origin}: not valid YAML ({_one_line(exc)})") from exc
    try:
        return json.loads(text)
    except RecursionError:
        raise ConfigError(too_deep) from None
    except (UnicodeDecodeError, json.JSONDecodeError) as exc:
        raise ConfigError(f"{origin}: not valid JSON ({exc})") from exc


def _one_line(exc: BaseException) -> str:
    return " ".join(str(exc).split())


def _check_shape(raw: Any, origin: str) -> None:
    """Refuse configs nested deeper than :data:`MAX_CONFIG_DEPTH` or holding more than :data:`MAX_CONFIG_NODES`
    values (a YAML alias counts every time it is used, so an alias bomb is refused before anything copies it)."""
    stack: list[tuple[Any, int]] = [(raw, 1)]
    nodes = 0
    while stack:
        value, depth = stack.pop()
        nodes += 1
        if nodes > MAX_CONFIG_NODES:
            raise ConfigError(f"{origin}: holds more than {MAX_CONFIG_NODES} values, too many for a run config")
        if depth > MAX_CONFIG_DEPTH:
            raise ConfigError(f"{origin}: nested too deeply to be a run config (at most {MAX_CONFIG_DEPTH} levels)")
        if isinstance(value, dict):
            stack.extend((v, depth + 1) for v in value.values())
        elif isinstance(value, list):
            stack.extend((v, depth + 1) for v in value)


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
    if "task_timeout" in values:
        values["task_timeout"] = parse_task_timeout(values["task_timeout"], origin)
    for key in URL_FIELDS:
        if values.get(key):
            values[key] = canonical_url(values[key], key)
    return RunConfig(**values)


def parse_task_timeout(value: Any, origin: str = "config") -> float | str:
    """``"auto"``, seconds > 0 as a float, or 0.0 for no timeout (from 0, ``"none"``, ``"off"`` or null)."""
    if value is None:
        return 0.0
    text = value.strip().lower() if isinstance(value, str) else None
    if text == "auto":
        return "auto"
    if text in NO_TIMEOUT:
        return 0.0
    seconds: Any = value
    if text is not None:
        try:
            seconds = float(text)
        except ValueError:
            seconds = None
    if isinstance(seconds, bool) or not isinstance(seconds, (int, float)) or not math.isfinite(seconds) \
            or seconds < 0:
        raise ConfigError(f"{origin}: 'task_timeout' must be seconds > 0, 0 or 'none' (no timeout), or 'auto' "
                          f"(derived from the measured time per row), got {value!r}")
    return float(seconds)


def canonical_url(url: str, field: str = "url") -> str:
    """The one spelling of a location, so a run is the same run however its paths are written.

    Local paths and ``file://`` URLs: ``~`` and ``$VAR`` expanded (as :func:`storage.expand`), made absolute
    against the current folder with symbolic links resolved (``os.path.realpath``: a folder reached through a
    link is the folder itself), ``.``, ``..`` and doubled slashes collapsed, trailing slash and ``file://``
    dropped. ``s3://`` URLs: doubled slashes and ``.`` segments collapsed, trailing slash dropped; a ``..``
    segment, which S3 keeps as a literal key part, is refused. Other URLs lose a trailing slash only."""
    from . import storage
    from .errors import StorageError

    try:
        url = storage.expand(url)
    except StorageError as exc:
        raise ConfigError(f"{field}: {exc}") from exc
    if storage.is_remote(url):
        proto, rest = url.split("://", 1)
        if proto not in ("s3", "s3a"):
            return f"{proto}://{rest.rstrip('/')}" if rest.rstrip("/") else url
        bucket, _, key = rest.partition("/")
        parts = [p for p in key.split("/") if p not in ("", ".")]
        if ".." in parts:
            raise ConfigError(f"{field}: {url} has a '..' segment, which S3 keeps as part of the key name; "
                              "write the URL without it")
        return f"{proto}://{'/'.join([bucket, *parts])}"
    for proto in ("file://", "local://"):
        if url.startswith(proto):
            url = url[len(proto):]
    return os.path.realpath(url)
