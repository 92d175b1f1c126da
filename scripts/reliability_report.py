#!/usr/bin/env python3
"""Run the reliability suite and print the figures of docs/reliability.md.

    python scripts/reliability_report.py            # run the suite, print the table and totals
    python scripts/reliability_report.py --measure  # also time astromae-random on one-row partitions

The fault tests append one JSON line per scenario to ``$CAI_RELIABILITY_LOG`` (tests/faultproxy.py:ledger) once
the scenario's final assertions have passed; test outcomes come from pytest's JUnit XML.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time
import xml.etree.ElementTree as ET
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
SUITE = ["tests/test_faults.py", "tests/test_faults_scale.py", "tests/test_bad_inputs.py", "tests/test_security.py"]


def run_suite(extra: list[str]) -> tuple[list[dict], dict[str, str], float]:
    """Run pytest on the suite; returns (ledger lines, {test id: outcome}, wall seconds)."""
    with tempfile.TemporaryDirectory() as tmp:
        log, junit = Path(tmp, "ledger.jsonl"), Path(tmp, "junit.xml")
        env = {**os.environ, "CAI_RELIABILITY_LOG": str(log), "OMP_NUM_THREADS": "1", "MKL_NUM_THREADS": "1"}
        t0 = time.perf_counter()
        subprocess.run([sys.executable, "-m", "pytest", *SUITE, "-q", "-p", "no:cacheprovider",
                        f"--junitxml={junit}", *extra], cwd=ROOT, env=env)
        wall = time.perf_counter() - t0
        lines = [json.loads(x) for x in log.read_text().splitlines()] if log.exists() else []
        outcomes = {}
        for case in ET.parse(junit).getroot().iter("testcase"):
            name = f"{case.get('classname')}::{case.get('name')}"
            kinds = {child.tag for child in case}
            outcomes[name] = ("failed" if kinds & {"failure", "error"} else "skipped" if "skipped" in kinds
                              else "passed")
    return lines, outcomes, wall


def measure_astromae(n: int = 60) -> float:
    """Seconds per one-row partition for astromae-random through run_task (1 torch thread)."""
    sys.path.insert(0, str(ROOT / "tests"))
    from cosmicai.config import load_config
    from cosmicai.models.worker import worker_models
    from cosmicai.pipeline.infer import run_task
    from cosmicai.pipeline.plan import make_plan
    from test_faults_scale import write_one_row_partitions

    worker_models().configure(1)
    with tempfile.TemporaryDirectory() as tmp:
        write_one_row_partitions(Path(tmp, "d"), n)
        cfg = load_config({"data": str(Path(tmp, "d")), "result": str(Path(tmp, "r")), "model": "astromae-random",
                           "world_size": 1, "batch_size": 1, "threads": 1})[0]
        make_plan(cfg)
        rec = run_task(cfg.result, 0)
        ph = rec["phases"]
        return (rec["total_cpu_time (seconds)"] - ph["model_load"]) / n


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--measure", action="store_true", help="time astromae-random per one-row partition")
    ap.add_argument("pytest_args", nargs="*", help="extra pytest arguments (after --)")
    args = ap.parse_args()

    lines, outcomes, wall = run_suite(args.pytest_args)
    print(f"\n{'scenario':58s} {'faults':>6s} {'resumes':>7s} {'rows in':>8s} {'rows out':>8s} {'lost':>5s}")
    for rec in lines:
        if "rows_in" not in rec:
            continue
        lost = rec["rows_in"] - rec["rows_out"]
        print(f"{rec['scenario'][:58]:58s} {rec.get('faults', 0):6d} {rec.get('resumes', 0):7d} "
              f"{rec['rows_in']:8d} {rec['rows_out']:8d} {lost:5d}")
    scen = [r for r in lines if "rows_in" in r]
    rejection_tests = ("test_bad_input_is_rejected", "test_cli_rejects_bad_input", "test_cai_process_exits_2")
    bad = {k: v for k, v in outcomes.items() if any(t in k for t in rejection_tests)}
    failed = sorted(k for k, v in outcomes.items() if v == "failed")
    print()
    print(f"faults injected:        {sum(r.get('faults', 0) for r in scen)} in {len(scen)} scenarios")
    print(f"runs completed:         {sum(r.get('runs', 1) for r in scen)} "
          f"(after {sum(r.get('resumes', 0) for r in scen)} resumes)")
    print(f"rows lost:              {sum(r['rows_in'] - r['rows_out'] for r in scen)} "
          f"of {sum(r['rows_in'] for r in scen)}")
    print(f"bad inputs rejected:    {sum(v == 'passed' for v in bad.values())} of {len(bad)} cases")
    print(f"partitions listed:      {max([r.get('partitions_listed', 0) for r in lines] or [0])}")
    outage = [r for r in lines if "survived_without_resume" in r]
    if outage:
        how = "absorbed by client retries" if outage[0]["survived_without_resume"] else "failed by name, then resumed"
        print(f"S3 outage mid-run:      {how}")
    cred = [r for r in lines if r["scenario"] == "credentials"]
    if cred:
        print(f"credential leaks:       {cred[0]['leaks']} in {cred[0]['outputs_scanned']} result files + console")
    print(f"tests: {sum(v == 'passed' for v in outcomes.values())} passed, {len(failed)} failed, "
          f"{wall:.0f} s wall")
    for name in failed:
        print(f"  FAILED {name}")
    if args.measure:
        per = measure_astromae()
        print(f"astromae-random: {per * 1e3:.0f} ms per one-row partition -> {per * 10_000:.0f} s for 10,000")
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
