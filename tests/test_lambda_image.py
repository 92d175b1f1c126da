"""The Lambda image without Docker: the Dockerfile's COPY and RUN steps, as written, run here in a brand-new venv
(the image's Python version when this machine has it), from a build context that ``deploy.build_context``
assembled from a NON-editable install of cosmicai (a wheel built from this checkout), called from an unrelated
folder. ``${LAMBDA_TASK_ROOT}`` (/var/task in the image) is a folder here, put first on the path as the Lambda
runtime puts /var/task.

Then, in that environment only (no torch, galsim, astropy, dask, matplotlib), the real handlers run in a warm
worker process (tests/lambda_runner.py's worker protocol) against a real local S3 server: initialize ->
infer on every task -> summarize; rows in == rows out and the predictions equal this (full) install's. The same
handlers also run through the Lambda Runtime Interface Emulator (``aws-lambda-rie`` with the venv's
``python -m awslambdaric``, as the image's entrypoint runs them), bound to 127.0.0.1: the path that
tests/test_lambda_rie.py takes inside the buildah-built image, kept here for machines where buildah cannot run.

The installed size (``du`` of the task root) is printed per step (``pytest -s tests/test_lambda_image.py``);
it is a measurement, not a test: only a generous bound is asserted. See docs/aws.md.
"""

from __future__ import annotations

import glob
import io
import json
import os
import re
import shlex
import shutil
import subprocess
import sys
import time
import zipfile
from pathlib import Path
from types import SimpleNamespace

import pytest

from cosmicai.backends.aws import deploy
from cosmicai.errors import ConfigError

ROOT = Path(__file__).resolve().parents[1]
DOCKERFILE = Path(deploy.DOCKERFILE)
#: What a worker must not have (the full install's packages).
FORBIDDEN = ("torch", "galsim", "astropy", "dask", "distributed", "matplotlib", "scipy", "onnx", "h5py")
#: Where the install's RUN turns to removing what a worker never loads.
PRUNE_FROM = ' && cd "${LAMBDA_TASK_ROOT}"'
#: Generous sanity bound on the installed environment (the old torch image was 2.1 GB); the target is a benchmark.
SANITY_BOUND_MIB = 800


# --- the Dockerfile, parsed as Docker reads it -----------------------------------------------------------------
def dockerfile_steps(text: str) -> list[tuple[str, str]]:
    """(INSTRUCTION, arguments) per instruction: comments dropped, ``\\``-continued lines joined as Docker joins
    them (the backslash and newline removed, the next line's indentation kept)."""
    steps: list[tuple[str, str]] = []
    buf = ""
    for line in text.splitlines():
        stripped = line.strip()
        if stripped.startswith("#") or (not buf and not stripped):
            continue
        if line.rstrip().endswith("\\"):
            buf += line.rstrip()[:-1]
            continue
        buf += line
        instr, _, args = buf.strip().partition(" ")
        steps.append((instr.upper(), args.strip()))
        buf = ""
    assert not buf, "the Dockerfile ends inside a continued line"
    return steps


def _image_env(steps: list[tuple[str, str]]) -> dict[str, str]:
    env: dict[str, str] = {}
    for instr, args in steps:
        if instr == "ENV":
            for item in shlex.split(args):
                key, _, value = item.partition("=")
                env[key] = value
    return env


def _du_mib(path: str) -> float:
    """Disk usage like ``du -sm`` (allocated blocks of files and folders), in MiB."""
    total = os.lstat(path).st_blocks
    for root, dirs, files in os.walk(path):
        for name in dirs + files:
            total += os.lstat(os.path.join(root, name)).st_blocks
    return total * 512 / 2**20


def _tree(path: str) -> set[str]:
    return {os.path.relpath(os.path.join(root, name), path)
            for root, dirs, files in os.walk(path) for name in dirs + files}


def _interpreter(version: str) -> tuple[str, bool]:
    """An interpreter of the image's Python ``version`` (``python3.12`` on PATH or under pyenv), else this one's
    base interpreter; and whether the version matched."""
    candidates = [shutil.which(f"python{version}")]
    pyenv = os.environ.get("PYENV_ROOT", os.path.expanduser("~/.pyenv"))
    candidates += sorted(glob.glob(os.path.join(pyenv, "versions", f"{version}.*", "bin", f"python{version}")))
    for cand in filter(None, candidates):
        probe = subprocess.run([cand, "-c", "import sys, venv; print('%d.%d' % sys.version_info[:2])"],
                               capture_output=True, text=True)
        if probe.returncode == 0 and probe.stdout.strip() == version:
            return cand, True
    return getattr(sys, "_base_executable", None) or sys.executable, False


def _clean_env() -> dict[str, str]:
    """This process's environment less what points at the dev venv or the checkout."""
    drop = ("PYTHONPATH", "PYTHONHOME", "VIRTUAL_ENV", "PYTHONDONTWRITEBYTECODE", "CAI_ONNX_CACHE", "PYTHONSTARTUP")
    return {k: v for k, v in os.environ.items() if k not in drop}


# --- cosmicai as a non-editable install, and the build context from it ------------------------------------------
@pytest.fixture(scope="module")
def wheel_site(tmp_path_factory) -> Path:
    """cosmicai installed from a wheel (built from a copy of this checkout; unpacked, as pip installs it)."""
    root = tmp_path_factory.mktemp("wheel")
    proj = root / "proj"
    proj.mkdir()
    for name in ("pyproject.toml", "README.md"):
        shutil.copy2(ROOT / name, proj / name)
    shutil.copytree(ROOT / "src", proj / "src", ignore=shutil.ignore_patterns("__pycache__", "*.pyc", "*.egg-info"))
    out = subprocess.run([sys.executable, "-m", "pip", "wheel", "--no-deps", "--no-build-isolation", "-q",
                          "-w", str(root / "dist"), str(proj)], capture_output=True, text=True, env=_clean_env())
    assert out.returncode == 0, out.stdout + out.stderr
    site = root / "site"
    with zipfile.ZipFile(next((root / "dist").glob("cosmicai-*.whl"))) as whl:
        whl.extractall(site)
    return site


def _context_from(site: Path, dest: Path, cwd: Path) -> dict:
    """``deploy.build_context(dest)`` run by a Python that imports cosmicai from ``site``, in folder ``cwd``."""
    cwd.mkdir(parents=True, exist_ok=True)
    code = ("import json, sys, cosmicai; from cosmicai.backends.aws import deploy; "
            "print(json.dumps({'package': cosmicai.__file__, 'context': deploy.build_context(sys.argv[1])}))")
    out = subprocess.run([sys.executable, "-c", code, str(dest)], cwd=cwd, capture_output=True, text=True,
                         env=dict(_clean_env(), PYTHONPATH=str(site)))
    assert out.returncode == 0, out.stdout + out.stderr
    return json.loads(out.stdout.strip().splitlines()[-1])


def test_build_context_copies_the_editable_install_from_any_folder(tmp_path, monkeypatch):
    import cosmicai

    monkeypatch.chdir(tmp_path)  # not the checkout: the context must not depend on the current folder
    context = deploy.build_context("ctx")
    assert context == str(tmp_path / "ctx")
    package = Path(cosmicai.__file__).parent
    ignored = re.compile(r"(^|/)(__pycache__|[^/]*\.egg-info)(/|$)|\.py[co]$")
    assert _tree(os.path.join(context, "cosmicai")) == {p for p in _tree(str(package)) if not ignored.search(p)}
    for what in deploy.CONTEXT_FILES:
        assert os.path.isfile(deploy.context_path(context, what))
    with pytest.raises(ConfigError, match="already exists"):
        deploy.build_context(context)


def test_build_context_copies_a_non_editable_install(wheel_site, tmp_path):
    got = _context_from(wheel_site, tmp_path / "ctx", tmp_path / "elsewhere")
    assert Path(got["package"]).resolve().is_relative_to(wheel_site.resolve())  # the wheel, not the checkout
    context = got["context"]
    assert _tree(os.path.join(context, "cosmicai")) == {
        p for p in _tree(str(wheel_site / "cosmicai")) if "__pycache__" not in p and not p.endswith(".pyc")}
    for what in deploy.CONTEXT_FILES:
        assert os.path.isfile(deploy.context_path(context, what)), what


def _pins(path: Path) -> dict[str, str]:
    pins = {}
    for line in path.read_text().splitlines():
        m = re.match(r"^([A-Za-z0-9_.-]+)==([^ ;\\]+)", line)
        if m:
            pins[re.sub(r"[-_.]+", "-", m.group(1)).lower()] = m.group(2)
    return pins


def test_worker_requirements_are_pinned_hashed_torch_free_and_match_the_lock():
    tomllib = pytest.importorskip("tomllib")
    path = Path(deploy.REQUIREMENTS)
    text = path.read_text()
    assert "uv pip compile pyproject.toml --extra worker --universal" in text  # the refresh command (docs/aws.md)
    entries = [ln for ln in text.splitlines() if ln and not ln[0].isspace() and not ln.startswith("#")]
    assert entries and all("==" in ln and ln.endswith("\\") for ln in entries)  # pinned, each with its hashes
    pins = _pins(path)
    assert not set(pins) & {"torch", "galsim", "astropy", "dask", "distributed", "matplotlib", "scipy", "onnx"}
    project = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]
    wanted = project["dependencies"] + project["optional-dependencies"]["worker"]
    names = {re.sub(r"[-_.]+", "-", re.match(r"[A-Za-z0-9_.-]+", d).group(0)).lower() for d in wanted}
    assert names <= set(pins), names - set(pins)
    # The image runs the versions the full install is tested with (compiled with -c requirements/constraints.txt).
    lock = _pins(ROOT / "requirements" / "constraints.txt")
    assert {n: v for n, v in pins.items() if n in lock and lock[n] != v} == {}


FAKE_TOOL = """#!/bin/sh
echo "$(basename "$0") $* @ $(pwd)" >> "$CAI_FAKE_LOG"
if [ "$1" = buildx ]; then
  for last; do :; done
  prev=""; for a in "$@"; do [ "$prev" = "-f" ] && dockerfile="$a"; prev="$a"; done
  [ -f "$dockerfile" ] && [ -f "$last/cosmicai/__init__.py" ] && [ -f "$last/cosmicai/models/registry.py" ] || exit 3
fi
"""


def test_deploy_runs_from_any_folder_with_a_temporary_context(tmp_path, monkeypatch, capsys):
    from cosmicai.cli import main

    tools = tmp_path / "bin"
    tools.mkdir()
    for name in deploy.TOOLS:
        (tools / name).write_text(FAKE_TOOL)
        (tools / name).chmod(0o755)
    log = tmp_path / "calls.log"
    monkeypatch.setenv("PATH", f"{tools}{os.pathsep}{os.environ['PATH']}")
    monkeypatch.setenv("CAI_FAKE_LOG", str(log))
    for key in ("AWS_ACCESS_KEY_ID", "AWS_SECRET_ACCESS_KEY"):  # the tools are stand-ins: any credentials do
        monkeypatch.setenv(key, "testing")
    monkeypatch.chdir(tmp_path)
    rc = main(["aws", "deploy", "--stack", "cai", "--region", "eu-west-1", "--data-bucket", "d", "--data-prefix",
               "p", "--result-bucket", "r", "--account", "123456789012"])
    assert rc == 0, capsys.readouterr()
    calls = log.read_text().splitlines()  # (the login pipe's two sides log in either order)
    assert [c.split()[:2] for c in calls][3:] == [["docker", "buildx"], ["docker", "push"], ["sam", "deploy"]]
    assert sorted(c.split()[1] for c in calls[:3]) == ["ecr", "ecr", "login"]
    build = calls[3]
    context = build.split(" @ ")[1]  # the steps run in the context folder, which is gone after the deploy
    assert build.split(" @ ")[0].endswith(f"--load {context}") and context != str(tmp_path)
    assert f"-f {context}/cosmicai/backends/aws/Dockerfile" in build and not os.path.exists(context)
    assert f"--template-file {context}/cosmicai/backends/aws/template.yaml" in calls[5]


# --- the image's environment, built without Docker ---------------------------------------------------------------
@pytest.fixture(scope="module")
def image(wheel_site, tmp_path_factory):
    """Run the Dockerfile's COPY/RUN steps in a fresh venv; returns paths, env and the size per step."""
    base = tmp_path_factory.mktemp("lambda-image")
    context = _context_from(wheel_site, base / "context", base / "elsewhere")["context"]
    steps = dockerfile_steps(Path(deploy.context_path(context, "dockerfile")).read_text())
    assert steps[0][0] == "FROM"
    version = re.search(r"python:(\d+\.\d+)", steps[0][1]).group(1)
    python, exact = _interpreter(version)
    venv = base / "venv"
    subprocess.run([python, "-m", "venv", str(venv)], check=True, capture_output=True)
    py = str(venv / "bin" / "python")
    # The Lambda runtime interface client, as the base image has it beside (not in) the task root.
    from lambda_standin import RUNTIME_PINS

    out = subprocess.run([py, "-m", "pip", "install", "-q", "--disable-pip-version-check", "--no-deps",
                          "--only-binary=:all:", *RUNTIME_PINS], capture_output=True, text=True, env=_clean_env())
    assert out.returncode == 0, out.stdout + out.stderr
    task_root = base / "var-task"
    task_root.mkdir()
    scratch = base / "tmp"  # the image's /tmp
    scratch.mkdir()
    image_env = {k: v.replace("/tmp", str(scratch), 1) if v.startswith("/tmp") else v
                 for k, v in _image_env(steps).items()}
    env = dict(_clean_env(), **image_env, LAMBDA_TASK_ROOT=str(task_root),
               PATH=f"{venv / 'bin'}{os.pathsep}{os.environ.get('PATH', '')}")
    log, cmd = [], None
    print(f"\nLambda image steps (Python {version} image; venv from {python}"
          f"{'' if exact else ', NOT that version: none found here'}):")
    for instr, args in steps[1:]:
        t0 = time.perf_counter()
        if instr == "COPY":
            *sources, dest = [os.path.expandvars(a.replace("${LAMBDA_TASK_ROOT}", str(task_root)))
                              for a in shlex.split(args)]
            for src in (os.path.join(context, s) for s in sources):
                if os.path.isdir(src):
                    shutil.copytree(src, dest, dirs_exist_ok=True)
                else:
                    shutil.copy2(src, os.path.join(dest, os.path.basename(src)) if dest.endswith("/") else dest)
        elif instr == "RUN":
            # Run here, a literal system path would touch this machine: the steps name paths through variables.
            assert not re.search(r"(?<![\w}])/(tmp|var|opt|usr|etc|root|home)\b", args), f"RUN {args[:200]}"
            # The install's RUN also prunes (one layer); its part from `&& cd` on runs after a measurement.
            install, cut, prune = args.partition(PRUNE_FROM) if "pip install" in args else (args, "", "")
            for part in filter(None, (install, cut[len(" && "):] + prune if cut else "")):
                out = subprocess.run(["sh", "-c", part], cwd=scratch, env=env, capture_output=True, text=True)
                if out.returncode != 0:
                    pytest.fail(f"Dockerfile step failed (exit {out.returncode}): RUN {part[:300]}\n"
                                f"{(out.stdout + out.stderr)[-4000:]}")
                if part is install and cut:
                    log.append(("RUN pip install (before the removals)", time.perf_counter() - t0,
                                _du_mib(str(task_root))))
                    print(f"  {log[-1][1]:6.1f} s  {log[-1][2]:7.1f} MiB  {log[-1][0]}")
                    t0 = time.perf_counter()
        elif instr == "CMD":
            cmd = json.loads(args)
            continue
        elif instr == "ENV":
            continue
        else:
            pytest.fail(f"tests/test_lambda_image.py does not know the Dockerfile instruction {instr}")
        log.append((f"{instr} {args}"[:72], time.perf_counter() - t0, _du_mib(str(task_root))))
        print(f"  {log[-1][1]:6.1f} s  {log[-1][2]:7.1f} MiB  {log[-1][0]}")
    pip_step = next(i for i, (text, _, _) in enumerate(log) if text.startswith("RUN pip install (before"))
    removed = log[pip_step][2] - log[pip_step + 1][2]
    final = log[-1][2]
    top = sorted(((_du_mib(str(p)), p.name) for p in task_root.iterdir()), reverse=True)[:8]
    print(f"installed environment (du of LAMBDA_TASK_ROOT): {final:.1f} MiB; without the removals "
          f"{final + removed:.1f} MiB (removed {removed:.1f} MiB); largest: "
          + ", ".join(f"{name} {mib:.0f}" for mib, name in top))
    return SimpleNamespace(python=py, task_root=task_root, scratch=scratch, image_env=image_env, env=env, cmd=cmd,
                           size_mib=final, removed_mib=removed, tree=_tree(str(task_root)), exact_version=exact)


def _worker_env(image, s3_server, extra_path: str = "") -> dict[str, str]:
    path = str(image.task_root) + (os.pathsep + extra_path if extra_path else "")
    return dict(image.env, **s3_server.env(), PYTHONPATH=path, CAI_THREADS="1", OMP_NUM_THREADS="1")


CHECK = r"""
import importlib, io, json, os, sys
out = {"python": list(sys.version_info[:2])}
missing = {}
for name in sys.argv[1].split(","):
    try:
        importlib.import_module(name)
        missing[name] = "imported"
    except ModuleNotFoundError as exc:
        missing[name] = "ModuleNotFoundError" if exc.name == name else repr(exc)
out["forbidden"] = missing
import numpy, onnxruntime, pyarrow, pyarrow.fs, pyarrow.parquet as pq, cosmicai
out["origins"] = {m.__name__: m.__file__ for m in (numpy, onnxruntime, pyarrow, cosmicai)}
folder = os.path.dirname(pyarrow.__file__)
ext = sorted(f.split(".")[0] for f in os.listdir(folder) if f.endswith(".so") and ".cpython-" in f)
out["pyarrow_extensions"] = {e: (importlib.import_module("pyarrow." + e) and "ok") for e in ext}
try:
    import pyarrow.flight
    out["flight"] = "imported"
except ImportError:
    out["flight"] = "absent"
from cosmicai import storage
table = pyarrow.table({"object_id": numpy.arange(5, dtype="int64"), "z_pred": numpy.linspace(0, 1, 5, dtype="float32")})
sink = pyarrow.BufferOutputStream()
pq.write_table(table, sink)
storage.write_bytes(sys.argv[3], sink.getvalue().to_pybytes())  # written through s3fs, like infer's outputs
s3 = pyarrow.fs.S3FileSystem(endpoint_override=sys.argv[2].split("://", 1)[1], scheme="http", region="us-east-1",
                             access_key=os.environ["AWS_ACCESS_KEY_ID"], secret_key=os.environ["AWS_SECRET_ACCESS_KEY"])
with s3.open_input_stream(sys.argv[3].split("://", 1)[1]) as fh:  # read through pyarrow's S3, like summarize
    out["parquet_via_arrow_s3"] = pq.read_table(pyarrow.BufferReader(fh.read())).equals(table)
out["parquet_via_s3fs"] = pq.read_table(pyarrow.BufferReader(storage.read_bytes(sys.argv[3]))).equals(table)
print(json.dumps(out))
"""


@pytest.mark.slow
@pytest.mark.s3
def test_image_environment_is_torch_free_and_what_was_removed_is_not_needed(image, s3_server, s3_url):
    out = subprocess.run([image.python, "-c", CHECK, ",".join(FORBIDDEN), s3_server.endpoint,
                          f"{s3_url}/check.parquet"], cwd=image.task_root, env=_worker_env(image, s3_server),
                         capture_output=True, text=True, timeout=300)
    assert out.returncode == 0, out.stdout + out.stderr
    got = json.loads(out.stdout.strip().splitlines()[-1])
    assert got["forbidden"] == {name: "ModuleNotFoundError" for name in FORBIDDEN}
    for name, origin in got["origins"].items():  # everything from the image's task root, nothing from the dev venv
        assert Path(origin).resolve().is_relative_to(image.task_root.resolve()), (name, origin)
    # Every pyarrow extension module left loads: none needs a library the Dockerfile removed. Flight is gone.
    assert {"lib", "_parquet", "_dataset", "_compute", "_fs", "_s3fs"} <= set(got["pyarrow_extensions"])
    assert set(got["pyarrow_extensions"].values()) == {"ok"} and got["flight"] == "absent"
    assert got["parquet_via_arrow_s3"] and got["parquet_via_s3fs"]  # Parquet, over pyarrow's S3 and over s3fs
    assert _tree(str(image.task_root)) == image.tree  # nothing written under the (read-only) task root


@pytest.mark.slow
@pytest.mark.s3
def test_handlers_run_the_pipeline_in_the_image_environment(image, s3_server, s3_url, tiny_dataset, tmp_path,
                                                            monkeypatch):
    import pyarrow.parquet as pq

    from lambda_runner import _Worker

    from cosmicai import storage
    from cosmicai.backends.local import LocalBackend
    from cosmicai.config import load_config
    from cosmicai.runners.pipeline import run

    assert image.cmd == ["cosmicai.backends.aws.handlers.infer"]
    data, result = f"{s3_url}/data", f"{s3_url}/result"
    for name in sorted(os.listdir(tiny_dataset)):
        storage.write_bytes(f"{data}/{name}", Path(tiny_dataset, name).read_bytes())

    probe = tmp_path / "probe"
    probe.mkdir()
    (probe / "cai_image_probe.py").write_text(
        "import sys\n"
        "def modules(event, context):\n"
        "    loaded = sorted({m.split('.')[0] for m in sys.modules} & set(event['forbidden']))\n"
        "    return {'forbidden_loaded': loaded, 'cosmicai': sys.modules['cosmicai'].__file__,\n"
        "            'handlers_loaded': 'cosmicai.backends.aws.handlers' in sys.modules}\n")
    with monkeypatch.context() as mp:  # one warm execution environment of the image, like Lambda's
        mp.setattr(sys, "executable", image.python)
        mp.chdir(image.task_root)
        worker = _Worker(_worker_env(image, s3_server, str(probe)), ["cosmicai.backends.aws.handlers"])
    try:
        def invoke(handler, event):
            reply = worker.invoke(handler, event, {"function_name": handler.rsplit(".", 1)[-1]})
            assert reply["ok"], reply["payload"]
            return reply["payload"]

        state = invoke("cosmicai.backends.aws.handlers.initialize",
                       {"data": data, "result": result, "batch_size": 5, "world_size": 4})
        assert state["num_tasks"] == 4 and state["result_url"] == result
        tasks = storage.read_json(f"s3://{state['tasks_bucket']}/{state['tasks_key']}")
        for task in tasks:
            done = invoke("cosmicai.backends.aws.handlers.infer", task)
            assert done["status"] == "ok"
        out = invoke("cosmicai.backends.aws.handlers.summarize", {"result_url": result, "allow_failures": False})
        probe_out = invoke("cai_image_probe.modules", {"forbidden": list(FORBIDDEN)})
    finally:
        worker.close()
    print(f"\nimage worker INIT (handlers import + {image.image_env.get('CAI_MODEL')} load): {worker.init_ms:.0f} ms")
    assert out["complete"] and out["failed_ranks"] == [] and out["missing_ranks"] == []
    assert out["rows_in"] == out["rows_out"] == 48
    assert probe_out["forbidden_loaded"] == [] and probe_out["handlers_loaded"]
    assert Path(probe_out["cosmicai"]).resolve().is_relative_to(image.task_root.resolve())
    assert _tree(str(image.task_root)) == image.tree  # no byte code or cache written at run time

    # The same run on this (full) install, with the model and mode the image's ENV names.
    local = tmp_path / "local"
    config = {"data": tiny_dataset, "result": str(local), "batch_size": 5, "world_size": 4, "threads": 1,
              "model": image.image_env["CAI_MODEL"], "mode": image.image_env["CAI_MODE"]}
    run(load_config(config)[0], backend=LocalBackend(1, 1, in_process=True), progress=False)
    mine = pq.read_table(io.BytesIO(storage.read_bytes(f"{result}/predictions.parquet")))
    full = pq.read_table(local / "predictions.parquet")
    assert mine.num_rows == full.num_rows == 48
    for col in ("object_id", "partition", "row", "z_true"):
        assert mine.column(col).to_pylist() == full.column(col).to_pylist(), col
    dz = abs(mine.column("z_pred").to_numpy().astype("float64") - full.column("z_pred").to_numpy())
    assert image.image_env["CAI_MODE"] == "exact" and dz.max() <= 1e-6, dz.max()
    summary = storage.read_json(f"{result}/summary.json")
    assert summary["metrics"] == pytest.approx(json.loads((local / "summary.json").read_text())["metrics"], abs=1e-6)


@pytest.mark.slow
@pytest.mark.s3
def test_installed_size_is_measured(image):
    # A measurement (printed by the fixture; docs/aws.md records it), with only a generous sanity bound here.
    assert 50 < image.size_mib < SANITY_BOUND_MIB, image.size_mib
    assert image.removed_mib > 0
    assert not any(p.split(os.sep)[0] in FORBIDDEN for p in image.tree)


@pytest.mark.slow
@pytest.mark.s3
def test_handlers_run_through_the_runtime_interface_emulator_in_the_image_environment(image, s3_server,
                                                                                       tiny_dataset, tmp_path):
    import lambda_standin as ls

    try:
        rie = ls.fetch_rie()
    except (RuntimeError, OSError, KeyError, StopIteration) as exc:
        pytest.skip(f"could not get aws-lambda-rie from {ls.SAM_CLI}: {str(exc).splitlines()[0]}")
    prefix = f"t-venv-rie-{os.getpid()}-{int(time.time())}"
    env = dict(_worker_env(image, s3_server), **ls.function_env(s3_server, prefix))

    def start(function: str) -> ls.Rie:
        return ls.Rie(f"{ls.HANDLERS}.{function}", env, str(rie), tmp_path / f"{function}.log",
                      command=[image.python, "-m", "awslambdaric"], cwd=str(image.task_root))

    got = ls.run_through_rie(start, s3_server, tiny_dataset, prefix)
    ls.assert_pipeline(got, tiny_dataset, tmp_path, image.image_env)
    assert _tree(str(image.task_root)) == image.tree  # nothing written under the task root at run time
