"""Lambda ``REPORT`` lines from CloudWatch Logs -> per-invocation duration, memory, init time and cost.

A REPORT line looks like::

    REPORT RequestId: 8f5e...  Duration: 10234.56 ms  Billed Duration: 10235 ms  Memory Size: 3008 MB
    Max Memory Used: 1874 MB  Init Duration: 2150.03 ms

Cost per invocation = billed seconds x memory GB x price per GB-s + price per request (see
``cosmicai.analysis.cost``; x86_64 $0.0000166667, arm64 $0.0000133334 per GB-s, $0.20 per million requests).
"""

from __future__ import annotations

import re
from dataclasses import asdict, dataclass
from typing import Any, Iterable, Iterator

_FIELDS = {
    "billed_ms": r"Billed Duration:\s*([0-9.]+)\s*ms",
    "memory_mb": r"Memory Size:\s*([0-9]+)\s*MB",
    "max_memory_mb": r"Max Memory Used:\s*([0-9]+)\s*MB",
    "init_ms": r"Init Duration:\s*([0-9.]+)\s*ms",
}
_REQUEST = re.compile(r"^\s*REPORT\s+RequestId:\s*([0-9A-Za-z-]+)")
_PATTERNS = {k: re.compile(v) for k, v in _FIELDS.items()}


@dataclass
class Report:
    """One invocation's REPORT line. ``init_ms`` is None for warm invocations."""

    request_id: str
    duration_ms: float
    billed_ms: float
    memory_mb: int
    max_memory_mb: int
    init_ms: float | None = None
    timestamp: int | None = None

    @property
    def cold(self) -> bool:
        return self.init_ms is not None

    def to_dict(self) -> dict[str, Any]:
        return asdict(self) | {"cold": self.cold}


def parse_report_line(line: str, timestamp: int | None = None) -> Report | None:
    """Parse one Lambda REPORT line; None for any other log line (START, END, the handler's own output)."""
    head = _REQUEST.match(line)
    if not head:
        return None
    # "Duration:" also occurs inside "Billed Duration:" and "Init Duration:"; take the first plain one.
    plain = re.search(r"(?:^|\s)Duration:\s*([0-9.]+)\s*ms", line[head.end():])
    values: dict[str, Any] = {}
    for key, pattern in _PATTERNS.items():
        m = pattern.search(line)
        values[key] = m.group(1) if m else None
    if plain is None or values["billed_ms"] is None or values["memory_mb"] is None:
        return None
    return Report(request_id=head.group(1), duration_ms=float(plain.group(1)), billed_ms=float(values["billed_ms"]),
                  memory_mb=int(values["memory_mb"]), max_memory_mb=int(values["max_memory_mb"] or 0),
                  init_ms=float(values["init_ms"]) if values["init_ms"] is not None else None, timestamp=timestamp)


def parse_reports(lines: Iterable[str | tuple[str, int | None]]) -> list[Report]:
    """Every REPORT line among ``lines`` (strings, or (message, timestamp) pairs), in order."""
    out = []
    for item in lines:
        msg, ts = (item, None) if isinstance(item, str) else item
        rep = parse_report_line(msg, ts)
        if rep is not None:
            out.append(rep)
    return out


def invocation_cost(report: Report, arch: str = "x86_64", memory_mb: float | None = None) -> float:
    """USD for one invocation: its billed duration at the configured (or given) memory, plus the request fee."""
    from ...analysis.cost import lambda_cost

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


def fetch_report_events(logs_client: Any, log_group: str, start_ms: int | None = None,
                        end_ms: int | None = None) -> Iterator[tuple[str, int]]:
    """(message, timestamp) of the REPORT events in ``log_group`` (paginated ``FilterLogEvents``)."""
    kwargs: dict[str, Any] = {"logGroupName": log_group, "filterPattern": "REPORT"}
    if start_ms is not None:
        kwargs["startTime"] = int(start_ms)
    if end_ms is not None:
        kwargs["endTime"] = int(end_ms)
    for page in logs_client.get_paginator("filter_log_events").paginate(**kwargs):
        for event in page.get("events", []):
            yield event["message"], event.get("timestamp")
