"""The Python API: ``cosmicai.run`` / ``predict`` / ``load_model`` and ``RunResult``, and the README's notebook
example run exactly as written."""

from __future__ import annotations

import os
import re
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

import cosmicai
from cosmicai.errors import ConfigError
from cosmicai.pipeline.summarize import IncompleteRunError

ROOT = Path(__file__).resolve().parents[1]


def _readme_example() -> str:
    text = (ROOT / "README.md").read_text()
    match = re.search(r"<!-- notebook-example[^>]*-->\n```python\n(.*?)```", text, re.S)
    assert match, "README.md lost its notebook example"
    return match.group(1)


def test_import_cosmicai_is_light():
    code = "import sys, cosmicai; print(sorted(m for m in ('numpy', 'torch', 'pyarrow', 'onnxruntime') if m in sys.modules))"
    env = {k: v for k, v in os.environ.items() if k != "PYTHONPATH"}
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, env=env, check=True)
    assert out.stdout.strip() == "[]"


def test_readme_notebook_example_runs_as_written(tiny_dataset, tmp_path):
    shutil.copytree(tiny_dataset, tmp_path / "galaxies")
    env = {k: v for k, v in os.environ.items() if k != "PYTHONPATH"}
    done = subprocess.run([sys.executable, "-c", _readme_example()], cwd=tmp_path, capture_output=True, text=True,
                          env=env, timeout=300)
    assert done.returncode == 0, done.stderr[-3000:]
    assert done.stderr == ""  # a library call prints nothing it was not asked to, warnings included
    lines = done.stdout.splitlines()
    # the run is named by its canonical (absolute) result path, whatever spelling it was started with
    assert lines[0].startswith(f"RunResult('{tmp_path.resolve() / 'results'}', complete=True, rows=48, ranks=")
    assert re.fullmatch(r"R2 -?\d+\.\d{3}, bias [+-]\d\.\d{4}, failures \[\]", lines[1])
    assert lines[2] == "48 ['object_id', 'partition', 'row', 'z_pred', 'z_true', 'flag', 'outside_training_range']"
    assert re.fullmatch(r"\[\s*-?\d\.\d+\s+-?\d\.\d+\s*\]", lines[3])
    print("\n".join(lines))


def test_run_result_values(tiny_dataset, tmp_path):
    result = cosmicai.run(tiny_dataset, str(tmp_path / "r"), model="astromae-random", workers=1, threads=1,
                          world_size=2, batch_size=16)
    assert result.complete and result.failures == [] and result.metrics["n"] == 48
    table = result.predictions(["object_id", "z_pred"])
    assert table.column_names == ["object_id", "z_pred"] and sorted(table.column("object_id").to_pylist()) == \
        list(range(48))
    again = cosmicai.run(tiny_dataset, str(tmp_path / "r"), model="astromae-random", workers=1, threads=1,
                         world_size=2, batch_size=16)
    assert again.summary["ranks_run"] == 0 and again.metrics == result.metrics  # a rerun resumes
    import importlib.util

    if importlib.util.find_spec("pandas") is None:
        with pytest.raises(ImportError, match="needs pandas"):
            result.to_pandas()
    else:
        assert len(result.to_pandas()) == 48


def test_predict_matches_load_model_and_flags_nonfinite_rows(random_partition):
    part = random_partition(7, seed=3)
    images = part.images.copy()
    images[2, 0, 0, 0] = np.nan
    z = cosmicai.predict(images, part.magnitudes, threads=1)
    want = cosmicai.load_model("astromae-demo", threads=1).predict(images, part.magnitudes)
    np.testing.assert_array_equal(z, want)
    assert np.isnan(z[2]) and np.isfinite(np.delete(z, 2)).all()


def test_bad_backend_and_option_are_named(tiny_dataset, tmp_path):
    with pytest.raises(ConfigError, match="backend .ray. is not known; choose one of aws, dask, lithops, local"):
        cosmicai.run(tiny_dataset, str(tmp_path / "x"), backend="ray")
    with pytest.raises(ConfigError, match="batch_sise"):
        cosmicai.run(tiny_dataset, str(tmp_path / "x"), batch_sise=3)
    with pytest.raises(ConfigError, match="no state machine to run on: give stack=NAME"):
        cosmicai.run("s3://bucket/data", "s3://bucket/result", backend="aws")


def test_failed_ranks_raise_unless_allowed(tiny_dataset, tmp_path):
    data = tmp_path / "data"
    shutil.copytree(tiny_dataset, data)
    victim = sorted(data.glob("*.safetensors"))[0]
    victim.write_bytes(victim.read_bytes()[:100])
    with pytest.raises(IncompleteRunError):
        cosmicai.run(str(data), str(tmp_path / "r"), model="astromae-random", workers=1, threads=1, world_size=2)
    result = cosmicai.run(str(data), str(tmp_path / "r2"), model="astromae-random", workers=1, threads=1,
                          world_size=2, allow_failures=True)
    assert not result.complete and len(result.failures) == 1
    assert victim.name in str(result.failures[0])


class _InlineBackend:
    """A third-party backend: runs each task in this process, in reverse order."""

    name = "inline-reversed"

    def __init__(self, **options):
        self.options, self.closed = options, False

    def map(self, fn, tasks):
        for task in reversed(tasks):
            try:
                yield task, fn(**task)
            except Exception as exc:  # noqa: BLE001 - yielded, as the contract says
                yield task, exc

    def close(self):
        self.closed = True


def test_a_registered_backend_runs_the_pipeline(tiny_dataset, tmp_path, monkeypatch):
    from cosmicai import runners
    from cosmicai.runners import registry

    monkeypatch.setattr(registry, "_ADDED", {})
    built = []
    runners.register_backend("inline-reversed", lambda **options: built.append(_InlineBackend(**options)) or built[-1])
    assert "inline-reversed" in runners.available_runners()
    with pytest.raises(ConfigError, match="already registered"):
        runners.register_backend("inline-reversed", _InlineBackend)
    result = cosmicai.run(tiny_dataset, str(tmp_path / "r"), model="astromae-random", backend="inline-reversed",
                          workers=1, threads=1, world_size=3, batch_size=16)
    assert result.complete and result.summary["completeness"]["rows_out"] == 48
    assert len(built) == 1 and built[0].closed and built[0].options["workers"] == 1
    with pytest.raises(ConfigError, match="backend 'nope' is not known; choose one of aws, dask, inline-reversed, "
                                          "lithops, local"):
        runners.get_runner("nope")
