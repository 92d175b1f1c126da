"""CloudWatch Logs fetching for ``cai aws logs``: the REPORT events of a Lambda function's log group.

Parsing the lines (duration, memory, init time) is :mod:`cosmicai.analysis.lambda_reports`; pricing them is
:mod:`cosmicai.analysis.cost`.
"""

from __future__ import annotations

from typing import Any, Iterator


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
