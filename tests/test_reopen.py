"""Reopening a finished run: ``cosmicai.open`` and ``cai report`` read a run's result folder (local, S3, a
read-only mount) without writing anything, and say in one line what a folder holds when it is no finished run."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
from pathlib import Path

import pytest

import cosmicai
from cosmicai.api import NotFinishedError
from cosmicai.cli import main

RUN_OPTIONS = ["--model", "astromae-random", "--workers", "1", "--threads", "1", "--world-size", "2",
               "--batch-size", "16", "--quiet"]


@pytest.fixture(scope="module")
def finished(tiny_dataset, tmp_path_factory) -> tuple[Path, str]:
    """A finished local run and the report `cai run` printed for it."""
    import contextlib
    import io

    result = tmp_path_factory.mktemp("reopen") / "results"
    out = io.StringIO()
    with contextlib.redirect_stdout(out):
        assert main(["run", "--data", tiny_dataset, "--result", str(result), *RUN_OPTIONS]) == 0
    return result, out.getvalue()


def _snapshot(root: Path) -> dict[str, tuple[int, int]]:
    return {str(p.relative_to(root)): (p.stat().st_size, p.stat().st_mtime_ns) for p in sorted(root.rglob("*"))}


def test_report_prints_what_run_printed_and_open_gives_the_run(finished, capsys):
    result, printed = finished
    before = _snapshot(result)
    assert printed.startswith(f"run {result}  (model astromae-random") and "rows in 48 / out 48" in printed
    assert main(["report", str(result)]) == 0
    assert capsys.readouterr().out == printed
    assert main(["report", str(result), "--json"]) == 0
    assert json.loads(capsys.readouterr().out) == json.loads((result / "summary.json").read_text())

    run = cosmicai.open(str(result))
    assert isinstance(run, cosmicai.RunResult) and run.result_url == str(result)
    assert run.complete and run.failures == [] and run.metrics["n"] == 48
    assert run.summary == json.loads((result / "summary.json").read_text())
    table = run.predictions(["object_id", "z_pred"])
    assert sorted(table.column("object_id").to_pylist()) == list(range(48))
    assert repr(run).startswith(f"RunResult('{result}', complete=True, rows=48, ranks=2/2")
    assert _snapshot(result) == before  # nothing written, not even a lease


def test_report_on_a_read_only_mount(finished, tmp_path, capsys):
    if os.geteuid() != 0 or shutil.which("mount") is None:
        pytest.skip("needs root and mount(8) for a read-only bind mount")
    result, printed = finished
    ro = tmp_path / "ro"
    ro.mkdir()
    if subprocess.run(["mount", "--bind", str(result), str(ro)], capture_output=True).returncode != 0:
        pytest.skip("bind mounts are not permitted here")
    try:
        subprocess.run(["mount", "-o", "remount,bind,ro", str(ro)], check=True, capture_output=True)
        with pytest.raises(OSError):
            (ro / "probe").write_text("x")  # the mount really is read-only
        before = _snapshot(ro)
        assert main(["report", str(ro)]) == 0
        assert capsys.readouterr().out == printed  # the summary names the run where it ran
        run = cosmicai.open(str(ro))
        assert run.predictions().num_rows == 48 and run.complete
        assert _snapshot(ro) == before
    finally:
        subprocess.run(["umount", str(ro)], check=True)


def test_folders_without_a_finished_run_are_named(finished, tiny_dataset, tmp_path, capsys):
    result, _ = finished
    cases = {tmp_path / "missing": "no such folder",
             Path(tiny_dataset): "a dataset (manifest.json), not a run"}
    (tmp_path / "other").mkdir()
    (tmp_path / "other" / "notes.txt").write_text("x")
    cases[tmp_path / "other"] = "not a run (no plan.json or summary.json; 1 other file(s))"
    half = tmp_path / "half"
    shutil.copytree(result, half)
    (half / "summary.json").unlink()
    (half / "ranks" / "1.json").unlink()
    cases[half] = (f"planned but not summarized (1/2 rank(s) done): run `cai run --data {tiny_dataset} --result "
                   f"{half}` to finish it, or `cai report {half}` after")
    for folder, message in cases.items():
        assert main(["report", str(folder)]) == 2
        err = capsys.readouterr().err
        assert err.startswith(f"cai: error: {folder}") and message in err and err.count("\n") == 1, err
        with pytest.raises(NotFinishedError, match=message.split("(")[0]):
            cosmicai.open(str(folder))


def test_a_run_with_failed_ranks_reports_them_and_exits_1(tiny_dataset, tmp_path, capsys):
    from conftest import corrupt_copy

    data = corrupt_copy(tiny_dataset, tmp_path / "data")
    result = tmp_path / "results"
    assert main(["run", "--data", str(data), "--result", str(result), "--allow-failures", *RUN_OPTIONS]) == 0
    capsys.readouterr()
    assert main(["report", str(result)]) == 1
    out = capsys.readouterr().out
    assert "complete: False  ranks 1/2" in out
    assert "FAILED rank 1 ['part-000003.safetensors', 'part-000004.safetensors']: DataError" in out
    run = cosmicai.open(str(result))
    assert not run.complete and [f["rank"] for f in run.failures] == [1]


def test_open_and_report_on_s3(tiny_dataset, s3_server, s3_url, capsys):
    client = s3_server.client()
    bucket, prefix = s3_url[5:].split("/", 1)

    def keys() -> dict[str, str]:
        listed = client.list_objects_v2(Bucket=bucket, Prefix=prefix + "/")
        return {o["Key"]: o["ETag"] for o in listed.get("Contents", [])}

    ran = cosmicai.run(tiny_dataset, s3_url, model="astromae-random", workers=1, threads=1, world_size=2,
                       batch_size=16, allow_unsafe_lease=True)
    before = keys()
    assert f"{prefix}/summary.json" in before
    run = cosmicai.open(s3_url)
    assert run.result_url == s3_url and run.complete and run.metrics == ran.metrics
    assert run.predictions().num_rows == 48
    assert main(["report", s3_url]) == 0
    out = capsys.readouterr().out
    assert out.startswith(f"run {s3_url}  (model astromae-random") and "rows in 48 / out 48" in out
    assert main(["report", s3_url + "-nothing"]) == 2
    assert "no such folder" in capsys.readouterr().err
    assert keys() == before
