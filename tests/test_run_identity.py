"""A run is identified by what it is, not how it is spelled: relative, absolute, other-folder, ``~``/``$VAR`` and
``s3://`` spellings of the same result path resume the same run, ``--overwrite`` works with a relative path, the
plan records canonical paths, and a plan written with relative paths by an older version still resumes."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
from pathlib import Path

import pytest

import cosmicai
from cosmicai.config import canonical_url, load_config
from cosmicai.errors import ConfigError

COMMON = ("--model", "astromae-random", "--workers", "1", "--threads", "1", "--batch-size", "12", "--quiet")


@pytest.fixture
def cai(capsys, monkeypatch):
    """``cai run ARGS`` from folder ``cwd``, through the real command line (in this process, for speed)."""
    from cosmicai.cli import main

    def call(cwd: Path, *args: str, env: dict | None = None) -> subprocess.CompletedProcess:
        with monkeypatch.context() as m:
            m.chdir(cwd)
            for key, value in (env or {}).items():
                m.setenv(key, value)
            rc = main(["run", *args, *COMMON])
        out, err = capsys.readouterr()
        return subprocess.CompletedProcess(["cai", "run", *args], rc, out, err)

    return call


def _drop_rank(result: Path, rank: int) -> None:
    """Make the run unfinished again: one rank's outputs and the summary go, as after a crash."""
    for path in (result / "ranks" / f"{rank}.json", result / "predictions" / f"{rank}.parquet",
                 result / "summary.json"):
        path.unlink()


@pytest.fixture
def folders(tiny_dataset, tmp_path):
    """``tmp/a/data`` (the tiny dataset) and an empty sibling folder ``tmp/b``."""
    a, b = tmp_path / "a", tmp_path / "b"
    shutil.copytree(tiny_dataset, a / "data")
    b.mkdir()
    return a.resolve(), b.resolve()


def test_relative_absolute_and_other_folder_spellings_resume_one_run(cai, folders):
    a, b = folders
    first = cai(a, "--data", "data", "--result", "results", "--world-size", "2")
    assert first.returncode == 0, first.stderr
    plan = json.loads((a / "results" / "plan.json").read_text())
    assert (plan["config"]["data"], plan["config"]["result"], plan["result_url"]) == (
        str(a / "data"), str(a / "results"), str(a / "results"))
    assert all(p["url"].startswith(str(a / "data") + "/") for p in plan["partitions"])

    _drop_rank(a / "results", 1)
    again = cai(a, "--data", str(a / "data"), "--result", f"{a}/results/", "--world-size", "2")
    assert again.returncode == 0, again.stderr
    assert "[1 rank(s) resumed]" in again.stdout and "complete: True" in again.stdout

    _drop_rank(a / "results", 0)
    other = cai(b, "--data", "../a/./data", "--result", "../a//results", "--world-size", "2")
    assert other.returncode == 0, other.stderr
    assert "[1 rank(s) resumed]" in other.stdout and "rows in 48 / out 48" in other.stdout
    assert json.loads((a / "results" / "plan.json").read_text())["plan_hash"] == plan["plan_hash"]
    assert not (b / "results").exists() and sorted(os.listdir(b)) == []


def test_home_and_variables_name_the_same_run(cai, folders):
    a, _ = folders
    env = {"CAI_TEST_RUNS": str(a)}
    assert cai(a, "--data", "data", "--result", "results").returncode == 0
    _drop_rank(a / "results", 2)
    again = cai(a.parent, "--data", "$CAI_TEST_RUNS/data", "--result", "${CAI_TEST_RUNS}/results", env=env)
    assert again.returncode == 0, again.stderr
    assert "[3 rank(s) resumed]" in again.stdout
    assert load_config({"data": "~/d", "result": "r"})[0].data == os.path.join(os.path.expanduser("~"), "d")


def test_overwrite_with_a_relative_result_replaces_the_run(cai, folders, monkeypatch):
    a, _ = folders
    assert cai(a, "--data", "data", "--result", "results", "--world-size", "2").returncode == 0
    refused = cai(a, "--data", "data", "--result", "results", "--world-size", "3")
    assert refused.returncode == 2 and "already holds a run with a different config" in refused.stderr
    done = cai(a, "--data", "data", "--result", "results", "--world-size", "3", "--overwrite")
    assert done.returncode == 0, done.stderr
    assert sorted(os.listdir(a / "results" / "ranks")) == ["0.json", "1.json", "2.json"]

    monkeypatch.chdir(a)
    result = cosmicai.run("data", "results", model="astromae-random", workers=1, threads=1, world_size=4,
                          batch_size=12, overwrite=True)
    assert result.complete and result.result_url == str(a / "results")
    assert sorted(os.listdir(a / "results" / "ranks")) == ["0.json", "1.json", "2.json", "3.json"]
    assert json.loads((a / "results" / "summary.json").read_text())["world_size"] == 4


def test_a_plan_with_relative_paths_from_an_older_version_resumes(cai, folders, monkeypatch):
    """Older versions stored paths as typed; from the folder it was started in, such a run still resumes."""
    from cosmicai.config import RunConfig
    from cosmicai.pipeline.infer import run_task
    from cosmicai.pipeline.plan import make_plan

    a, _ = folders
    monkeypatch.chdir(a)
    old = make_plan(RunConfig(data="data", result="results", model="astromae-random", batch_size=12, world_size=2))
    run_task("results", 0, old.plan_hash, old.task_list()[0]["task"])
    assert json.loads((a / "results" / "plan.json").read_text())["config"]["result"] == "results"
    done = cai(a, "--data", "data", "--result", "results", "--world-size", "2")
    assert done.returncode == 0, done.stderr
    assert "[1 rank(s) resumed]" in done.stdout and "complete: True" in done.stdout
    assert json.loads((a / "results" / "summary.json").read_text())["plan_hash"] == old.plan_hash


@pytest.mark.parametrize("url, canonical", [
    ("s3://bucket//runs/./r1/", "s3://bucket/runs/r1"),
    ("s3://bucket/runs/r1", "s3://bucket/runs/r1"),
    ("s3a://b/x//y", "s3a://b/x/y"),
    ("file:///tmp/x/../y/", "/tmp/y"),
    ("/tmp//x/./y/", "/tmp/x/y"),
])
def test_canonical_urls(url, canonical):
    assert canonical_url(url) == canonical


def test_an_s3_url_with_a_parent_segment_is_refused():
    with pytest.raises(ConfigError, match=r"^result: s3://b/runs/\.\./other has a '\.\.' segment, which S3 keeps"):
        load_config({"data": "/d", "result": "s3://b/runs/../other"})
    with pytest.raises(ConfigError, match=r"^data: .* a path cannot contain a NUL byte"):
        load_config({"data": "/d\x00", "result": "/r"})


def test_a_folder_reached_through_a_symbolic_link_is_the_same_run(cai, folders):
    a, b = folders
    (b / "link").symlink_to(a, target_is_directory=True)
    assert cai(b / "link", "--data", "data", "--result", "results").returncode == 0
    assert json.loads((a / "results" / "plan.json").read_text())["config"]["result"] == str(a / "results")
    _drop_rank(a / "results", 3)
    again = cai(a, "--data", "data", "--result", str(b / "link" / "results"), "--overwrite", "--world-size", "2")
    assert again.returncode == 0, again.stderr   # --overwrite through the link removes the run's own files
    assert sorted(os.listdir(a / "results" / "ranks")) == ["0.json", "1.json"]
