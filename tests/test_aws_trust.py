"""The Lambda handlers' trust boundary, against a real S3 server: an infer item runs only when it is the plan's own
item for its rank; Initialize takes data, weights and results only in the stack's locations and models only from
the stack's list, before anything is read or imported; every malformed event is one ConfigError line."""

from __future__ import annotations

import copy
import math
import os
import sys

import pytest

from cosmicai import storage
from cosmicai.backends.aws import handlers, trust
from cosmicai.errors import ConfigError
from cosmicai.models.worker import worker_models

MODEL = "astromae-random"


def _tree(url: str) -> dict[str, bytes]:
    """Every object under ``url`` with its bytes."""
    return {u: storage.read_bytes(u) for u in storage.list_files(url, recursive=True)}


def _refused(call, event, pattern: str) -> str:
    with pytest.raises(ConfigError, match=pattern) as err:
        call(event)
    message = str(err.value)
    assert "\n" not in message
    return message


@pytest.fixture
def stack(s3_url, tiny_dataset, monkeypatch, tmp_path):
    """The stack's locations under a fresh prefix of the S3 server: data/, runs/, and a foreign other/ folder
    holding a dataset of 5 rows (object ids 8000-8004) and a module that writes a marker when imported."""
    from conftest import make_random_partition
    from cosmicai.data.formats import encode_partition

    bucket, _, prefix = s3_url[len("s3://"):].partition("/")
    for name in sorted(os.listdir(tiny_dataset)):
        with open(os.path.join(tiny_dataset, name), "rb") as fh:
            storage.write_bytes(f"{s3_url}/data/tiny/{name}", fh.read())
    storage.write_bytes(f"{s3_url}/other/foreign/part-000001.safetensors",
                        encode_partition(make_random_partition(5, seed=9, first_id=8000)))
    for var, value in (("CAI_DATA_BUCKET", bucket), ("CAI_DATA_PREFIX", f"{prefix}/data"),
                       ("CAI_RESULT_BUCKET", bucket), ("CAI_RESULT_PREFIX", f"{prefix}/runs")):
        monkeypatch.setenv(var, value)
    for var in ("CAI_MODEL", "CAI_WEIGHTS", "CAI_ALLOWED_MODELS", "CAI_WEIGHTS_BUCKET", "CAI_WEIGHTS_PREFIX"):
        monkeypatch.delenv(var, raising=False)
    marker = tmp_path / "imported.marker"
    (tmp_path / "evilmod.py").write_text(f"open({str(marker)!r}, 'w').write('imported')\n"
                                         "def factory(**kw):\n    raise SystemExit('called')\n")
    monkeypatch.syspath_prepend(str(tmp_path))
    sys.modules.pop("evilmod", None)
    yield {"root": s3_url, "data": f"{s3_url}/data/tiny", "runs": f"{s3_url}/runs", "marker": marker,
           "foreign": f"{s3_url}/other/foreign/part-000001.safetensors"}
    sys.modules.pop("evilmod", None)
    worker_models().clear()


def _initialize(stack, name, **config):
    event = {"config": {"data": stack["data"], "model": MODEL, "world_size": 3, **config}, "execution_name": name}
    return handlers.initialize(event)


def test_infer_runs_only_the_plans_own_items(stack):
    old = _initialize(stack, "run-a", batch_size=4)
    old_items = storage.read_json(f"{old['result_url']}/tasks.json")
    state = _initialize(stack, "run-a", batch_size=5, overwrite=True)   # the same folder, planned anew
    result = state["result_url"]
    assert result == f"{stack['runs']}/run-a" and state["num_tasks"] == 3 and state["plan_hash"] != old["plan_hash"]
    items = storage.read_json(f"{result}/tasks.json")
    assert [i["rank"] for i in items] == [0, 1, 2]
    before = _tree(stack["runs"])
    assert f"{result}/task_digests.txt" in before and len(before[f"{result}/task_digests.txt"]) == 3 * 65

    foreign = copy.deepcopy(items[0])
    foreign["task"]["partitions"] = [{"name": "part-000001.safetensors", "url": stack["foreign"], "rows": None,
                                      "bytes": None, "sha256": None}]
    _refused(handlers.infer, foreign, r"task.partitions\[0\].url: s3://.*/other/foreign/part-000001.safetensors is "
                                      r"outside this stack's data location")
    climbing = copy.deepcopy(items[0])
    climbing["task"]["partitions"][0]["url"] = f"{stack['root']}/data/../other/foreign/part-000001.safetensors"
    _refused(handlers.infer, climbing, r"\(read as s3://.*/other/foreign/part-000001.safetensors\) is outside")
    swapped = copy.deepcopy(items[0])            # inside the data location, but not this rank's partitions
    swapped["task"]["partitions"] = items[2]["task"]["partitions"]
    _refused(handlers.infer, swapped, r"the task item for rank 0 differs from the one the plan wrote")
    evil = copy.deepcopy(items[1])
    evil["task"]["config"]["model"] = "evilmod:factory"
    _refused(handlers.infer, evil, r"task.config.model: 'evilmod:factory' is not a model of this stack")
    beyond = copy.deepcopy(items[0])
    beyond["rank"] = 7
    _refused(handlers.infer, beyond, rf"{result}: rank 7 is not in the plan \(ranks 0-2\); nothing was run")
    _refused(handlers.infer, old_items[0], r"belongs to plan .* but the plan there is .*an item of an older")
    relabelled = dict(old_items[0], plan_hash=state["plan_hash"])   # an old task under the new hash
    _refused(handlers.infer, relabelled, r"the task item for rank 0 differs from the one the plan wrote")
    catch = {"action": "record_failure", "result_url": result, "error": {"Error": "X", "Cause": "y"}}
    _refused(handlers.infer, dict(catch, rank=7, plan_hash=state["plan_hash"]), r"rank 7 is not in the plan")
    _refused(handlers.infer, dict(catch, rank=0, plan_hash=old["plan_hash"]), r"the failure belongs to plan")
    assert not stack["marker"].exists()
    assert _tree(stack["runs"]) == before     # nothing written, nothing removed

    for item in items:
        assert handlers.infer(item)["status"] == "ok"
    out = handlers.summarize({"result_url": result, "allow_failures": False})
    assert out["complete"] and out["failed_ranks"] == [] and out["missing_ranks"] == []
    assert out["rows_in"] == out["rows_out"] == 48
    records = storage.list_files(f"{result}/ranks")
    assert sorted(storage.basename(u) for u in records) == ["0.json", "1.json", "2.json"]


def test_initialize_checks_locations_and_model_before_reading_or_importing(stack, monkeypatch):
    root, data = stack["root"], stack["data"]
    cases = [
        # (load_config may refuse '..' in an s3:// URL itself; either way it is refused before anything is read)
        ({"data": f"{root}/data/../other/foreign"}, r"data: s3://.*/other/foreign.*(is outside this stack's data "
                                                    r"location s3://.*/data/|has a '\.\.' segment)"),
        ({"data": f"{root}/data/%2e%2e/other"}, r"data: .* holds a percent-escape"),
        ({"data": "s3://../x"}, r"does not name a valid S3 bucket"),
        ({"data": "/var/task/cosmicai"}, r"data: '/var/task/cosmicai' is not an s3:// URL"),
        ({"result": f"{root}/runs/../elsewhere"}, r"result: .*/elsewhere.*(is outside this stack's result location|"
                                                  r"has a '\.\.' segment)"),
        ({"result": f"{root}/runs"}, r"is the stack's result location itself"),
        ({"result": f"{root}/runs/_map-runs/x"}, r"where the state machine keeps the Map's outputs"),
        ({"weights": f"{root}/other/missing.safetensors"}, r"weights: .* is outside this stack's data location"),
        ({"weights": "/etc/hostname"}, r"weights: '/etc/hostname' is not an s3:// URL"),
        ({"model": "evilmod:factory"}, r"model: 'evilmod:factory' is not a model of this stack; use one of "
                                       r"astromae-demo, astromae, astromae-random"),
        ({"model": "evilmod"}, r"model: 'evilmod' is not a model of this stack"),
    ]
    for config, pattern in cases:
        event = {"config": {"data": data, "model": MODEL, **config}, "execution_name": "refused"}
        _refused(handlers.initialize, event, pattern)
    _refused(handlers.initialize, {"config": {"data": data}, "execution_name": "../up"}, r"execution_name must be")
    _refused(handlers.initialize, {"config": {"data": data}, "execution_name": "a/b"}, r"execution_name must be")
    assert not stack["marker"].exists()
    assert storage.list_files(stack["runs"], recursive=True) == []

    # Spellings of the same place are one place: the plan holds the canonical URLs.
    state = handlers.initialize({"config": {"data": f"{root}/data//./tiny/", "model": MODEL,
                                            "result": f"{root}/runs//./canon/"}})
    assert state["result_url"] == f"{root}/runs/canon"
    assert storage.read_json(f"{root}/runs/canon/plan.json")["config"]["data"] == data

    # A model the stack lists at deploy time is accepted (and only then imported).
    monkeypatch.setenv("CAI_ALLOWED_MODELS", "evilmod:factory, other-model")
    assert trust.allowed_models()[-2:] == ["evilmod:factory", "other-model"]
    handlers.initialize({"config": {"data": data, "model": "evilmod:factory"}, "execution_name": "allowed"})
    assert stack["marker"].exists()


def test_weights_may_lie_under_the_data_or_weights_location(stack, monkeypatch):
    root = stack["root"]
    bucket, _, prefix = root[len("s3://"):].partition("/")
    assert trust.weights_url(f"{root}/data/w.safetensors") == f"{root}/data/w.safetensors"
    with pytest.raises(ConfigError, match=r"outside this stack's data location"):
        trust.weights_url(f"{root}/weights/w.safetensors")
    monkeypatch.setenv("CAI_WEIGHTS_BUCKET", bucket)
    monkeypatch.setenv("CAI_WEIGHTS_PREFIX", f"{prefix}/weights")
    assert trust.weights_url(f"{root}/weights//w.safetensors") == f"{root}/weights/w.safetensors"
    with pytest.raises(ConfigError, match=r"outside this stack's weights location s3://.*/weights/ or "
                                          r"s3://.*/data/"):
        trust.weights_url(f"{root}/weights/../other/w.safetensors")
    monkeypatch.setenv("CAI_WEIGHTS", "/opt/stack/weights.safetensors")   # the stack's own, set at deploy time
    assert trust.weights_url("/opt/stack/weights.safetensors") == "/opt/stack/weights.safetensors"


BAD_EVENTS = [
    (handlers.initialize, None, r"Initialize event must be a JSON object, got NoneType"),
    (handlers.initialize, [1, 2], r"Initialize event must be a JSON object, got list"),
    (handlers.initialize, "s3://b/x", r"Initialize event must be a JSON object, got str"),
    (handlers.initialize, {"config": {}, "extra": 1}, r"Initialize event: unknown key\(s\) extra"),
    (handlers.initialize, {"config": {}, "execution_name": 5}, r"execution_name must be"),
    (handlers.initialize, {"config": {}, "execution_name": ".."}, r"execution_name must be"),
    (handlers.initialize, {"aws": {"max_concurrency": "ten"}}, r"aws.max_concurrency must be an integer within "
                                                                r"0-10000, got 'ten'"),
    (handlers.initialize, {"aws": {"max_concurrency": 2.7}}, r"aws.max_concurrency .*got 2.7"),
    (handlers.initialize, {"aws": {"max_concurrency": True}}, r"aws.max_concurrency .*got True"),
    (handlers.initialize, {"aws": {"max_concurrency": -1}}, r"aws.max_concurrency .*got -1"),
    (handlers.initialize, {"aws": {"tolerated_failure_percentage": "5"}}, r"aws.tolerated_failure_percentage must "
                                                                           r"be a number within 0-100, got '5'"),
    (handlers.initialize, {"aws": {"tolerated_failure_percentage": True}}, r"tolerated_failure_percentage .*True"),
    (handlers.initialize, {"aws": {"tolerated_failure_percentage": 100.5}}, r"tolerated_failure_percentage .*100.5"),
    (handlers.initialize, {"aws": {"tolerated_failure_percentage": math.nan}}, r"tolerated_failure_percentage .*nan"),
    (handlers.infer, None, r"infer event must be a JSON object, got NoneType"),
    (handlers.infer, [], r"infer event must be a JSON object, got list"),
    (handlers.infer, "rank 0", r"infer event must be a JSON object, got str"),
    (handlers.infer, {"result_url": 5, "rank": 0, "plan_hash": "a" * 64, "task": {}},
     r"result_url must be a string URL, got int"),
    (handlers.infer, {"result_url": "s3://b/r", "rank": 0, "plan_hash": "a" * 64, "task": {}, "x": 1},
     r"infer event: unknown key\(s\) x"),
    (handlers.record_failure, [], r"record_failure event must be a JSON object, got list"),
    (handlers.infer, {"action": "record_failure", "result_url": "s3://b/r", "rank": True},
     r"rank must be an integer >= 0, got True"),
    (handlers.summarize, None, r"Summarize event must be a JSON object, got NoneType"),
    (handlers.summarize, {"result_url": ["s3://b/r"]}, r"result_url must be a string URL, got list"),
    (handlers.summarize, {"result_url": "s3://b/r", "allow_failures": "false"},
     r"allow_failures must be true or false, got 'false'"),
]
for _rank, _shown in ((0.9, "0.9"), (True, "True"), ("1", "'1'"), (-1, "-1"), (None, "None"), (1.0, "1.0")):
    BAD_EVENTS.append((handlers.infer, {"result_url": "s3://b/r", "rank": _rank, "plan_hash": "a" * 64, "task": {}},
                       rf"rank must be an integer >= 0, got {_shown}$"))


@pytest.mark.parametrize("handler, event, pattern", BAD_EVENTS,
                         ids=[f"{h.__name__}-{i}" for i, (h, _, _) in enumerate(BAD_EVENTS)])
def test_malformed_events_get_one_line(handler, event, pattern, monkeypatch):
    for var in ("CAI_DATA_BUCKET", "CAI_RESULT_BUCKET", "CAI_WEIGHTS_BUCKET"):
        monkeypatch.delenv(var, raising=False)
    _refused(handler, event, pattern)


@pytest.mark.parametrize("url, expected", [
    ("s3://b1b/a//b/./c/", "s3://b1b/a/b/c"), ("s3://b1b/a/../c", "s3://b1b/c"), ("s3://b1b", "s3://b1b"),
    ("s3://b1b/a/..", "s3://b1b"),
])
def test_canonical_s3(url, expected):
    assert trust.canonical_s3(url, "data") == expected


@pytest.mark.parametrize("url, pattern", [
    ("s3://b1b/../x", "climbs above its bucket"), ("s3://b1b/a%2Fb", "percent-escape"),
    ("s3://b1b/a\nb", "control character"), ("s3://B_B/x", "valid S3 bucket"), ("file:///etc", "not an s3:// URL"),
    ("http://b1b/x", "not an s3:// URL"),
])
def test_canonical_s3_refuses_what_it_cannot_read_one_way(url, pattern):
    with pytest.raises(ConfigError, match=pattern):
        trust.canonical_s3(url, "data")
