"""What the Lambda handlers accept from an event: the stack's locations, its models, well-formed values.

A deployed stack names its locations in the functions' environment: ``CAI_DATA_BUCKET``/``CAI_DATA_PREFIX``
(datasets, read only), ``CAI_RESULT_BUCKET``/``CAI_RESULT_PREFIX`` (runs, one folder each) and optionally
``CAI_WEIGHTS_BUCKET``/``CAI_WEIGHTS_PREFIX`` (weights files; weights may also lie under the data location).
Its models are the built-in names, ``CAI_MODEL`` and the names in ``CAI_ALLOWED_MODELS`` (comma separated), all
set at deploy time: an event never names a module to import. A location whose bucket variable is unset is not
checked (the handlers called outside a stack, e.g. in tests).

URLs are made canonical before they are compared: ``.`` segments and doubled slashes are dropped and ``..``
removes the segment before it, so ``s3://b/data/../other`` is ``s3://b/other``; a percent-escape, a control
character, a ``..`` above the bucket or a malformed bucket name is refused rather than guessed at.
"""

from __future__ import annotations

import math
import os
import re
from dataclasses import dataclass
from typing import Any

from ...errors import ConfigError

#: Step Functions execution names the handlers accept (also a run's folder name): what ``cai aws run`` makes.
EXECUTION_NAME_RE = re.compile(r"^[A-Za-z0-9_-]{1,80}$")
#: S3 bucket names (3-63 lower-case letters, digits, dots and hyphens, starting and ending alphanumeric).
_BUCKET_RE = re.compile(r"^[a-z0-9][a-z0-9.-]{1,61}[a-z0-9]$")
_ESCAPE_RE = re.compile(r"%[0-9A-Fa-f]{2}")
_CONTROL_RE = re.compile(r"[\x00-\x1f\x7f]")
#: Where the state machine's ResultWriter puts the Map's outputs, under the result prefix: never a run's folder.
MAP_RUNS_DIR = "_map-runs"
_SHA256_RE = re.compile(r"^[0-9a-f]{64}$")


def canonical_s3(url: Any, field: str) -> str:
    """``url`` as ``s3://bucket/key`` with ``.``, ``//`` and ``..`` resolved; ConfigError naming ``field`` when it
    is not an s3:// URL or cannot be read one way only (percent-escapes, control characters, ``..`` above the
    bucket)."""
    if not isinstance(url, str):
        raise ConfigError(f"{field}: expected an s3:// URL string, got {type(url).__name__}")
    if _CONTROL_RE.search(url):
        raise ConfigError(f"{field}: {url!r} holds a control character")
    if not url.startswith("s3://"):
        raise ConfigError(f"{field}: {url!r} is not an s3:// URL (this stack reads and writes S3 only)")
    if _ESCAPE_RE.search(url):
        raise ConfigError(f"{field}: {url!r} holds a percent-escape, which S3 keys may or may not mean decoded; "
                          "write the characters themselves")
    bucket, _, key = url[len("s3://"):].partition("/")
    if not _BUCKET_RE.match(bucket) or ".." in bucket:
        raise ConfigError(f"{field}: {url!r} does not name a valid S3 bucket ({bucket!r})")
    parts: list[str] = []
    for segment in key.split("/"):
        if segment in ("", "."):
            continue
        if segment == "..":
            if not parts:
                raise ConfigError(f"{field}: {url!r} climbs above its bucket with '..'")
            parts.pop()
        else:
            parts.append(segment)
    return f"s3://{bucket}/{'/'.join(parts)}" if parts else f"s3://{bucket}"


@dataclass(frozen=True)
class Location:
    """A bucket and key prefix of the stack ('' = the whole bucket)."""

    what: str
    bucket: str
    prefix: str

    @property
    def url(self) -> str:
        return f"s3://{self.bucket}/{self.prefix}/" if self.prefix else f"s3://{self.bucket}/"

    def key_of(self, canonical: str) -> str | None:
        """The part of ``canonical`` below this location ('' for the location itself), or None when outside."""
        bucket, _, key = canonical[len("s3://"):].partition("/")
        if bucket != self.bucket:
            return None
        if not self.prefix:
            return key
        if key == self.prefix:
            return ""
        return key[len(self.prefix) + 1:] if key.startswith(self.prefix + "/") else None


def location(what: str) -> Location | None:
    """The stack's ``what`` location ("data", "result" or "weights") from the environment, or None when unset."""
    bucket = os.environ.get(f"CAI_{what.upper()}_BUCKET", "").strip()
    if not bucket:
        return None
    raw_prefix = os.environ.get(f"CAI_{what.upper()}_PREFIX", "").strip().strip("/")
    canonical = canonical_s3(f"s3://{bucket}/{raw_prefix}", f"CAI_{what.upper()}_BUCKET/PREFIX")
    return Location(what, bucket, canonical[len(f"s3://{bucket}"):].lstrip("/"))


def run_result_url(location_url: str, run_name: str) -> str:
    """An AWS run's result URL when its config names none: the stack's result location, then the run's name (the
    execution's). Used by the runner that starts the execution and by the Initialize function alike."""
    return location_url.rstrip("/") + "/" + run_name


def _outside(field: str, url: str, canonical: str, places: list[Location]) -> ConfigError:
    spelled = f" (read as {canonical})" if canonical != url else ""
    where = " or ".join(p.url for p in places)
    kind = "may write" if places[0].what == "result" else "may read"
    return ConfigError(f"{field}: {url}{spelled} is outside this stack's {places[0].what} location {where} "
                       f"(the only place its functions {kind})")


def data_url(url: Any, field: str = "data") -> str:
    """``url`` made canonical and checked to lie under the stack's data location (unchecked when none is set)."""
    place = location("data")
    if place is None:
        return url
    canonical = canonical_s3(url, field)
    if place.key_of(canonical) is None:
        raise _outside(field, url, canonical, [place])
    return canonical


def result_url(url: Any, field: str = "result") -> str:
    """``url`` made canonical and checked to be a run folder below the stack's result location."""
    place = location("result")
    if place is None:
        if not isinstance(url, str) or not url.startswith("s3://"):
            raise ConfigError(f"{field}: the AWS backend needs an s3:// result URL (the Map reads tasks.json from "
                              f"S3), got {url!r}")
        return url
    canonical = canonical_s3(url, field)
    below = place.key_of(canonical)
    if below is None:
        raise _outside(field, url, canonical, [place])
    if not below:
        raise ConfigError(f"{field}: {url} is the stack's result location itself; a run needs its own folder "
                          f"below it, e.g. {place.url}my-run")
    if below.split("/")[0] == MAP_RUNS_DIR:
        raise ConfigError(f"{field}: {url} lies in {place.url}{MAP_RUNS_DIR}/, where the state machine keeps the "
                          "Map's outputs; choose another run folder")
    return canonical


def weights_url(url: Any, field: str = "weights") -> str | None:
    """Weights (None: the model's own) under the data or weights location, or the stack's own ``CAI_WEIGHTS``;
    refused before anything reads them."""
    if url is None or (isinstance(url, str) and url == os.environ.get("CAI_WEIGHTS")):
        return url
    places = [p for p in (location("weights"), location("data")) if p is not None]
    if not places:
        return url
    canonical = canonical_s3(url, field)
    if all(p.key_of(canonical) is None for p in places):
        raise _outside(field, url, canonical, places)
    return canonical


def allowed_models() -> list[str]:
    """The models this stack runs: the shipped ones (registered in the image's code, not by entry points), ``CAI_MODEL``
    and ``CAI_ALLOWED_MODELS``."""
    from ...models.catalog import available_models

    names = available_models(entry_points=False)
    for name in [os.environ.get("CAI_MODEL", "")] + re.split(r"[,\s]+", os.environ.get("CAI_ALLOWED_MODELS", "")):
        if name and name not in names:
            names.append(name)
    return names


def check_model(name: Any, field: str = "model") -> str:
    """``name`` when the stack allows it; checked before anything imports or loads a model."""
    allowed = allowed_models()
    if not isinstance(name, str) or name not in allowed:
        raise ConfigError(f"{field}: {name!r} is not a model of this stack; use one of {', '.join(allowed)} (the "
                          "built-in models, and those the stack lists in its AllowedModels parameter)")
    return name


def event_object(event: Any, what: str) -> dict[str, Any]:
    """``event`` when it is a JSON object; ConfigError naming the handler otherwise."""
    if not isinstance(event, dict):
        raise ConfigError(f"{what} event must be a JSON object, got {type(event).__name__} {_short(event)}")
    return event


def check_keys(event: dict[str, Any], allowed: tuple[str, ...], what: str) -> None:
    unknown = sorted(str(k) for k in event if k not in allowed)
    if unknown:
        raise ConfigError(f"{what} event: unknown key(s) {', '.join(unknown)}; expected {', '.join(allowed)}")


def rank_of(value: Any, field: str = "rank") -> int:
    """A rank: a JSON integer >= 0 (not a float, a boolean or a string)."""
    if type(value) is not int or value < 0:
        raise ConfigError(f"{field} must be an integer >= 0, got {_short(value)}")
    return value


def plan_hash_of(value: Any, field: str = "plan_hash") -> str:
    if not isinstance(value, str) or not _SHA256_RE.match(value):
        raise ConfigError(f"{field} must be a plan's sha256 (64 lower-case hex digits), got {_short(value)}")
    return value


def integer_option(value: Any, field: str, low: int, high: int) -> int:
    """A whole number within [low, high]; no float, boolean or string is coerced."""
    if type(value) is not int or not low <= value <= high:
        raise ConfigError(f"{field} must be an integer within {low}-{high}, got {_short(value)}")
    return value


def number_option(value: Any, field: str, low: float, high: float) -> float:
    """A finite number within [low, high]; booleans and strings are refused."""
    if type(value) not in (int, float) or not math.isfinite(value) or not low <= value <= high:
        raise ConfigError(f"{field} must be a number within {low:g}-{high:g}, got {_short(value)}")
    return float(value)


def bool_option(value: Any, field: str) -> bool:
    if not isinstance(value, bool):
        raise ConfigError(f"{field} must be true or false, got {_short(value)}")
    return value


def execution_name(value: Any) -> str:
    """A Step Functions execution name fit to be a run folder: letters, digits, '-' and '_' (1-80)."""
    if not isinstance(value, str) or not EXECUTION_NAME_RE.match(value):
        raise ConfigError(f"execution_name must be 1-80 letters, digits, '-' or '_' (it names the run's folder), "
                          f"got {_short(value)}")
    return value


def _short(value: Any, limit: int = 80) -> str:
    text = repr(value)
    return text if len(text) <= limit else text[:limit] + "..."
