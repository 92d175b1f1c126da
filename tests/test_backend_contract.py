"""One contract, every way a run can execute: the local backend in-process and as a process pool, a Dask
cluster, Lithops (its localhost backend), and the Step Functions runner on moto (the deployed state machine, real
handlers). Each must account for every partition and row, give the same predictions, and name a failed partition
the same way."""

from __future__ import annotations

import numpy as np
import pytest

from conftest import corrupt_copy
from test_aws_e2e import DATA_BUCKET, DATA_PREFIX, MODEL, RESULT_BUCKET, RESULT_PREFIX, _state_machine, stack  # noqa: F401

import cosmicai
from cosmicai import storage
from cosmicai.pipeline.summarize import IncompleteRunError

RUNNERS = ("local-in-process", "local-pool", "dask", "lithops", "stepfunctions")
# One region per execution (moto, see test_aws_e2e._state_machine); none that test_aws_e2e uses.
REGIONS = iter(("ap-south-1", "ap-northeast-1", "ap-northeast-2", "ca-central-1", "sa-east-1", "eu-north-1",
                "eu-west-2", "eu-west-3"))
COMMON = {"model": MODEL, "batch_size": 5, "world_size": 4, "threads": 1}


def _run(kind: str, data_dir, name: str, request, tmp_path, **options) -> cosmicai.RunResult:
    if kind == "stepfunctions":
        emu = request.getfixturevalue("stack")
        region = next(REGIONS)
        data = f"s3://{DATA_BUCKET}/{DATA_PREFIX}/contract-{name}"
        result = f"s3://{RESULT_BUCKET}/{RESULT_PREFIX}/contract-{name}"
        return cosmicai.run(data, result, backend="aws", state_machine_arn=_state_machine(emu, region),
                            region=region, name=f"contract-{name}", upload=str(data_dir), poll_s=0.5,
                            timeout_s=120, **COMMON, **options)
    backend = {"local-in-process": {"backend": "local", "workers": 1, "backend_options": {"in_process": True}},
               "local-pool": {"backend": "local", "workers": 2},
               "dask": {"backend": "dask", "workers": 2},
               "lithops": {"backend": "lithops", "workers": 2}}[kind]
    return cosmicai.run(str(data_dir), str(tmp_path / name), **backend, **COMMON, **options)


@pytest.fixture(scope="module")
def reference(tiny_dataset, tmp_path_factory) -> dict[int, float]:
    out = cosmicai.run(tiny_dataset, str(tmp_path_factory.mktemp("ref") / "r"), backend="local", workers=1,
                       backend_options={"in_process": True}, **COMMON)
    table = out.predictions(["object_id", "z_pred"])
    return dict(zip(table.column("object_id").to_pylist(), table.column("z_pred").to_pylist()))


@pytest.mark.s3
@pytest.mark.parametrize("kind", RUNNERS)
def test_every_partition_and_row_comes_back_with_the_same_predictions(kind, tiny_dataset, reference, request,
                                                                      tmp_path):
    out = _run(kind, tiny_dataset, f"ok-{kind}", request, tmp_path)
    done = out.summary["completeness"]
    assert out.complete and out.failures == []
    assert (done["ranks_done"], done["partitions_done"], done["rows_in"], done["rows_out"]) == (4, 4, 48, 48)
    table = out.predictions(["object_id", "z_pred"])
    got = dict(zip(table.column("object_id").to_pylist(), table.column("z_pred").to_pylist()))
    assert sorted(got) == sorted(reference) == list(range(48))
    assert max(abs(got[i] - reference[i]) for i in reference) <= 1e-6
    assert np.isfinite(list(got.values())).all()


@pytest.mark.s3
@pytest.mark.parametrize("kind", RUNNERS)
def test_a_corrupt_partition_is_named_and_the_rest_kept(kind, tiny_dataset, request, tmp_path):
    data_dir = corrupt_copy(tiny_dataset, tmp_path / "data")
    with pytest.raises(IncompleteRunError, match=r"rank 2 failed \(DataError"):
        _run(kind, data_dir, f"bad-{kind}", request, tmp_path)
    out = _run(kind, data_dir, f"bad-allowed-{kind}", request, tmp_path, allow_failures=True)
    done = out.summary["completeness"]
    assert not out.complete and done["failed_ranks"] == [2] and done["rows_out"] == 36
    assert [(f["rank"], f["partitions"], f["error_type"]) for f in out.failures] == \
        [(2, ["part-000003.safetensors"], "DataError")]
    assert out.predictions(["object_id"]).num_rows == 36
    assert storage.read_json(storage.join(out.result_url, "errors", "2.json"))["partitions"] == \
        ["part-000003.safetensors"]
