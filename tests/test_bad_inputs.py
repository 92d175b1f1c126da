"""Malformed inputs through the public entry points: each gets its error class and a message naming the file or
field and the reason. Pickles that carry code are refused before anything runs (their marker never appears).

Two tables: ``API_CASES`` (``load_config``, ``make_plan``, ``partition.decode``/``read_partition``, ``run_task``,
``load_model(weights=...)``) and ``CLI_CASES`` (``cai run``/``cai data`` exit code and stderr). In the message
fragments ``{tmp}`` stands for the test's temporary folder.
"""

from __future__ import annotations

import io
import json
import os
import pickle
import shutil
import subprocess
import sys
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable

import numpy as np
import pytest
from safetensors.numpy import save as st_save

from cosmicai.cli import main
from cosmicai.config import load_config
from cosmicai.data.formats import FORMAT_NAME, FORMAT_VERSION, Partition, encode_partition
from cosmicai.data.partition import decode, read_partition
from cosmicai.errors import ConfigError, DataError, ModelError, StorageError, UnsafePickleError
from cosmicai.pipeline.plan import make_plan
from cosmicai.sizes import parse_size


@dataclass
class Ctx:
    tmp: Path          # this test's temporary folder
    data: str          # the session's tiny dataset (read-only)
    marker: Path       # a file that only a pickle payload would create

    def copy_data(self) -> Path:
        dst = self.tmp / "data"
        shutil.copytree(self.data, dst)
        return dst

    def manifest(self, dst: Path) -> dict:
        return json.loads((dst / "manifest.json").read_text())

    def write_manifest(self, dst: Path, raw: dict) -> None:
        (dst / "manifest.json").write_text(json.dumps(raw))

    def cfg(self, **kw: Any) -> Any:
        return load_config({"data": self.data, "result": str(self.tmp / "res"), "model": "astromae-random", **kw})[0]


def _arrays(n: int = 3) -> dict[str, np.ndarray]:
    rng = np.random.default_rng(7)
    return {"images": rng.random((n, 5, 32, 32), dtype=np.float32),
            "magnitudes": rng.uniform(15, 24, (n, 5)).astype(np.float32),
            "object_id": np.arange(n, dtype=np.int64), "redshift": rng.uniform(0, .4, n).astype(np.float32)}


def _st(arrays: dict[str, np.ndarray], **meta: str) -> bytes:
    """safetensors bytes with cosmicai metadata unless overridden."""
    return st_save(arrays, metadata={"format": FORMAT_NAME, "format_version": FORMAT_VERSION, "bands": "u,g,r,i,z",
                                     **meta})


def _header_bytes(header: bytes) -> bytes:
    """A file made of a safetensors length prefix and ``header`` (and nothing else)."""
    return len(header).to_bytes(8, "little") + header


def _valid() -> bytes:
    a = _arrays()
    return encode_partition(Partition(a["images"], a["magnitudes"], a["object_id"], a["redshift"]))


class _Payload:
    """Pickles to a call of ``func(*args)``: what an attacker's file does on a plain ``pickle.load``."""

    def __init__(self, func: Callable, *args: Any) -> None:
        self.func, self.args = func, args

    def __reduce__(self) -> tuple:
        return self.func, self.args


def _touch_cmd(marker: Path) -> str:
    return f"touch {marker}"


def _exec_src(marker: Path) -> str:
    return f"open({str(marker)!r}, 'w').write('pwned')"


def _torch_bytes(obj: Any, zip_format: bool = True) -> bytes:
    import torch

    buf = io.BytesIO()
    torch.save(obj, buf, _use_new_zipfile_serialization=zip_format)
    return buf.getvalue()


def _write(ctx: Ctx, name: str, data: bytes) -> Path:
    path = ctx.tmp / name
    path.write_bytes(data)
    return path


def _mutated_manifest(ctx: Ctx, change: Callable[[dict], None]) -> Callable[[], Any]:
    dst = ctx.copy_data()
    raw = ctx.manifest(dst)
    change(raw)
    ctx.write_manifest(dst, raw)
    return lambda: make_plan(load_config({"data": str(dst), "result": str(ctx.tmp / "res")})[0])


def _config_file(ctx: Ctx, name: str, text: str) -> Callable[[], Any]:
    path = _write(ctx, name, text.encode())
    return lambda: load_config(str(path))


def _load_model(path: Path) -> Callable[[], Any]:
    def action() -> Any:
        from cosmicai.models.registry import load_model

        return load_model("astromae", weights=str(path), threads=1)

    return action


def _load_weights(ctx: Ctx, name: str, data: bytes) -> Callable[[], Any]:
    return _load_model(_write(ctx, name, data))


def _zeros(*shape: int) -> Any:
    import torch

    return torch.zeros(*shape)


def _astromae_state() -> dict:
    """A real AstroMAE state dict (built once per session; ~15.8 M parameters)."""
    if not hasattr(_astromae_state, "cache"):
        from cosmicai.models.astromae.network import build_astromae

        _astromae_state.cache = {k: v.clone() for k, v in build_astromae(seed=0).state_dict().items()}
    return _astromae_state.cache


def _weights_with(change: Callable[[dict], None]) -> bytes:
    from cosmicai.models.astromae.weights_torch import save_weights

    state = dict(_astromae_state())
    change(state)
    return save_weights(state)


def _run_task_with_manifest_rows(ctx: Ctx) -> Callable[[], Any]:
    from cosmicai.pipeline.infer import run_task

    dst = ctx.copy_data()
    raw = ctx.manifest(dst)
    raw["partitions"][0]["rows"] += 1            # the file is intact, the manifest overstates its rows
    for p in raw["partitions"][1:]:
        p["first_row"] += 1
    raw.pop("total_rows", None)
    ctx.write_manifest(dst, raw)
    res = ctx.tmp / "res"
    make_plan(load_config({"data": str(dst), "result": str(res), "model": "astromae-random"})[0])
    return lambda: run_task(str(res), 0)


def _nan_partition() -> bytes:
    a = _arrays()
    a["images"][1, 2, 3, 4] = np.inf
    return _st(a)


def _f64(arrays: dict, key: str) -> dict:
    arrays[key] = arrays[key].astype(np.float64)
    return arrays


@dataclass
class Bad:
    id: str
    entry: str
    make: Callable[[Ctx], Callable[[], Any]]
    error: type
    says: tuple[str, ...]


def _without(d: dict, key: str) -> dict:
    return {k: v for k, v in d.items() if k != key}


API_CASES: list[Bad] = [
    # --- run configs --------------------------------------------------------------------------------------------
    Bad("config-not-json", "load_config", lambda c: _config_file(c, "run.json", "{data: oops"),
        ConfigError, ("{tmp}/run.json", "not valid JSON")),
    Bad("config-not-object", "load_config", lambda c: _config_file(c, "run.json", "[1, 2]"),
        ConfigError, ("{tmp}/run.json", "must be a JSON object, got list")),
    Bad("config-bad-yaml", "load_config", lambda c: _config_file(c, "run.yaml", "data: [unclosed"),
        ConfigError, ("{tmp}/run.yaml", "not valid YAML")),
    Bad("config-missing-file", "load_config", lambda c: (lambda: load_config(str(c.tmp / "nope.json"))),
        ConfigError, ("cannot read run config {tmp}/nope.json", "no such file")),
    Bad("config-unknown-key", "load_config",
        lambda c: lambda: load_config({"data": "d", "result": "r", "batchsize": 4}),
        ConfigError, ("unknown key 'batchsize'", "did you mean 'batch_size'")),
    Bad("config-batch-size-zero", "load_config",
        lambda c: lambda: load_config({"data": "d", "result": "r", "batch_size": 0}),
        ConfigError, ("'batch_size' must be >= 1, got 0",)),
    Bad("config-batch-size-text", "load_config",
        lambda c: lambda: load_config({"data": "d", "result": "r", "batch_size": "ten"}),
        ConfigError, ("'batch_size' must be an integer, got 'ten'",)),
    Bad("config-world-size-bool", "load_config",
        lambda c: lambda: load_config({"data": "d", "result": "r", "world_size": True}),
        ConfigError, ("'world_size' must be an integer, got True",)),
    Bad("config-bad-mode", "load_config", lambda c: lambda: load_config({"data": "d", "result": "r", "mode": "turbo"}),
        ConfigError, ("'mode' must be one of exact|fast, got 'turbo'",)),
    Bad("config-flag-not-bool", "load_config",
        lambda c: lambda: load_config({"data": "d", "result": "r", "allow_failures": "yes"}),
        ConfigError, ("'allow_failures' must be true or false, got 'yes'",)),
    Bad("config-no-result", "load_config", lambda c: lambda: load_config({"data": "d"}),
        ConfigError, ("no result path",)),
    Bad("payload-empty-bucket", "load_config",
        lambda c: lambda: load_config({"data_bucket": "", "data_prefix": "25MB", "bucket": "b", "result_path": "r"}),
        ConfigError, ("payload key 'data_bucket' must be a non-empty string",)),
    Bad("payload-no-prefix", "load_config",
        lambda c: lambda: load_config({"data_bucket": "cosmicai-data", "bucket": "b", "result_path": "r"}),
        ConfigError, ("lacks ['data_prefix']",)),
    # --- plans --------------------------------------------------------------------------------------------------
    Bad("plan-file-limit-too-big", "make_plan", lambda c: lambda: make_plan(c.cfg(file_limit=9)),
        ConfigError, ("file_limit is 9 but only 4 partition(s)",)),
    Bad("plan-dataset-missing", "make_plan",
        lambda c: lambda: make_plan(load_config({"data": str(c.tmp / "nowhere"), "result": str(c.tmp / "r")})[0]),
        DataError, ("{tmp}/nowhere", "dataset not found")),
    Bad("plan-dataset-empty", "make_plan",
        lambda c: (c.tmp.joinpath("empty").mkdir(),
                   lambda: make_plan(load_config({"data": str(c.tmp / "empty"), "result": str(c.tmp / "r")})[0]))[1],
        DataError, ("{tmp}/empty", "empty dataset")),
    Bad("plan-result-holds-other-run", "make_plan",
        lambda c: (make_plan(c.cfg(file_limit=1)), lambda: make_plan(c.cfg(file_limit=2)))[1],
        ConfigError, ("{tmp}/res already holds a run with a different config", "--overwrite")),
    # --- manifests ----------------------------------------------------------------------------------------------
    Bad("manifest-not-json", "make_plan",
        lambda c: (lambda d: ((d / "manifest.json").write_text("{oops"),
                              lambda: make_plan(load_config({"data": str(d), "result": str(c.tmp / "r")})[0]))[1]
                   )(c.copy_data()),
        StorageError, ("{tmp}/data/manifest.json", "not valid JSON")),
    Bad("manifest-duplicate-name", "make_plan",
        lambda c: _mutated_manifest(c, lambda m: m["partitions"].__setitem__(
            1, {**m["partitions"][1], "name": m["partitions"][0]["name"]})),
        DataError, ("manifest.json", "partitions[1] name", "appears twice")),
    Bad("manifest-path-in-name", "make_plan",
        lambda c: _mutated_manifest(c, lambda m: m["partitions"][0].update(name="../escape.safetensors")),
        DataError, ("manifest.json", "partitions[0] name '../escape.safetensors' is not a plain file name")),
    Bad("manifest-total-rows-text", "make_plan", lambda c: _mutated_manifest(c, lambda m: m.update(total_rows="abc")),
        DataError, ("manifest.json", "'total_rows' is 'abc', expected an integer")),
    Bad("manifest-wrong-bands", "make_plan", lambda c: _mutated_manifest(c, lambda m: m.update(bands=["g", "r"])),
        DataError, ("manifest.json", "'bands' is ['g', 'r']")),
    Bad("partition-header-is-list", "decode",
        lambda c: lambda: decode(_header_bytes(b'[1, 2]'), "bad.safetensors"),
        DataError, ("bad.safetensors", "corrupt safetensors header", "JSON object")),
    Bad("partition-header-no-offsets", "decode",
        lambda c: lambda: decode(_header_bytes(json.dumps({
            "__metadata__": {"format": FORMAT_NAME, "format_version": FORMAT_VERSION},
            "images": {"dtype": "F32", "shape": [1]}}).encode()), "bad.safetensors"),
        DataError, ("bad.safetensors", "bad tensor entry")),
    Bad("config-bucket-map-not-mapping", "load_config",
        lambda c: lambda: load_config({"data": "d", "result": "r"}, bucket_map=["a"]),
        ConfigError, ("bucket_map: expected a mapping",)),
    Bad("size-overflow", "parse_size", lambda c: lambda: parse_size("1e400MB", "b", "--partition-size"),
        ConfigError, ("--partition-size", "'1e400MB' is too large")),
    Bad("size-below-one-byte", "parse_size", lambda c: lambda: parse_size("0.0000001", "b", "--partition-size"),
        ConfigError, ("--partition-size", "must be at least one byte")),
    Bad("manifest-version", "make_plan", lambda c: _mutated_manifest(c, lambda m: m.update(format_version="9")),
        DataError, ("manifest.json", "unsupported manifest format_version '9'")),
    Bad("manifest-entry-no-sha256", "make_plan",
        lambda c: _mutated_manifest(c, lambda m: m["partitions"][1].pop("sha256")),
        DataError, ("manifest.json", "partitions[1] is malformed", "sha256")),
    Bad("manifest-first-row-gap", "make_plan",
        lambda c: _mutated_manifest(c, lambda m: m["partitions"][2].update(first_row=99)),
        DataError, ("manifest.json", "partitions[2] (part-000003.safetensors) first_row is 99, expected 24")),
    Bad("manifest-total-rows", "make_plan", lambda c: _mutated_manifest(c, lambda m: m.update(total_rows=1000)),
        DataError, ("manifest.json", "'total_rows' is 1000 but the partitions add up to 48")),
    Bad("manifest-negative-rows", "make_plan",
        lambda c: _mutated_manifest(c, lambda m: (m.pop("total_rows"), m["partitions"][3].update(rows=-1))),
        DataError, ("manifest.json", "part-000004.safetensors", "negative rows")),
    Bad("manifest-no-partitions", "make_plan",
        lambda c: _mutated_manifest(c, lambda m: (m.update(partitions=[]), m.pop("total_rows"), m.pop("total_bytes"))),
        DataError, ("manifest.json", "lists no partitions")),
    Bad("manifest-overstates-rows", "run_task", _run_task_with_manifest_rows,
        DataError, ("part-000001.safetensors", "holds 12 rows but the manifest lists 13")),
    # --- partitions ---------------------------------------------------------------------------------------------
    Bad("partition-empty", "partition.decode", lambda c: lambda: decode(b"", "p.safetensors"),
        DataError, ("p.safetensors", "truncated file (0 bytes)")),
    Bad("partition-truncated", "partition.decode", lambda c: lambda: decode(_valid()[:-100], "p.safetensors"),
        DataError, ("p.safetensors", "truncated or corrupt partition")),
    Bad("partition-header-garbage", "partition.decode",
        lambda c: lambda: decode((20).to_bytes(8, "little") + b"\xff" * 20 + b"\0" * 40, "p.safetensors"),
        DataError, ("p.safetensors", "corrupt safetensors header")),
    Bad("partition-foreign-safetensors", "partition.decode",
        lambda c: lambda: decode(st_save(_arrays()), "p.safetensors"),
        DataError, ("p.safetensors", "not a cosmicai partition")),
    Bad("partition-future-version", "partition.decode",
        lambda c: lambda: decode(_st(_arrays(), format_version="2"), "p.safetensors"),
        DataError, ("p.safetensors", "unsupported format_version '2'")),
    Bad("partition-3-bands", "partition.decode",
        lambda c: lambda: decode(_st({**_arrays(), "images": np.zeros((3, 3, 32, 32), np.float32)}), "p.safetensors"),
        DataError, ("p.safetensors", "'images' has shape (3, 3, 32, 32), expected [N, 5, 32, 32]")),
    Bad("partition-f64-magnitudes", "partition.decode",
        lambda c: lambda: decode(_st(_f64(_arrays(), "magnitudes")), "p.safetensors"),
        DataError, ("p.safetensors", "'magnitudes' has dtype float64, expected float32")),
    Bad("partition-no-object-id", "partition.decode",
        lambda c: lambda: decode(_st(_without(_arrays(), "object_id")), "p.safetensors"),
        DataError, ("p.safetensors", "missing tensor(s) ['object_id']")),
    Bad("partition-extra-tensor", "partition.decode",
        lambda c: lambda: decode(_st({**_arrays(), "labels": np.zeros(3, np.int64)}), "p.safetensors"),
        DataError, ("p.safetensors", "unexpected tensor(s) ['labels']")),
    Bad("partition-inf-pixel", "partition.decode", lambda c: lambda: decode(_nan_partition(), "p.safetensors"),
        DataError, ("p.safetensors", "1 row(s) have NaN or inf", "first rows: [1]")),
    Bad("partition-unknown-suffix", "partition.decode", lambda c: lambda: decode(_valid(), "p.npz"),
        DataError, ("p.npz", "unsupported partition format")),
    Bad("partition-missing-file", "read_partition",
        lambda c: lambda: read_partition(str(c.tmp / "gone.safetensors")),
        StorageError, ("{tmp}/gone.safetensors", "no such file")),
    Bad("partition-empty-file", "read_partition",
        lambda c: (lambda p: lambda: read_partition(str(p)))(_write(c, "zero.safetensors", b"")),
        DataError, ("{tmp}/zero.safetensors", "empty or unreadable partition")),
    Bad("legacy-pt-holds-dict", "partition.decode",
        lambda c: lambda: decode(_torch_bytes({"images": _zeros(2, 5, 32, 32)}), "1.pt"),
        DataError, ("1.pt", "holds a dict, expected a TensorDataset")),
    Bad("legacy-pt-garbage", "partition.decode", lambda c: lambda: decode(b"PK\x03\x04" + b"\x00" * 64, "2.pt"),
        DataError, ("2.pt", "truncated or corrupt .pt file")),
    # --- pickles carrying code (the marker must never appear) ---------------------------------------------------
    Bad("pickle-pt-os-system", "partition.decode",
        lambda c: lambda: decode(_torch_bytes(_Payload(os.system, _touch_cmd(c.marker))), "evil.pt"),
        UnsafePickleError, ("evil.pt", "refused to unpickle", "system", "nothing was executed")),
    Bad("pickle-pt-legacy-format-exec", "partition.decode",
        lambda c: lambda: decode(_torch_bytes(_Payload(exec, _exec_src(c.marker)), zip_format=False), "old.pt"),
        UnsafePickleError, ("old.pt", "refused to unpickle", "exec")),
    Bad("pickle-weights-checkpoint-os-system", "load_model(weights=)",
        lambda c: _load_weights(c, "evil-ckpt.pt", _torch_bytes(_Payload(os.system, _touch_cmd(c.marker)))),
        UnsafePickleError, ("{tmp}/evil-ckpt.pt", "refusing to unpickle global", "system")),
    Bad("pickle-weights-raw-pickle", "load_model(weights=)",
        lambda c: _load_weights(c, "evil.pkl", pickle.dumps(_Payload(exec, _exec_src(c.marker)))),
        ModelError, ("{tmp}/evil.pkl", "a raw Python pickle", "nothing was executed")),
    Bad("pickle-disguised-as-partition", "read_partition",
        lambda c: (lambda p: lambda: read_partition(str(p)))(
            _write(c, "x.safetensors", pickle.dumps(_Payload(os.system, _touch_cmd(c.marker))))),
        DataError, ("{tmp}/x.safetensors", "safetensors header")),
    # --- weights ------------------------------------------------------------------------------------------------
    Bad("weights-missing-file", "load_model(weights=)", lambda c: _load_model(c.tmp / "none.safetensors"),
        ModelError, ("cannot read weights '{tmp}/none.safetensors'",)),
    Bad("weights-not-safetensors", "load_model(weights=)",
        lambda c: _load_weights(c, "w.safetensors", b"\x10\x00\x00\x00\x00\x00\x00\x00not json at all!"),
        ModelError, ("{tmp}/w.safetensors", "not a checkpoint", "import-cai")),
    Bad("weights-foreign-keys", "load_model(weights=)",
        lambda c: _load_weights(c, "w.safetensors", st_save({"encoder.weight": np.zeros((2, 2), np.float32)})),
        ModelError, ("{tmp}/w.safetensors", "checkpoint does not fit AstroMAE", "missing tensor(s)",
                     "1 unexpected tensor(s) (no such name in the cosmicai AstroMAE): encoder.weight")),
    Bad("weights-wrong-shape", "load_model(weights=)",
        lambda c: _load_weights(c, "w.safetensors", _weights_with(
            lambda s: s.update({k: s[k][:-1].clone() for k in [next(k for k in s if k.endswith("fc.2.weight")
                                                                        or k.endswith("head.weight"))]}))),
        ModelError, ("{tmp}/w.safetensors", "tensor(s) with the wrong shape")),
    Bad("weights-nan", "load_model(weights=)",
        lambda c: _load_weights(c, "w.safetensors", _weights_with(
            lambda s: s.update({k: s[k].clone().fill_(float("nan")) for k in [next(iter(s))]}))),
        ModelError, ("{tmp}/w.safetensors", "contain NaN or inf")),
]


@pytest.mark.parametrize("case", API_CASES, ids=[c.id for c in API_CASES])
def test_bad_input_is_rejected_with_reason(case: Bad, tiny_dataset, tmp_path):
    ctx = Ctx(tmp_path, tiny_dataset, tmp_path / "PWNED")
    action = case.make(ctx)
    with pytest.raises(case.error) as err:
        action()
    message = str(err.value)
    for fragment in case.says:
        assert fragment.format(tmp=tmp_path) in message, f"{case.id}: {fragment!r} not in {message!r}"
    assert not ctx.marker.exists(), f"{case.id}: the pickle's code ran"


@pytest.mark.parametrize("fmt", ["raw-pickle", "torch-zip", "torch-legacy"])
def test_pickle_payloads_do_run_when_unpickled_unsafely(fmt, tmp_path):
    """Control for the marker checks above: an unrestricted unpickler does create the marker."""
    import torch

    marker = tmp_path / "PWNED"
    payload = _Payload(exec, _exec_src(marker))
    if fmt == "raw-pickle":
        pickle.loads(pickle.dumps(payload))
    else:
        torch.load(io.BytesIO(_torch_bytes(payload, zip_format=fmt == "torch-zip")), weights_only=False)
    assert marker.read_text() == "pwned"


# --- the CLI: exit code 2 (bad input) or 1 (bad data found), and the reason on stderr -----------------------------

@dataclass
class BadCli:
    id: str
    make: Callable[[Ctx], list[str]]
    rc: int
    says: tuple[str, ...]


def _evil_npz(ctx: Ctx) -> str:
    arrays = _arrays()
    buf = io.BytesIO()
    np.savez(buf, images=arrays["images"], magnitudes=np.array([_Payload(os.system, _touch_cmd(ctx.marker))] * 3,
                                                              dtype=object))
    return str(_write(ctx, "evil.npz", buf.getvalue()))


def _corrupt_copy(ctx: Ctx) -> str:
    dst = ctx.copy_data()
    victim = dst / "part-000002.safetensors"
    raw = bytearray(victim.read_bytes())
    raw[-7] ^= 0x55
    victim.write_bytes(bytes(raw))
    return str(dst)


CLI_CASES: list[BadCli] = [
    BadCli("run-unknown-key-file", lambda c: ["run", str(_write(c, "cfg.json", json.dumps(
        {"data": c.data, "result": str(c.tmp / "r"), "threds": 2}).encode()))],
        2, ("cai: error:", "{tmp}/cfg.json: unknown key 'threds'; did you mean 'threads'?")),
    BadCli("run-dataset-missing", lambda c: ["run", "--data", str(c.tmp / "none"), "--result", str(c.tmp / "r")],
           2, ("cai: error:", "{tmp}/none: dataset not found")),
    BadCli("run-world-size-zero", lambda c: ["run", "--data", c.data, "--result", str(c.tmp / "r"), "--world-size", "0"],
           2, ("cai: error:", "'world_size' must be >= 1, got 0")),
    BadCli("run-unknown-model", lambda c: ["run", "--data", c.data, "--result", str(c.tmp / "r"), "--model", "gpt-9",
                                           "--workers", "1", "--threads", "1", "--quiet", "--file-limit", "1"],
           2, ("cai: error:", "model: model 'gpt-9' is not known")),
    BadCli("data-verify-corrupt", lambda c: ["data", "verify", _corrupt_copy(c), "--quiet"],
           1, ("BAD part-000002.safetensors: checksum mismatch", "1 of 4 partition(s) bad: part-000002.safetensors")),
    BadCli("data-verify-missing", lambda c: ["data", "verify", str(c.tmp / "none"), "--quiet"],
           2, ("cai: error:", "{tmp}/none: dataset not found")),
    BadCli("data-convert-npz-object-pickle", lambda c: ["data", "convert", _evil_npz(c), "--out", str(c.tmp / "o"),
                                                        "--quiet"],
           2, ("cai: error:", "{tmp}/evil.npz", "object arrays are refused")),
]


@pytest.mark.parametrize("case", CLI_CASES, ids=[c.id for c in CLI_CASES])
def test_cli_rejects_bad_input(case: BadCli, tiny_dataset, tmp_path, capsys):
    ctx = Ctx(tmp_path, tiny_dataset, tmp_path / "PWNED")
    argv = case.make(ctx)
    rc = main(argv)
    err = capsys.readouterr().err
    assert rc == case.rc, err
    for fragment in case.says:
        assert fragment.format(tmp=tmp_path) in err, f"{case.id}: {fragment!r} not in {err!r}"
    assert "Traceback" not in err
    assert not ctx.marker.exists(), f"{case.id}: the pickle's code ran"


def test_cai_process_exits_2_with_one_line_reason(tmp_path):
    """The installed entry point, as a user runs it: exit status 2, the reason on stderr, no traceback."""
    proc = subprocess.run([sys.executable, "-m", "cosmicai.cli", "run", "--data", str(tmp_path / "none"),
                           "--result", str(tmp_path / "r"), "--batch-size", "-3"],
                          capture_output=True, text=True, timeout=120)
    assert proc.returncode == 2
    assert proc.stderr.strip() == "cai: error: config: 'batch_size' must be >= 1, got -3"
    assert not (tmp_path / "r").exists()
