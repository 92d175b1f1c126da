"""Library calls that start worker processes work from a plain script (no ``if __name__ == "__main__":`` guard).

Each test writes a real script to a temp folder and runs it with this interpreter in a subprocess: it must exit 0
with the right output, run its top-level code once (worker processes do not re-import it), and print no traceback.
"""

from __future__ import annotations

import os
import subprocess
import sys
import textwrap
from pathlib import Path

import numpy as np
import pyarrow.parquet as pq
import pytest

from cosmicai.data.formats import load_partition_file
from conftest import TINY_PARTITIONS, TINY_ROWS_PER_PARTITION

ROWS = TINY_PARTITIONS * TINY_ROWS_PER_PARTITION
TIMEOUT_S = 120
MARKER = "SCRIPT-TOP-LEVEL-RAN"


def _run(args: list[str], cwd: Path, stdin: str | None = None,
         timeout: float = TIMEOUT_S) -> subprocess.CompletedProcess:
    env = {**os.environ, "PYTHONUNBUFFERED": "1", "CAI_ENGINE": "onnxruntime"}
    env.pop("PYTHONPATH", None)  # the script's folder (sys.path[0]) is all it gets beyond the installed package
    return subprocess.run([sys.executable, *args], cwd=cwd, input=stdin, capture_output=True, text=True,
                          timeout=timeout, env=env)


def _ok(proc: subprocess.CompletedProcess) -> str:
    assert proc.returncode == 0, f"rc={proc.returncode}\nstdout:\n{proc.stdout}\nstderr:\n{proc.stderr}"
    assert "Traceback" not in proc.stderr, proc.stderr
    assert proc.stdout.count(MARKER) == 1, f"top-level code ran {proc.stdout.count(MARKER)} times:\n{proc.stdout}"
    return proc.stdout


def _script(tmp_path: Path, name: str, body: str) -> Path:
    path = tmp_path / name
    path.write_text(f"print({MARKER!r}, flush=True)\n" + textwrap.dedent(body))
    return path


def test_run_with_default_pool_workers_from_plain_script(tmp_path, tiny_dataset):
    result = tmp_path / "result"
    script = _script(tmp_path, "plain_run.py", f"""
        import cosmicai
        r = cosmicai.run({tiny_dataset!r}, {str(result)!r}, workers=2, threads=1)
        print("ROWS", r.summary["rows"])
    """)
    out = _ok(_run([str(script)], tmp_path))
    assert f"ROWS {ROWS}" in out
    table = pq.read_table(result / "predictions.parquet")
    assert table.num_rows == ROWS
    assert sorted(table.column("object_id").to_pylist()) == list(range(ROWS))
    assert len(list((result / "ranks").iterdir())) == TINY_PARTITIONS  # one rank per partition, none failed


def test_plugin_model_next_to_plain_script_imports_in_workers(tmp_path, tiny_dataset):
    (tmp_path / "myplugin.py").write_text(textwrap.dedent("""
        class Mean:
            n_params = 0
            def predict(self, images, magnitudes, batch_size=512):
                return magnitudes.mean(axis=1) / 100
        def factory(**kwargs):
            return Mean()
    """))
    result = tmp_path / "result"
    script = _script(tmp_path, "plain_plugin.py", f"""
        import cosmicai
        r = cosmicai.run({tiny_dataset!r}, {str(result)!r}, model="myplugin:factory", workers=2, threads=1)
        print("ROWS", r.summary["rows"])
    """)
    out = _ok(_run([str(script)], tmp_path))
    assert f"ROWS {ROWS}" in out
    table = pq.read_table(result / "predictions.parquet")
    z_pred = dict(zip(table.column("object_id").to_pylist(), table.column("z_pred").to_pylist()))
    parts = [load_partition_file(str(p)) for p in sorted(Path(tiny_dataset).glob("part-*.safetensors"))]
    expected = {int(i): float(m.mean() / 100) for part in parts for i, m in zip(part.object_id, part.magnitudes)}
    assert z_pred.keys() == expected.keys()
    np.testing.assert_allclose([z_pred[i] for i in expected], list(expected.values()), rtol=1e-5)  # the plug-in's


def test_python_m_module_with_guard_runs_once(tmp_path, tiny_dataset):
    result = tmp_path / "result"
    _script(tmp_path, "guarded_mod.py", f"""
        import cosmicai
        if __name__ == "__main__":
            r = cosmicai.run({tiny_dataset!r}, {str(result)!r}, workers=2, threads=1)
            print("ROWS", r.summary["rows"])
    """)
    assert f"ROWS {ROWS}" in _ok(_run(["-m", "guarded_mod"], tmp_path))


def test_interactive_session_from_stdin(tmp_path, tiny_dataset):
    result = tmp_path / "result"
    code = f"print({MARKER!r})\nimport cosmicai\nr = cosmicai.run({tiny_dataset!r}, {str(result)!r}, workers=2, " \
           "threads=1)\nprint('ROWS', r.summary['rows'])\n"
    assert f"ROWS {ROWS}" in _ok(_run(["-"], tmp_path, stdin=code))


def test_worker_function_defined_in_guarded_main_still_works(tmp_path):
    """A task function of the script itself needs ``__main__`` in the workers: it is re-imported for it."""
    script = _script(tmp_path, "own_fn.py", """
        from cosmicai.backends.local import LocalBackend
        def square(x):
            return {"y": x * x}
        if __name__ == "__main__":
            with LocalBackend(workers=2, threads=1) as backend:
                print("SUM", sum(r["y"] for _, r in backend.map(square, [{"x": i} for i in range(6)])))
    """)
    proc = _run([str(script)], tmp_path)
    assert proc.returncode == 0 and "SUM 55" in proc.stdout, proc.stderr
    assert proc.stdout.count(MARKER) == 3  # the parent, then each of the 2 workers imports the script (guarded)


def test_dask_local_cluster_from_plain_script(tmp_path, tiny_dataset):
    pytest.importorskip("distributed")
    result = tmp_path / "result"
    script = _script(tmp_path, "plain_dask.py", f"""
        import cosmicai
        r = cosmicai.run({tiny_dataset!r}, {str(result)!r}, backend="dask", workers=2, threads=1)
        print("ROWS", r.summary["rows"])
    """)
    assert f"ROWS {ROWS}" in _ok(_run([str(script)], tmp_path))


def test_synthesize_with_worker_pool_from_plain_script(tmp_path):
    pytest.importorskip("galsim")
    script = _script(tmp_path, "plain_synth.py", """
        import numpy as np
        from cosmicai.data.synth import synthesize
        part = synthesize(6, seed=1, workers=2)
        np.save("z.npy", part.redshift)
        print("ROWS", len(part))
    """)
    assert "ROWS 6" in _ok(_run([str(script)], tmp_path, timeout=60))
    from cosmicai.data.synth import synthesize

    np.testing.assert_array_equal(np.load(tmp_path / "z.npy"), synthesize(6, seed=1, workers=1).redshift)


def test_main_hidden_restores_main_module():
    from cosmicai.processes import main_hidden

    main = sys.modules["__main__"]
    had_file, file, spec = hasattr(main, "__file__"), getattr(main, "__file__", None), main.__spec__
    with main_hidden():
        assert not hasattr(main, "__file__") and main.__spec__ is None
        with main_hidden():  # nested: still hidden, and put back only by the outer one
            pass
        assert not hasattr(main, "__file__")
    assert hasattr(main, "__file__") == had_file and getattr(main, "__file__", None) == file
    assert main.__spec__ is spec
