"""The Dask backend on an in-process LocalCluster (2 worker processes, 1 torch thread each)."""

from __future__ import annotations

import os
import uuid

import numpy as np
import pyarrow.parquet as pq
import pytest

from cosmicai.runners.registry import make_backend as get_backend
from cosmicai.config import load_config
from cosmicai.errors import ConfigError
from cosmicai.runners.pipeline import run

pytest.importorskip("distributed")


def kill_first_attempt(fn, marker, victim, **task):
    """Run ``fn(**task)``, but kill this worker process the first time rank ``victim`` arrives."""
    if task["rank"] == victim and not os.path.exists(marker):
        with open(marker, "w") as fh:
            fh.write(str(os.getpid()))
        os._exit(1)
    return fn(**task)


def fail_rank(rank, result_url):
    if rank == 1:
        raise ValueError(f"rank {rank} fails on purpose")
    return {"rank": rank, "pid": os.getpid()}


class KillOnce:
    """Backend wrapper whose tasks kill their worker on the victim rank's first attempt."""

    name = "dask"

    def __init__(self, backend, marker, victim):
        self.backend, self.marker, self.victim = backend, marker, victim

    def map(self, fn, tasks):
        import functools

        wrapped = functools.partial(kill_first_attempt, fn, self.marker, self.victim)
        return self.backend.map(wrapped, tasks)

    def close(self):
        pass


@pytest.fixture(scope="module")
def dask_backend():
    backend = get_backend("dask", workers=2, threads=1, quiet=True)
    try:
        yield backend
    finally:
        backend.close()


def _config(data, result):
    config, _ = load_config({"data": data, "result": result, "model": "astromae-random", "batch_size": 8,
                             "world_size": 4, "threads": 1, "workers": 1})
    return config


def _predictions(result):
    table = pq.read_table(os.path.join(result, "predictions.parquet")).sort_by("object_id")
    return {name: table.column(name).to_pylist() for name in ("object_id", "partition", "z_pred")}


@pytest.fixture(scope="module")
def local_result(tiny_dataset, tmp_path_factory):
    result = str(tmp_path_factory.mktemp("local") / "out")
    summary = run(_config(tiny_dataset, result), backend=get_backend("local", workers=1, threads=1),
                  progress=False)
    return result, summary


def _records(result):
    import json

    folder = os.path.join(result, "ranks")
    return [json.load(open(os.path.join(folder, name))) for name in sorted(os.listdir(folder))]


def test_dask_run_matches_local(dask_backend, local_result, tiny_dataset, tmp_path):
    local_dir, local_summary = local_result
    result = str(tmp_path / "dask")
    summary = run(_config(tiny_dataset, result), backend=dask_backend, progress=False)

    got, want = _predictions(result), _predictions(local_dir)
    assert got["object_id"] == want["object_id"] == list(range(48))
    assert got["partition"] == want["partition"]
    np.testing.assert_allclose(got["z_pred"], want["z_pred"], atol=1e-6, rtol=0)
    for key in ("rows_in", "rows_out", "partitions_done", "partitions_planned", "ranks_done", "complete"):
        assert summary["completeness"][key] == local_summary["completeness"][key], key
    assert summary["completeness"]["rows_out"] == 48 and summary["completeness"]["complete"] is True
    for key, value in local_summary["metrics"].items():
        if isinstance(value, float):
            assert summary["metrics"][key] == pytest.approx(value, abs=1e-6), key
        else:
            assert summary["metrics"][key] == value, key

    records = _records(result)
    pids = {r["cpu"]["pid"] for r in records}
    assert len(records) == 4 and 1 <= len(pids) <= 2  # 4 ranks on 2 worker processes: some process reused
    assert os.getpid() not in pids, "ranks must run in the Dask worker processes"
    # the model is loaded once per worker process: one cold start per process, the rest reuse it
    for pid in pids:
        cold = [r["cold_start"] for r in records if r["cpu"]["pid"] == pid]
        assert cold.count(True) <= 1, (pid, cold)
    assert all(r["cpu"]["threads"] == 1 for r in records)


def test_killed_worker_task_reruns_elsewhere(dask_backend, local_result, tiny_dataset, tmp_path):
    marker = str(tmp_path / f"killed-{uuid.uuid4().hex[:6]}")
    result = str(tmp_path / "dask-killed")
    summary = run(_config(tiny_dataset, result), backend=KillOnce(dask_backend, marker, victim=2),
                  progress=False)

    assert os.path.exists(marker), "the victim task should have killed its worker once"
    killed_pid = int(open(marker).read())
    rerun = [r for r in _records(result) if r["rank"] == 2][0]
    assert rerun["cpu"]["pid"] != killed_pid
    comp = summary["completeness"]
    assert comp["complete"] is True and comp["rows_in"] == comp["rows_out"] == 48
    got, want = _predictions(result), _predictions(local_result[0])
    assert got["object_id"] == want["object_id"] == list(range(48))
    np.testing.assert_allclose(got["z_pred"], want["z_pred"], atol=1e-6, rtol=0)


def test_map_yields_every_task_with_errors(dask_backend):
    tasks = [{"result_url": f"memory://nowhere-{uuid.uuid4().hex[:6]}", "rank": r} for r in range(3)]
    out = dict((t["rank"], res) for t, res in dask_backend.map(fail_rank, tasks))
    assert sorted(out) == [0, 1, 2]
    assert isinstance(out[1], ValueError) and "rank 1 fails on purpose" in str(out[1])
    assert out[0]["rank"] == 0 and out[2]["rank"] == 2
    # the tasks ran in the cluster's worker processes, not in this one
    workers = set(dask_backend.client.run(os.getpid).values())
    assert os.getpid() not in workers and {out[0]["pid"], out[2]["pid"]} <= workers


@pytest.mark.parametrize("options, field", [({"workers": 0}, "workers"), ({"threads": -1}, "threads"),
                                            ({"retries": -1}, "retries")])
def test_bad_options_are_refused(options, field):
    with pytest.raises(ConfigError, match=field):
        get_backend("dask", **options)


def test_unreachable_scheduler_is_a_clear_error():
    with pytest.raises(ConfigError, match="cannot reach the scheduler 'tcp://127.0.0.1:9'"):
        get_backend("dask", scheduler="tcp://127.0.0.1:9", quiet=True, timeout="2s")


def test_cluster_command_glue_runs_cai_run_on_the_cluster(dask_backend, local_result, tiny_dataset, tmp_path):
    """`cai cluster slurm|pbs` hands RUN_ARGS to `cai run --backend dask --scheduler <its scheduler>`;
    here the cluster is the LocalCluster (no batch system installed)."""
    from cosmicai.cli.cluster import run_on_cluster

    result = str(tmp_path / "via-cluster")
    rc = run_on_cluster(dask_backend._own_cluster, ["--data", tiny_dataset, "--result", result,
                                                    "--model", "astromae-random", "--batch-size", "8",
                                                    "--world-size", "4", "--quiet"], threads=1)
    assert rc == 0
    got, want = _predictions(result), _predictions(local_result[0])
    assert got["object_id"] == want["object_id"] == list(range(48))
    np.testing.assert_allclose(got["z_pred"], want["z_pred"], atol=1e-6, rtol=0)
    assert {r["cpu"]["pid"] for r in _records(result)}.isdisjoint({os.getpid()})


def test_repeated_items_are_each_run(dask_backend):
    tasks = [{"result_url": "memory://same", "rank": 0}, {"result_url": "memory://same", "rank": 0}]
    out = list(dask_backend.map(fail_rank, tasks))
    assert len(out) == 2 and all(res["rank"] == 0 for _, res in out)
