"""The worker install (``pip install 'cosmicai[worker]'``) in a brand-new venv: no torch, galsim, astropy, dask or
matplotlib, and plan -> infer -> summarize on the ONNX Runtime engine give the full install's predictions."""

from __future__ import annotations

import io
import json
import os
import subprocess
import sys
from pathlib import Path

import pyarrow.parquet as pq
import pytest

from cosmicai import storage

ROOT = Path(__file__).resolve().parents[1]
ABSENT = ("torch", "onnx", "galsim", "astropy", "scipy", "h5py", "dask", "distributed", "matplotlib", "yaml")

pytestmark = pytest.mark.slow


@pytest.fixture(scope="module")
def worker_python(tmp_path_factory) -> str:
    """python of a new venv (no system site-packages) with ``cosmicai[worker]`` installed from this checkout."""
    venv = tmp_path_factory.mktemp("worker-venv")
    subprocess.run([sys.executable, "-m", "venv", str(venv)], check=True, timeout=120)
    python = str(venv / "bin" / "python")
    env = {k: v for k, v in os.environ.items() if k not in ("PYTHONPATH", "PIP_REQUIRE_VIRTUALENV")}
    done = subprocess.run([python, "-m", "pip", "install", "-q", "--disable-pip-version-check", f"{ROOT}[worker]",
                           "-c", str(ROOT / "requirements" / "constraints.txt")], env=env, capture_output=True,
                          text=True, timeout=900)
    assert done.returncode == 0, done.stderr[-3000:]
    return python


def _run(python: str, *args: str, cwd: Path) -> subprocess.CompletedProcess:
    env = {k: v for k, v in os.environ.items() if k != "PYTHONPATH"}
    return subprocess.run([python, *args], cwd=cwd, env=env, capture_output=True, text=True, timeout=600)


def _cai(python: str, *args: str, cwd: Path) -> subprocess.CompletedProcess:
    return _run(python, "-m", "cosmicai.cli", *args, cwd=cwd)


def _predictions(result: str) -> dict[int, float]:
    table = pq.read_table(io.BytesIO(storage.read_bytes(storage.join(result, "predictions.parquet"))))
    return dict(zip(table.column("object_id").to_pylist(), table.column("z_pred").to_pylist()))


def test_worker_install_has_none_of_the_heavy_packages(worker_python, tmp_path):
    probe = ("import importlib.util, json, sys, sysconfig, os\n"
             f"print(json.dumps({{m: importlib.util.find_spec(m) is not None for m in {ABSENT!r}}}))\n"
             "sp = sysconfig.get_paths()['purelib']\n"
             "print(sum(os.path.getsize(os.path.join(d, f)) for d, _, fs in os.walk(sp) for f in fs))\n")
    done = _run(worker_python, "-c", probe, cwd=tmp_path)
    assert done.returncode == 0, done.stderr
    found, size = done.stdout.splitlines()
    assert json.loads(found) == {m: False for m in ABSENT}
    print(f"worker site-packages: {int(size) / 2**20:.0f} MiB")


def test_worker_runs_the_pipeline_with_the_full_installs_predictions(worker_python, tiny_dataset, tmp_path,
                                                                     monkeypatch):
    from cosmicai.config import load_config
    from cosmicai.runners.pipeline import run

    result = tmp_path / "worker"
    done = _cai(worker_python, "run", "--data", tiny_dataset, "--result", str(result), "--mode", "exact",
                "--workers", "2", "--threads", "1", "--world-size", "3", "--batch-size", "16", "--quiet", cwd=tmp_path)
    assert done.returncode == 0, done.stderr[-3000:]
    summary = json.loads((result / "summary.json").read_text())
    assert summary["completeness"]["complete"] and summary["completeness"]["rows_in"] == 48
    assert summary["completeness"]["rows_out"] == 48
    records = [json.loads(p.read_text()) for p in sorted((result / "ranks").glob("*.json"))]
    assert len(records) == 3 and sum(r["rows"] for r in records) == 48
    full = tmp_path / "full"
    config = load_config({"data": tiny_dataset, "result": str(full), "mode": "exact", "workers": 1, "threads": 1,
                          "world_size": 3, "batch_size": 16})[0]
    monkeypatch.setenv("CAI_ENGINE", "torch")  # the full install's reference: the plain torch module
    run(config, progress=False)
    ours, ref = _predictions(str(result)), _predictions(str(full))
    assert sorted(ours) == sorted(ref) == list(range(48))
    dz = max(abs(ours[i] - ref[i]) / (1 + ref[i]) for i in ref)
    assert dz <= 1e-6, dz


def test_worker_reads_and_writes_s3(worker_python, tiny_dataset, s3_url, tmp_path):
    data, result = storage.join(s3_url, "data"), storage.join(s3_url, "result")
    for name in sorted(os.listdir(tiny_dataset)):
        storage.write_bytes(storage.join(data, name), Path(tiny_dataset, name).read_bytes())
    done = _cai(worker_python, "run", "--data", data, "--result", result, "--mode", "fast", "--workers", "1",
                "--threads", "2", "--world-size", "2", "--quiet", cwd=tmp_path)
    assert done.returncode == 0, done.stderr[-3000:]
    summary = storage.read_json(storage.join(result, "summary.json"))
    assert summary["completeness"]["rows_out"] == 48 and summary["mode_used"] in ("fast", "exact")
    assert summary["fast_check"]["rows_compared"] > 0 and summary["fast_check"]["max_dz"] < 2e-3  # the guard ran, in the worker, on ONNX Runtime alone
    assert len(_predictions(result)) == 48


def test_worker_refuses_what_needs_torch_in_one_line(worker_python, tiny_dataset, tmp_path):
    checkpoint = tmp_path / "model.pt"
    checkpoint.write_bytes(b"PK\x03\x04" + b"\0" * 64)  # a torch zip checkpoint, as far as its first bytes go
    done = _cai(worker_python, "run", "--data", tiny_dataset, "--result", str(tmp_path / "r"), "--model", "astromae",
                "--weights", str(checkpoint), "--quiet", cwd=tmp_path)
    assert done.returncode == 1 and "Traceback" not in done.stderr  # every rank failed, each saying why
    assert (f"{checkpoint}: a torch checkpoint; reading it needs torch, which this install does not have "
            "(convert it once where torch is installed with `cai model import-cai`, which writes the safetensors a "
            "worker reads)") in done.stderr.strip().splitlines()[-1]
    done = _cai(worker_python, "data", "synth", "--galaxies", "4", "--out", str(tmp_path / "s"), "--quiet",
                cwd=tmp_path)
    assert done.returncode == 2 and "Traceback" not in done.stderr
    assert done.stderr.strip().splitlines()[-1].startswith("cai: error: data needs ")
    assert done.stderr.strip().endswith("pip install 'cosmicai[full]'")
    done = _cai(worker_python, "run", "--data", tiny_dataset, "--result", str(tmp_path / "g"), "--device", "cuda",
                "--quiet", cwd=tmp_path)
    assert done.returncode == 2 and "Traceback" not in done.stderr
    last = done.stderr.strip().splitlines()[-1]
    assert last.startswith("cai: error: ") and "needs torch" in last and last.endswith("pip install 'cosmicai[full]'")
