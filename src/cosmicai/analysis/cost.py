"""AWS Lambda cost model: compute (GB-seconds), request fee and ephemeral storage above 512 MB.

cost = sum(billed seconds) x memory (GB, MB / 1024) x price per GB-s
       + requests x price per request
       + sum(billed seconds) x (ephemeral MB - 512) / 1024 x price per GB-s of storage

Billed duration is wall time rounded up to the next millisecond (Lambda's 1 ms billing granularity).
Prices are us-east-1 list prices; every one can be overridden through ``prices``.
"""

from __future__ import annotations

import math
from typing import Any, Iterable, Sequence

from .. import sizes
from ..errors import ConfigError, DataError
from ..lambda_limits import FREE_EPHEMERAL_MB
from ..results import COMBINED_NAME
from .lambda_reports import Report, parse_reports

#: Per-architecture list prices (USD): per GB-second of compute, per request, per GB-second of
#: ephemeral storage above the free 512 MB.
PRICES: dict[str, dict[str, float]] = {
    "x86_64": {"gb_second": 0.0000166667, "request": 0.20 / 1_000_000, "storage_gb_second": 0.0000000309},
    "arm64": {"gb_second": 0.0000133334, "request": 0.20 / 1_000_000, "storage_gb_second": 0.0000000309},
}


def price_table(arch: str = "x86_64", prices: dict[str, float] | None = None) -> dict[str, float]:
    """The prices for ``arch`` with any overrides from ``prices`` applied."""
    if arch not in PRICES:
        raise ConfigError(f"arch: unknown Lambda architecture {arch!r}; expected one of {sorted(PRICES)}")
    table = dict(PRICES[arch])
    for key, value in (prices or {}).items():
        if key not in table:
            raise ConfigError(f"prices: unknown price {key!r}; expected one of {sorted(table)}")
        if value is None:
            continue
        if not isinstance(value, (int, float)) or value < 0 or not math.isfinite(value):
            raise ConfigError(f"prices.{key}: must be a non-negative number, got {value!r}")
        table[key] = float(value)
    return table


def billed_seconds(wall_seconds: float) -> float:
    """Wall seconds rounded up to Lambda's 1 ms billing granularity."""
    if wall_seconds < 0 or not math.isfinite(wall_seconds):
        raise DataError(f"duration must be a finite non-negative number of seconds, got {wall_seconds!r}")
    return math.ceil(round(wall_seconds * 1000.0, 6)) / 1000.0


def lambda_cost(requests: int, billed_seconds_each: float | Sequence[float], memory_mb: float,
                arch: str = "x86_64", ephemeral_mb: float = FREE_EPHEMERAL_MB,
                prices: dict[str, float] | None = None) -> dict[str, Any]:
    """Cost in USD of ``requests`` Lambda invocations.

    ``billed_seconds_each`` is one duration used for every request, or a sequence with one billed
    duration per invocation (then its sum is billed). Returns ``compute``, ``requests``, ``storage`` and
    ``total`` in USD plus the inputs used (``num_requests``, ``billed_seconds``, ``gb_seconds``, ...).
    """
    if isinstance(requests, bool) or not isinstance(requests, int) or requests < 0:
        raise ConfigError(f"requests: must be a non-negative integer, got {requests!r}")
    if not isinstance(memory_mb, (int, float)) or not (0 < memory_mb) or not math.isfinite(memory_mb):
        raise ConfigError(f"memory_mb: must be a positive number of MB, got {memory_mb!r}")
    if ephemeral_mb < FREE_EPHEMERAL_MB:
        raise ConfigError(f"ephemeral_mb: Lambda ephemeral storage is at least {FREE_EPHEMERAL_MB} MB, "
                          f"got {ephemeral_mb!r}")
    table = price_table(arch, prices)
    if isinstance(billed_seconds_each, (int, float)):
        if billed_seconds_each < 0 or not math.isfinite(billed_seconds_each):
            raise ConfigError(f"billed_seconds_each: must be non-negative, got {billed_seconds_each!r}")
        total_seconds = requests * float(billed_seconds_each)
    else:
        durations = [float(s) for s in billed_seconds_each]
        if any(s < 0 or not math.isfinite(s) for s in durations):
            raise ConfigError("billed_seconds_each: every duration must be a finite non-negative number")
        total_seconds = math.fsum(durations)
    gb_seconds = total_seconds * memory_mb / 1024.0
    storage_gb_seconds = total_seconds * (ephemeral_mb - FREE_EPHEMERAL_MB) / 1024.0
    compute = gb_seconds * table["gb_second"]
    request_fee = requests * table["request"]
    storage = storage_gb_seconds * table["storage_gb_second"]
    return {"compute": compute, "requests": request_fee, "storage": storage,
            "total": compute + request_fee + storage, "num_requests": requests,
            "billed_seconds": total_seconds, "memory_mb": float(memory_mb), "gb_seconds": gb_seconds,
            "ephemeral_mb": float(ephemeral_mb), "arch": arch, "prices": table}


def what_if(data_size: str | int, partition_size: str | int, memory_mb: float, seconds_per_partition: float,
            arch: str = "x86_64", ephemeral_mb: float = FREE_EPHEMERAL_MB,
            prices: dict[str, float] | None = None) -> dict[str, Any]:
    """Cost of a hypothetical run: ceil(data / partition) requests of ``seconds_per_partition`` each."""
    data_bytes = sizes.parse_size(data_size, "gb", what="data size")
    part_bytes = sizes.parse_size(partition_size, "mb", what="partition size")
    requests = math.ceil(data_bytes / part_bytes - 1e-9)
    out = lambda_cost(requests, billed_seconds(seconds_per_partition), memory_mb, arch, ephemeral_mb, prices)
    out.update(data_bytes=data_bytes, partition_bytes=part_bytes, seconds_per_request=seconds_per_partition)
    return out


#: Keys a per-rank record may carry its wall duration under, most specific first. ``total_cpu_time
#: (seconds)`` is the original's key; in our records it holds the rank's wall-clock seconds.
_DURATION_KEYS = ("wall_seconds", "wall_s", "duration_s", "total_cpu_time (seconds)")


def record_seconds(record: dict[str, Any], source: str = "record") -> float:
    """The wall seconds one invocation ran, from a per-rank record."""
    for key in _DURATION_KEYS:
        value = record.get(key)
        if isinstance(value, (int, float)) and not isinstance(value, bool):
            if value < 0 or not math.isfinite(value):
                raise DataError(f"{source}: '{key}' is {value!r}, expected a non-negative duration")
            return float(value)
    raise DataError(f"{source}: no duration field (looked for {', '.join(map(repr, _DURATION_KEYS))})")


def cost_from_records(records: Iterable[dict[str, Any]], memory_mb: float, arch: str = "x86_64",
                      ephemeral_mb: float = FREE_EPHEMERAL_MB, prices: dict[str, float] | None = None,
                      source: str = COMBINED_NAME) -> dict[str, Any]:
    """Cost of a finished run: one request per record, each billed its wall time rounded up to 1 ms."""
    durations = []
    for i, rec in enumerate(records):
        if not isinstance(rec, dict):
            raise DataError(f"{source}[{i}]: expected a JSON object, got {type(rec).__name__}")
        durations.append(billed_seconds(record_seconds(rec, f"{source}[{i}]")))
    if not durations:
        raise DataError(f"{source}: no records to cost")
    return lambda_cost(len(durations), durations, memory_mb, arch, ephemeral_mb, prices)


def parse_report_lines(text: str) -> list[tuple[float, float]]:
    """(billed seconds, memory MB) for every Lambda ``REPORT RequestId: ...`` line in a log text."""
    return [(r.billed_ms / 1000.0, float(r.memory_mb)) for r in parse_reports(text.splitlines())]


def cost_from_reports(text: str, arch: str = "x86_64", ephemeral_mb: float = FREE_EPHEMERAL_MB,
                      prices: dict[str, float] | None = None, source: str = "log") -> dict[str, Any]:
    """Cost from Lambda REPORT lines (their billed durations and configured memory sizes)."""
    reports = parse_report_lines(text)
    if not reports:
        raise DataError(f"{source}: no Lambda 'REPORT RequestId: ... Billed Duration: ... Memory Size: ...' lines")
    parts = [lambda_cost(1, s, mem, arch, ephemeral_mb, prices) for s, mem in reports]
    out = {k: math.fsum(p[k] for p in parts) for k in ("compute", "requests", "storage", "total",
                                                        "billed_seconds", "gb_seconds")}
    mems = sorted({mem for _, mem in reports})
    out.update(num_requests=len(reports), memory_mb=mems[0] if len(mems) == 1 else mems,
               ephemeral_mb=float(ephemeral_mb), arch=arch, prices=price_table(arch, prices))
    return out


def invocation_cost(report: Report, arch: str = "x86_64", memory_mb: float | None = None) -> float:
    """USD for one invocation: its billed duration at the configured (or given) memory, plus the request fee."""
    return float(lambda_cost(1, report.billed_ms / 1000.0, memory_mb or report.memory_mb, arch)["total"])


def cost_table(reports: list[Report], arch: str = "x86_64", memory_mb: float | None = None) -> dict[str, Any]:
    """Per-invocation rows (with cost) and totals: invocations, cold starts, billed seconds, peak memory, USD."""
    rows = [r.to_dict() | {"cost_usd": invocation_cost(r, arch, memory_mb)} for r in reports]
    total = {
        "invocations": len(rows),
        "cold_starts": sum(1 for r in reports if r.cold),
        "billed_seconds": sum(r.billed_ms for r in reports) / 1000.0,
        "mean_duration_ms": (sum(r.duration_ms for r in reports) / len(reports)) if reports else None,
        "max_memory_used_mb": max((r.max_memory_mb for r in reports), default=None),
        "mean_init_ms": (sum(r.init_ms for r in reports if r.init_ms is not None) / max(1, sum(r.cold for r in reports))
                         if any(r.cold for r in reports) else None),
        "cost_usd": sum(row["cost_usd"] for row in rows),
        "arch": arch,
    }
    return {"invocations": rows, "total": total}
