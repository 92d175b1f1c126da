"""Every third-party import is declared in pyproject.toml, in the extra that needs it (deptry, configured under
[tool.deptry] in pyproject.toml). An undeclared import, or one that only works because some other package
happens to pull it in, fails here and so fails CI."""
from __future__ import annotations

import importlib.util
import os
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]


def _deptry(*args: str) -> None:
    if importlib.util.find_spec("deptry") is None:
        if os.environ.get("CI"):
            pytest.fail("deptry is not installed: it is in the test extra (pip install -e '.[test]')")
        pytest.skip("deptry not installed: pip install -e '.[test]' (README)")
    proc = subprocess.run([sys.executable, "-m", "deptry", *args, "--no-ansi"], cwd=ROOT,
                          capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0, f"deptry {' '.join(args)} found dependency issues:\n{proc.stdout}\n{proc.stderr}"


def test_src_imports_only_declared_runtime_dependencies():
    # DEP001 missing, DEP002 unused, DEP003 transitive, DEP004 a test-extra package imported by src/.
    _deptry("src")


def test_tests_import_only_declared_dependencies():
    # The tests may use the runtime dependencies and the test extra (hence DEP004 off) and need not use every
    # runtime dependency (DEP002 off); whatever they import must still be declared and not merely transitive.
    # tests/astromae_original is a module tree of its own (run with itself first on sys.path), so it is a root
    # too: its `blocks` and `timm` are local modules, its other imports are checked like the rest.
    _deptry("tests", "tests/astromae_original", "--ignore", "DEP002,DEP004")


def test_lock_pins_every_declared_dependency_within_its_range():
    # requirements/constraints.txt is refreshed with the command in the README ("Refreshing the lock").
    tomllib = pytest.importorskip("tomllib")
    from packaging.requirements import Requirement
    from packaging.utils import canonicalize_name

    project = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]
    pins = {}
    for line in (ROOT / "requirements" / "constraints.txt").read_text().splitlines():
        if line and not line.startswith((" ", "#")):
            name, _, version = line.partition("==")
            pins[canonicalize_name(name)] = version.strip()
    every = project["dependencies"] + [t for extra in project["optional-dependencies"].values() for t in extra]
    for text in every:
        req = Requirement(text)
        name = canonicalize_name(req.name)
        if name == "cosmicai":  # an extra naming another extra (test -> full -> worker)
            continue
        assert name in pins, f"{req.name} is not in requirements/constraints.txt: refresh the lock (README)"
        assert req.specifier.contains(pins[name], prereleases=True), \
            f"the lock pins {req.name}=={pins[name]}, outside {text!r}: refresh the lock (README)"


def test_ci_runs_the_readme_test_command_verbatim():
    readme = (ROOT / "README.md").read_text().splitlines()
    commands = [line for line in readme if line.startswith("python3 -m venv .venv") and "pytest" in line]
    assert len(commands) == 1, "README: expected one test command line starting `python3 -m venv .venv`"
    assert commands[0] in (ROOT / ".ci" / "run").read_text().splitlines(), ".ci/run must run the README's test command"
