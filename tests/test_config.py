"""Run configs: native configs, the original CAI payload, and clear errors for bad input."""

from __future__ import annotations

import json

import pytest

from cosmicai.config import RunConfig, load_config
from cosmicai.errors import ConfigError

# The original CAI payload ("demo input.json"), verbatim.
PAYLOAD = {"bucket": "cosmicai-data", "file_limit": "11", "batch_size": 512, "object_type": "folder",
           "S3_object_name": "Anomaly Detection", "script": "/tmp/Anomaly Detection/Inference/inference.py",
           "result_path": "result-partition-100MB/1GB/1", "data_bucket": "cosmicai-data", "data_prefix": "100MB"}


def test_native_dict_with_overrides():
    cfg, unused = load_config({"data": "/d", "result": "/r", "batch_size": 64, "mode": "fast"},
                              batch_size=32, workers=None, world_size=3)
    assert isinstance(cfg, RunConfig) and unused == []
    assert (cfg.data, cfg.result, cfg.batch_size, cfg.mode, cfg.world_size, cfg.workers) == \
        ("/d", "/r", 32, "fast", 3, None)
    assert cfg.model == "astromae-demo" and cfg.backend == "local" and cfg.prefetch is True


def test_original_payload_is_mapped(tmp_path):
    path = tmp_path / "demo input.json"
    path.write_text(json.dumps(PAYLOAD))
    cfg, unused = load_config(str(path))
    assert cfg.data == "s3://cosmicai-data/100MB"
    assert cfg.result == "s3://cosmicai-data/result-partition-100MB/1GB/1"
    assert cfg.file_limit == 11 and isinstance(cfg.file_limit, int)
    assert cfg.batch_size == 512 and cfg.world_size is None
    assert sorted(unused) == ["S3_object_name", "object_type", "script"]


def test_payload_world_size_and_bucket_root(tmp_path):
    cfg, _ = load_config({**PAYLOAD, "world_size": "4"}, bucket_root=str(tmp_path))
    assert cfg.world_size == 4
    assert cfg.data == f"{tmp_path}/cosmicai-data/100MB"
    assert cfg.result == f"{tmp_path}/cosmicai-data/result-partition-100MB/1GB/1"


def test_bucket_map_maps_one_bucket():
    cfg, _ = load_config({**PAYLOAD, "data_bucket": "other"}, bucket_map={"other": "s3://mirror/x"})
    assert cfg.data == "s3://mirror/x/100MB"
    assert cfg.result == "s3://cosmicai-data/result-partition-100MB/1GB/1"


def test_yaml_config(tmp_path):
    path = tmp_path / "run.yaml"
    path.write_text("data: /d\nresult: /r\nbatch_size: 16\n")
    pytest.importorskip("yaml")
    cfg, _ = load_config(str(path))
    assert cfg.batch_size == 16


@pytest.mark.parametrize("raw, overrides, message", [
    ({"result": "/r"}, {}, "no data path"),
    ({"bucket": "b", "result_path": "r", "batch_size": 8}, {}, "no data path"),
    ({"data": "/d"}, {}, "no result path"),
    ({"data": "/d", "result": "/r", "batch_size": 0}, {}, "'batch_size' must be >= 1, got 0"),
    ({"data": "/d", "result": "/r"}, {"batch_size": -5}, "'batch_size' must be >= 1, got -5"),
    ({"data": "/d", "result": "/r", "batch_size": "big"}, {}, "'batch_size' must be an integer, got 'big'"),
    ({**PAYLOAD, "file_limit": "eleven"}, {}, "'file_limit' must be an integer, got 'eleven'"),
    ({"data": "/d", "result": "/r", "mode": "slow"}, {}, "'mode' must be one of exact|fast, got 'slow'"),
    ({"data": "/d", "result": "/r", "batch_sise": 4}, {}, "unknown key 'batch_sise'; did you mean 'batch_size'?"),
    ({**PAYLOAD, "data_prefx": "x"}, {}, "unknown key 'data_prefx'; did you mean 'data_prefix'?"),
    ({"data": "/d", "result": "/r"}, {"prefetch": "yes"}, "'prefetch' must be true or false"),
])
def test_bad_configs_name_the_key(raw, overrides, message):
    with pytest.raises(ConfigError) as err:
        load_config(raw, **overrides)
    assert message in str(err.value)


def test_unreadable_payload_names_file_and_json_error(tmp_path):
    path = tmp_path / "payload.json"
    path.write_text('{"bucket": "b", "file_limit": 3,,}')
    with pytest.raises(ConfigError) as err:
        load_config(str(path))
    assert str(path) in str(err.value) and "not valid JSON" in str(err.value) and "line 1 column" in str(err.value)


def test_missing_and_non_object_payload(tmp_path):
    with pytest.raises(ConfigError, match="cannot read run config .*nope.json.*no such file"):
        load_config(str(tmp_path / "nope.json"))
    path = tmp_path / "list.json"
    path.write_text("[1, 2]")
    with pytest.raises(ConfigError, match="must be a JSON object, got list"):
        load_config(str(path))


def test_deep_and_huge_configs_are_one_line_errors_naming_the_file(tmp_path, capsys):
    from cosmicai.cli import main
    from cosmicai.config import MAX_CONFIG_BYTES

    deep = tmp_path / "deep.json"
    deep.write_text('{"data": "/d", "result": "/r", "backend_options": ' + "[" * 100_000 + "]" * 100_000 + "}")
    with pytest.raises(ConfigError, match=rf"^{deep}: nested too deeply to be a run config \(at most 32 levels\)$"):
        load_config(str(deep))
    assert main(["run", str(deep)]) == 2
    assert capsys.readouterr().err == f"cai: error: {deep}: nested too deeply to be a run config (at most 32 levels)\n"
    moderately = tmp_path / "deep40.json"   # parsed fine, still refused before anything copies it
    moderately.write_text('{"data": "/d", "result": "/r", "backend_options": {"x": ' + "[" * 40 + "]" * 40 + "}}")
    with pytest.raises(ConfigError, match=rf"^{moderately}: nested too deeply"):
        load_config(str(moderately))
    huge = tmp_path / "huge.json"
    with open(huge, "wb") as fh:
        fh.truncate(MAX_CONFIG_BYTES * 64)
    with pytest.raises(ConfigError, match=rf"^{huge}: 67108864 bytes is too large for a run config \(at most 1024 KiB\)$"):
        load_config(str(huge))


def test_deep_yaml_and_alias_bombs_are_refused(tmp_path):
    pytest.importorskip("yaml")
    deep = tmp_path / "deep.yaml"
    deep.write_text("data: /d\nresult: /r\nbackend_options: " + "[" * 50_000 + "]" * 50_000 + "\n")
    with pytest.raises(ConfigError, match=rf"^{deep}: nested too deeply to be a run config"):
        load_config(str(deep))
    bomb = tmp_path / "bomb.yaml"
    lines = ["a0: &a0 [x, x, x, x, x, x, x, x, x, x]"]
    lines += [f"a{i}: &a{i} [*a{i - 1}, *a{i - 1}, *a{i - 1}, *a{i - 1}, *a{i - 1}, *a{i - 1}, *a{i - 1}, *a{i - 1}, "
              f"*a{i - 1}, *a{i - 1}]" for i in range(1, 9)]
    bomb.write_text("data: /d\nresult: /r\nbackend_options:\n" + "\n".join("  " + line for line in lines) + "\n")
    with pytest.raises(ConfigError, match=rf"^{bomb}: holds more than 100000 values, too many for a run config$"):
        load_config(str(bomb))


def test_allow_unsafe_lease_is_a_checked_flag_outside_the_plan():
    cfg, _ = load_config({"data": "/d", "result": "/r"}, allow_unsafe_lease=True)
    assert cfg.allow_unsafe_lease is True and "allow_unsafe_lease" not in cfg.plan_dict()
    assert load_config({"data": "/d", "result": "/r"})[0].allow_unsafe_lease is False
    with pytest.raises(ConfigError, match=r"^config: 'allow_unsafe_lease' must be true or false, got 'yes'$"):
        load_config({"data": "/d", "result": "/r", "allow_unsafe_lease": "yes"})
