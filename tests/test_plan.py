"""Planning: the original rank rule, plan.json / tasks.json, re-planning and its errors."""

from __future__ import annotations

import json
import math
import os

import pytest

from cosmicai.config import load_config
from cosmicai.errors import ConfigError, DataError
from cosmicai.pipeline.plan import assign_ranks, load_plan, make_plan


def original_rule(n_files: int, world_size: int) -> list[list[int]]:
    """The original CAI Initialize loop, written out independently."""
    ranks, next_file = [], 0
    for rank in range(world_size):
        files_left, ranks_left = n_files - next_file, world_size - rank
        count = -(-files_left // ranks_left) if files_left > 0 else 0
        ranks.append([next_file + i for i in range(count)])
        next_file += count
    return ranks


@pytest.mark.parametrize("n_files", [0, 1, 2, 3, 5, 7, 10, 11, 16, 33, 100])
@pytest.mark.parametrize("world_size", [1, 2, 3, 4, 6, 8, 11, 12, 40])
def test_assign_ranks_matches_original_rule(n_files, world_size):
    got = assign_ranks(n_files, world_size)
    assert got == original_rule(n_files, world_size)
    assert len(got) == world_size
    assert sorted(i for r in got for i in r) == list(range(n_files))       # every file exactly once
    sizes = [len(r) for r in got if r]
    assert not sizes or max(sizes) == math.ceil(n_files / world_size)


def test_assign_ranks_examples():
    assert assign_ranks(11, 4) == [[0, 1, 2], [3, 4, 5], [6, 7, 8], [9, 10]]
    assert assign_ranks(2, 4) == [[0], [1], [], []]
    with pytest.raises(ConfigError):
        assign_ranks(3, 0)


def _cfg(data, result, **kw):
    return load_config({"data": data, "result": result, **kw})[0]


def test_make_plan_writes_plan_and_tasks(tiny_dataset, tmp_path):
    result = str(tmp_path / "res")
    plan = make_plan(_cfg(tiny_dataset, result, world_size=3, batch_size=5))
    raw = json.loads((tmp_path / "res" / "plan.json").read_text())
    assert raw["plan_hash"] == plan.plan_hash and len(plan.plan_hash) == 64
    assert raw["config"]["batch_size"] == 5 and raw["config"]["world_size"] == 3
    assert [p["name"] for p in raw["partitions"]] == [f"part-{i:06d}.safetensors" for i in range(1, 5)]
    assert {r: [p["name"] for p in parts] for r, parts in plan.tasks.items()} == {
        0: ["part-000001.safetensors", "part-000002.safetensors"], 1: ["part-000003.safetensors"],
        2: ["part-000004.safetensors"]}
    first = raw["partitions"][raw["tasks"]["0"][0]]   # each partition once; tasks index into them
    assert first["rows"] == 12 and first["bytes"] == os.path.getsize(first["url"]) and len(first["sha256"]) == 64
    tasks = json.loads((tmp_path / "res" / "tasks.json").read_text())
    assert [{k: t[k] for k in ("result_url", "rank", "plan_hash")} for t in tasks] == [
        {"result_url": result, "rank": r, "plan_hash": plan.plan_hash} for r in range(3)]
    # each item carries its own rank's partitions and the run config: a worker reads nothing else
    assert [[p["name"] for p in t["task"]["partitions"]] for t in tasks] == [
        [p["name"] for p in plan.tasks[r]] for r in range(3)]
    assert tasks[0]["task"]["config"] == plan.config and raw["tasks"]["0"] == [0, 1]   # plan.json: indices
    loaded = load_plan(result)
    assert loaded.plan_hash == plan.plan_hash and loaded.tasks == plan.tasks and loaded.total_rows == 48


def test_default_world_size_file_limit_and_empty_ranks(tiny_dataset, tmp_path):
    plan = make_plan(_cfg(tiny_dataset, str(tmp_path / "a"), file_limit=3))
    assert plan.world_size == 3 and [len(plan.tasks[r]) for r in range(3)] == [1, 1, 1]
    plan = make_plan(_cfg(tiny_dataset, str(tmp_path / "b"), world_size=6))
    assert plan.world_size == 6 and plan.ranks == [0, 1, 2, 3]         # ranks 4, 5 get no partitions
    assert sorted(plan.tasks) == [0, 1, 2, 3]                          # and are never materialised
    assert [t["rank"] for t in json.loads((tmp_path / "b" / "tasks.json").read_text())] == [0, 1, 2, 3]


def test_replan_same_config_keeps_hash_and_other_config_is_refused(tiny_dataset, tmp_path):
    result = str(tmp_path / "res")
    first = make_plan(_cfg(tiny_dataset, result, world_size=2, workers=1))
    again = make_plan(_cfg(tiny_dataset, result, world_size=2, workers=2, threads=1))   # not part of the plan
    assert again.plan_hash == first.plan_hash and again.created_at == first.created_at
    with pytest.raises(ConfigError) as err:
        make_plan(_cfg(tiny_dataset, result, world_size=3))
    assert result in str(err.value) and "--overwrite" in str(err.value)
    (tmp_path / "res" / "ranks").mkdir()
    (tmp_path / "res" / "ranks" / "0.json").write_text("{}")
    replaced = make_plan(_cfg(tiny_dataset, result, world_size=3, overwrite=True))
    assert replaced.plan_hash != first.plan_hash and replaced.world_size == 3
    assert not (tmp_path / "res" / "ranks" / "0.json").exists()
    assert load_plan(result).plan_hash == replaced.plan_hash


def test_plan_errors(tiny_dataset, tmp_path):
    with pytest.raises(ConfigError) as err:
        make_plan(_cfg(tiny_dataset, str(tmp_path / "r"), file_limit=5))
    assert "file_limit is 5 but only 4 partition(s) are available" in str(err.value)
    assert tiny_dataset in str(err.value)
    with pytest.raises(DataError, match="no plan found"):
        load_plan(str(tmp_path / "nothing"))
    with pytest.raises(DataError, match="not found|empty"):
        make_plan(_cfg(str(tmp_path / "no-such-data"), str(tmp_path / "r2")))


def test_replan_names_partitions_that_changed_since_planning(tiny_dataset, tmp_path):
    import shutil

    data = tmp_path / "listed"                      # no manifest: the plan comes from a listing
    data.mkdir()
    for i in (1, 2, 3):
        shutil.copy(os.path.join(tiny_dataset, f"part-00000{i}.safetensors"), data)
    result = str(tmp_path / "res")
    first = make_plan(_cfg(str(data), result))
    victim = data / "part-000002.safetensors"
    good = victim.read_bytes()
    victim.unlink()
    with pytest.raises(DataError, match="partition.s. part-000002.safetensors planned in .* are missing"):
        make_plan(_cfg(str(data), result))
    victim.write_bytes(good)   # a file put back (or replaced by a same-named, same-sized one) is a changed file
    with pytest.raises(ConfigError, match=r"changed: \['part-000002.safetensors'\]; a changed partition has another "
                                          r"size, checksum or modification time"):
        make_plan(_cfg(str(data), result))
    stat = os.stat(os.path.join(tiny_dataset, "part-000002.safetensors"))
    planned = next(p for p in first.partitions if p["name"] == "part-000002.safetensors")
    mtime = float(planned["fingerprint"].removeprefix("mtime:"))
    os.utime(victim, (stat.st_atime, mtime))   # the very file restored as it was: the plan resumes
    assert make_plan(_cfg(str(data), result)).plan_hash == first.plan_hash
    shutil.copy(os.path.join(tiny_dataset, "part-000004.safetensors"), data)
    with pytest.raises(ConfigError, match=r"dataset changed .*new: \['part-000004.safetensors'\]"):
        make_plan(_cfg(str(data), result))


def test_a_file_added_before_the_planned_ones_is_named_as_added(tiny_dataset, tmp_path):
    import shutil

    data = tmp_path / "listed"                      # no manifest; file_limit takes the first files in name order
    data.mkdir()
    for i in (1, 3, 4):
        shutil.copy(os.path.join(tiny_dataset, f"part-00000{i}.safetensors"), data / f"{i}.safetensors")
    result = str(tmp_path / "res")
    plan = make_plan(_cfg(str(data), result, file_limit=2))
    assert [p["name"] for p in plan.partitions] == ["1.safetensors", "3.safetensors"]
    shutil.copy(os.path.join(tiny_dataset, "part-000002.safetensors"), data / "0.safetensors")
    with pytest.raises(ConfigError) as err:
        make_plan(_cfg(str(data), result, file_limit=2))
    message = str(err.value)
    assert message.startswith(f"{data}: partition(s) 0.safetensors were added to the dataset since {result} was "
                              "planned and now come before planned partition(s) 3.safetensors (file_limit 2")
    assert "missing" not in message and "\n" not in message
    (data / "3.safetensors").unlink()               # a planned file really gone is still named as missing
    with pytest.raises(DataError, match=r"partition\(s\) 3.safetensors planned in .* are missing from the dataset"):
        make_plan(_cfg(str(data), result, file_limit=2))


def test_task_digests_hold_one_line_per_rank(tiny_dataset, tmp_path):
    from cosmicai.pipeline.plan import stored_task_digest, task_digest, verify_task_item
    from cosmicai.results import TASK_DIGESTS_NAME

    result = str(tmp_path / "res")
    plan = make_plan(_cfg(tiny_dataset, result, world_size=3))
    items = json.loads((tmp_path / "res" / "tasks.json").read_text())
    lines = (tmp_path / "res" / TASK_DIGESTS_NAME).read_text().splitlines()
    assert lines == [task_digest(item) for item in items] and len(lines) == len(plan.ranks) == 3
    assert [stored_task_digest(result, r) for r in range(4)] == lines + [None]
    for item in items:
        verify_task_item(item)
    changed = dict(items[1], task=dict(items[1]["task"], world_size=4))
    with pytest.raises(ConfigError, match="the task item for rank 1 differs from the one the plan wrote"):
        verify_task_item(changed)
    with pytest.raises(ConfigError, match=r"rank 3 is not in the plan \(ranks 0-2\)"):
        verify_task_item(dict(items[0], rank=3))
