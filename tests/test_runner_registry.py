"""The runner registry: every way a run executes is a name of one table, found the same way by `cosmicai.run`,
`cai run`, `cai bench` and plug-ins; an entry names what it needs installed, so a missing extra is one line."""

from __future__ import annotations

import re
import subprocess
import sys
import tomllib
from pathlib import Path

import pytest

import cosmicai
from cosmicai import runners
from cosmicai.errors import ConfigError
from cosmicai.runners import registry

ROOT = Path(__file__).resolve().parents[1]


def test_the_built_in_names_and_kinds():
    assert runners.available_runners()[:4] == ["aws", "dask", "lithops", "local"]
    assert {n: e.kind for n, e in registry.KNOWN.items()} == {"local": "backend", "dask": "backend",
                                                             "lithops": "backend", "aws": "runner"}
    assert registry.runner_options("local") == () and "stack" in registry.runner_options("aws")


def test_every_install_hint_names_an_extra_that_brings_what_the_entry_needs():
    """As fsspec's known_implementations: each entry's hint is an extra of pyproject.toml holding its modules."""
    extras = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]["optional-dependencies"]

    def closure(name: str) -> set[str]:
        out = set()
        for req in extras[name]:
            m = re.match(r"cosmicai\[(\w+)\]", req)
            out |= closure(m.group(1)) if m else {re.split(r"[\[<>=;]", req)[0].strip().lower().replace("_", "-")}
        return out

    for entry in registry.KNOWN.values():
        if not entry.needs:
            continue
        extra = re.fullmatch(r"pip install 'cosmicai\[(\w+)\]'", entry.install).group(1)
        assert {m.replace("_", "-") for m in entry.needs} <= closure(extra), entry.name


_BLOCK = """
import importlib.abc, sys
class Block(importlib.abc.MetaPathFinder):
    def find_spec(self, name, path=None, target=None):
        if name.split('.')[0] == {module!r}:
            raise ModuleNotFoundError(f"No module named {{name!r}}", name=name)
sys.meta_path.insert(0, Block())
"""


@pytest.mark.parametrize("backend, module, extra", [("dask", "dask", "full"), ("lithops", "lithops", "lithops"),
                                                    ("aws", "boto3", "worker")])
def test_a_missing_extra_is_one_line_from_the_api(backend, module, extra, tiny_dataset, tmp_path):
    code = _BLOCK.format(module=module) + f"""
import cosmicai
from cosmicai.errors import ConfigError
try:
    cosmicai.run({tiny_dataset!r}, {str(tmp_path / 'r')!r}, backend={backend!r}, stack="s")
except ConfigError as exc:
    print(type(exc).__name__, exc)
"""
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert out.returncode == 0, out.stderr
    assert out.stdout.strip() == (f"ConfigError backend {backend!r} needs {module}, which this install does not "
                                  f"have: pip install 'cosmicai[{extra}]'")
    assert not (tmp_path / "r").exists()


def test_a_missing_extra_is_one_line_from_cai_run(tiny_dataset, tmp_path):
    code = _BLOCK.format(module="dask") + "from cosmicai.cli import main\nsys.exit(main(sys.argv[1:]))\n"
    out = subprocess.run([sys.executable, "-c", code, "run", "--data", tiny_dataset, "--result",
                          str(tmp_path / "r"), "--backend", "dask"], capture_output=True, text=True, timeout=120)
    assert out.returncode == 2 and out.stdout == ""
    assert out.stderr == ("cai: error: backend 'dask' needs dask, which this install does not have: "
                          "pip install 'cosmicai[full]'\n")


def test_unknown_names_and_misplaced_options_are_one_line(tiny_dataset, tmp_path):
    with pytest.raises(ConfigError, match=r"^backend 'ray' is not known; choose one of aws, dask, lithops, local$"):
        runners.get_runner("ray")
    with pytest.raises(ConfigError, match=r"backend 'local' takes no stack: its options are run config keys"):
        runners.get_runner("local", stack="x")
    with pytest.raises(ConfigError, match=r"backend 'aws' does not take scheduler; it takes stack, "):
        runners.get_runner("aws", stack="s", scheduler="tcp://x")
    with pytest.raises(ConfigError, match=r"'aws' runs whole runs, not tasks"):
        registry.make_backend("aws")
    with pytest.raises(ConfigError, match="already registered"):
        runners.register_backend("local", "cosmicai.backends.local:from_options")


class _RecordingRunner:
    """A plug-in runner of the other kind: runs whole runs itself (here, on the local backend, in-process). Its
    own options are its constructor's parameters."""

    seen: list = []

    def __init__(self, label: str = "none"):
        self.label = label

    def run(self, config, progress=False, report=False):
        from cosmicai.runners.pipeline import PipelineRunner

        _RecordingRunner.seen.append((self.label, dict(config).get("world_size")))
        inner = PipelineRunner("local")
        try:
            return inner.run({**dict(config), "workers": 1, "backend_options": {"in_process": True}})
        finally:
            inner.close()

    def close(self):
        _RecordingRunner.seen.append("closed")


def test_a_plug_in_runner_from_an_entry_point_takes_its_own_options(tiny_dataset, tmp_path, monkeypatch):
    """A `cosmicai.runners` entry point in a real .dist-info: listed, imported on first use, given its options,
    closed after the run."""
    module = tmp_path / "cai_runner_plugin.py"
    module.write_text("from test_runner_registry import _RecordingRunner as Recording\n")
    dist = tmp_path / "cai_runner_plugin-1.0.dist-info"
    dist.mkdir()
    (dist / "METADATA").write_text("Metadata-Version: 2.1\nName: cai-runner-plugin\nVersion: 1.0\n")
    (dist / "entry_points.txt").write_text("[cosmicai.runners]\nrecording = cai_runner_plugin:Recording\n")
    monkeypatch.syspath_prepend(str(tmp_path))
    _RecordingRunner.seen.clear()
    assert "recording" in runners.available_runners() and "cai_runner_plugin" not in sys.modules
    out = cosmicai.run(tiny_dataset, str(tmp_path / "r"), backend="recording", label="mine", world_size=2,
                       model="astromae-random", batch_size=16)
    assert out.complete and out.summary["completeness"]["rows_out"] == 48
    assert _RecordingRunner.seen == [("mine", 2), "closed"]
    with pytest.raises(ConfigError, match="backend 'recording' does not take stack; it takes label"):
        runners.get_runner("recording", stack="x")


def test_one_backend_serves_many_runs_and_is_built_only_when_ranks_remain(tiny_dataset, tmp_path, monkeypatch):
    built = []

    class Counting:
        def __init__(self, **options):
            built.append(options)
            self.closed = False

        def map(self, fn, tasks):
            for task in tasks:
                yield task, fn(**task)

        def close(self):
            self.closed = True

    monkeypatch.setattr(registry, "_ADDED", {})
    runners.register_backend("counting", Counting)
    runner = runners.get_runner("counting")
    common = {"data": tiny_dataset, "model": "astromae-random", "batch_size": 16, "workers": 1, "threads": 1}
    first = runner.run({**common, "result": str(tmp_path / "a")})
    second = runner.run({**common, "result": str(tmp_path / "b"), "world_size": 2})
    again = runner.run({**common, "result": str(tmp_path / "a")})  # finished: reported, nothing mapped
    assert first.complete and second.complete and again.summary["ranks_run"] == 0
    assert built == [{"workers": 1, "threads": 1, "device": "cpu"}] and not runner.backend.closed
    backend = runner.backend
    runner.close()
    assert backend.closed and runner.backend is None

    fresh = runners.get_runner("counting")
    fresh.run({**common, "result": str(tmp_path / "a")})  # nothing to do: no backend built at all
    assert fresh.backend is None and len(built) == 1
