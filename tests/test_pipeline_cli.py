"""`cai run` with the original CAI payload and bad inputs, and `cai demo` on a handful of galaxies."""

from __future__ import annotations

import json
import os
import shutil

import pyarrow.parquet as pq

from cosmicai.cli import main

PAYLOAD = {"bucket": "cai-results", "file_limit": "3", "batch_size": 8, "object_type": "folder",
           "S3_object_name": "Anomaly Detection", "script": "/tmp/Anomaly Detection/Inference/inference.py",
           "result_path": "result-partition-25MB/1GB/1", "data_bucket": "cosmicai-data", "data_prefix": "25MB"}


def test_original_payload_runs_with_bucket_root(tiny_dataset, tmp_path, capsys):
    shutil.copytree(tiny_dataset, tmp_path / "cosmicai-data" / "25MB")
    payload = tmp_path / "demo input.json"
    payload.write_text(json.dumps(PAYLOAD))
    rc = main(["run", str(payload), "--bucket-root", str(tmp_path), "--model", "astromae-random",
               "--workers", "1", "--threads", "1", "--quiet"])
    out, err = capsys.readouterr()
    assert rc == 0, err
    assert "not used by cosmicai: object_type, S3_object_name, script" in err
    result = tmp_path / "cai-results" / "result-partition-25MB" / "1GB" / "1"
    combined = json.loads((result / "combined_data.json").read_text())
    assert [r["data_path"] for r in combined] == [f"25MB/part-00000{i}.safetensors" for i in (1, 2, 3)]
    assert all(r["batch_size"] == 8 and r["num_batches"] == 2 for r in combined)
    assert pq.read_table(result / "predictions.parquet").num_rows == 36
    assert "rows in 36 / out 36" in out and str(result) in out


def test_cli_bad_inputs_exit_2_with_reason(tiny_dataset, tmp_path, capsys):
    rc = main(["run", "--data", tiny_dataset, "--result", str(tmp_path / "r"), "--file-limit", "9"])
    assert rc == 2 and "file_limit is 9 but only 4 partition(s) are available" in capsys.readouterr().err
    rc = main(["run", "--result", str(tmp_path / "r")])
    assert rc == 2 and "no data path" in capsys.readouterr().err
    rc = main(["run", "--data", tiny_dataset, "--result", str(tmp_path / "r"), "--batch-size", "0"])
    assert rc == 2 and "'batch_size' must be >= 1, got 0" in capsys.readouterr().err
    cfg = tmp_path / "cfg.json"
    cfg.write_text(json.dumps({"data": tiny_dataset, "result": str(tmp_path / "r"), "wokers": 2}))
    rc = main(["run", str(cfg)])
    assert rc == 2 and "unknown key 'wokers'; did you mean 'workers'?" in capsys.readouterr().err
    assert not os.path.exists(tmp_path / "r" / "ranks")


def test_failed_ranks_exit_nonzero_unless_allowed(tiny_dataset, tmp_path, capsys):
    data = tmp_path / "data"
    shutil.copytree(tiny_dataset, data)
    (data / "part-000002.safetensors").write_bytes(b"truncated")
    args = ["run", "--data", str(data), "--result", str(tmp_path / "r"), "--model", "astromae-random",
            "--workers", "1", "--threads", "1", "--quiet", "--file-limit", "2"]
    assert main(args) == 1
    out, err = capsys.readouterr()
    assert "rank 1 failed" in err and "FAILED rank 1" in out
    assert main(args + ["--allow-failures"]) == 0


def test_demo_small(tmp_path, capsys):
    out_dir = tmp_path / "demo"
    rc = main(["demo", "--galaxies", "20", "--out", str(out_dir), "--partition-size", "150KB",
               "--model", "astromae-random", "--workers", "1", "--threads", "1", "--quiet"])
    out, err = capsys.readouterr()
    assert rc == 0, err
    manifest = json.loads((out_dir / "data" / "manifest.json").read_text())
    assert manifest["total_rows"] == 20 and len(manifest["partitions"]) == 3      # 7 + 7 + 6 rows
    summary = json.loads((out_dir / "results" / "summary.json").read_text())
    assert summary["completeness"]["complete"] and summary["completeness"]["rows_out"] == 20
    assert summary["metrics"]["n"] == 20
    assert "metrics (n=20" in out and str(out_dir / "results") in out


def test_allow_unsafe_lease_reaches_the_lease(tiny_dataset, s3_url, monkeypatch, capsys):
    """rclone ignores conditional writes: a run there is refused unless the risk is accepted by flag or argument."""
    import cosmicai

    monkeypatch.delenv("CAI_ALLOW_UNSAFE_LEASE", raising=False)
    args = ["run", "--data", tiny_dataset, "--result", f"{s3_url}/cli", "--model", "astromae-random",
            "--workers", "1", "--threads", "1", "--quiet"]
    assert main(args) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "ignores conditional writes" in err and "--allow-unsafe-lease" in err
    assert main(args + ["--allow-unsafe-lease"]) == 0
    out, err = capsys.readouterr()
    assert "rows in 48 / out 48" in out and "ignores conditional writes" in err
    result = cosmicai.run(tiny_dataset, f"{s3_url}/api", model="astromae-random", workers=1, threads=1,
                          allow_unsafe_lease=True)
    assert result.complete and result.result_url == f"{s3_url}/api"
