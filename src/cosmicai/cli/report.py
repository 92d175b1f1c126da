"""``cai report``: the report of a finished run, read again from its result folder (local or S3), read only."""

from __future__ import annotations

import argparse
import json
import os
from typing import Any


def register(subparsers: Any) -> None:
    """Add ``report``."""
    p = subparsers.add_parser("report", help="print the report of a finished run (read only)",
                              description="Print the report `cai run` printed for the run under RESULT (a local "
                              "folder or s3:// URL), from its summary.json. Nothing is written and no lease is "
                              "taken, so a read-only folder or bucket will do. Exit status: 0 for a complete run, "
                              "1 when ranks failed, 2 when RESULT holds no finished run (the line says what it "
                              "holds and what to run).")
    p.add_argument("result", metavar="RESULT", help="result folder or URL of a `cai run` (its --result)")
    p.add_argument("--json", action="store_true", help="print summary.json instead of the report")
    p.add_argument("--endpoint", help="S3 endpoint URL (sets CAI_S3_ENDPOINT)")
    p.set_defaults(func=cmd_report)


def cmd_report(args: argparse.Namespace) -> int:
    """``cai report``."""
    from ..api import open as open_run

    if args.endpoint:
        os.environ["CAI_S3_ENDPOINT"] = args.endpoint
    result = open_run(args.result)
    if args.json:
        print(json.dumps(result.summary, indent=1))
    else:
        from ..pipeline.report import format_report

        print(format_report(result.summary))
    return 0 if result.complete else 1
