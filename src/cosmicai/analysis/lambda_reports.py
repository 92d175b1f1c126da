"""Lambda ``REPORT`` log lines -> per-invocation duration, memory and init time.

A REPORT line looks like::

    REPORT RequestId: 8f5e...  Duration: 10234.56 ms  Billed Duration: 10235 ms  Memory Size: 3008 MB
    Max Memory Used: 1874 MB  Init Duration: 2150.03 ms

Parsing only (the standard library, no AWS client): the lines come from a saved log, or from CloudWatch through
``cai aws logs``, whose AWS runner does the fetching. Their cost (billed seconds x memory GB x price per GB-s +
price per request) is computed by :mod:`cosmicai.analysis.cost` (``invocation_cost``, ``cost_table``).
"""

from __future__ import annotations

import re
from dataclasses import asdict, dataclass
from typing import Any, Iterable

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

