"""`cai data synth|split|convert|info|verify` end to end through the CLI entry point."""

from __future__ import annotations

import json
import os

import numpy as np
import pytest

from cosmicai.cli import main
from cosmicai.data.formats import read_manifest
from cosmicai.data.partition import read_partition


def test_synth_info_verify(tmp_path, capsys):
    out = str(tmp_path / "synth")
    assert main(["data", "synth", "--galaxies", "7", "--out", out, "--partition-size", str(3 * 20_508),
                 "--workers", "1", "--seed", "3", "--quiet"]) == 0
    assert "3 partition(s), 7 rows" in capsys.readouterr().out
    manifest = read_manifest(out)
    assert [p.rows for p in manifest.partitions] == [3, 3, 1]
    last = read_partition(os.path.join(out, "part-000003.safetensors"))
    assert last.object_id.tolist() == [6] and last.redshift is not None and np.isfinite(last.images).all()
    assert main(["data", "info", out, "--json"]) == 0
    info = json.loads(capsys.readouterr().out)
    assert (info["partitions"], info["rows"], info["has_redshift"]) == (3, 7, True)
    assert info["bytes"] == sum(p.bytes for p in manifest.partitions)
    assert main(["data", "info", out]) == 0
    assert "rows        7" in capsys.readouterr().out
    assert main(["data", "verify", out, "--quiet"]) == 0
    assert "ok: 3 partition(s), 7 rows" in capsys.readouterr().out


def test_verify_names_corrupt_and_truncated_partitions(tiny_dataset, tmp_path, capsys):
    out = str(tmp_path / "copy")
    assert main(["data", "split", tiny_dataset, "--out", out, "--partition-size", "0.25MB", "--quiet"]) == 0
    capsys.readouterr()
    flipped = os.path.join(out, "part-000002.safetensors")
    data = bytearray(open(flipped, "rb").read())
    data[len(data) // 2] ^= 0x01
    open(flipped, "wb").write(bytes(data))
    truncated = os.path.join(out, "part-000004.safetensors")
    data = open(truncated, "rb").read()
    open(truncated, "wb").write(data[:-7])
    assert main(["data", "verify", out, "--quiet"]) == 1
    err = capsys.readouterr().err
    assert "BAD part-000002.safetensors: checksum mismatch" in err
    assert "BAD part-000004.safetensors: size" in err and "truncated" in err
    assert "2 of 4 partition(s) bad: part-000002.safetensors, part-000004.safetensors" in err
    os.remove(os.path.join(out, "manifest.json"))  # without a manifest, decoding still catches truncation
    assert main(["data", "verify", out, "--quiet"]) == 1
    assert "BAD part-000004.safetensors: " in capsys.readouterr().err


def test_cli_bad_input_exits_2_with_reason(tiny_dataset, tmp_path, capsys):
    with pytest.raises(SystemExit) as exc:
        main(["data", "split", tiny_dataset, "--out", str(tmp_path / "o"), "--bogus-flag"])
    assert exc.value.code == 2
    assert "unrecognized arguments: --bogus-flag" in capsys.readouterr().err
    assert main(["data", "split", tiny_dataset, "--out", str(tmp_path / "o"), "--partition-size", "1KB"]) == 2
    assert "cai: error: --partition-size: '1KB' (1024 bytes) is smaller than one sample" in capsys.readouterr().err
    assert main(["data", "info", str(tmp_path / "nothing")]) == 2
    assert "dataset not found" in capsys.readouterr().err
    assert main(["data", "convert", str(tmp_path / "nothing.h5"), "--out", str(tmp_path / "o")]) == 2
    assert "nothing.h5: source not found" in capsys.readouterr().err
