"""Every fenced code block in README.md and docs/*.md is run as written, or marked as not run (with the reason)
and checked to parse. The conventions are in ``tests/docs_blocks.py``.

``pytest -q -s tests/test_docs.py`` prints the count of blocks run, marked (by reason) and written as files.
"""

from __future__ import annotations

import ast
import collections
import difflib
import json
import os
import shlex
import subprocess
import sys
import tomllib
from pathlib import Path

import pytest

from docs_blocks import LANGS, RUNNABLE, ROOT, Block, blocks, console_commands, doc_files, output_matches

BLOCK_TIMEOUT_S = 120
WORK_DIR = "/path/to/work"  # how shown output writes the folder a doc's blocks run in
VENV_BIN = str(Path(sys.executable).parent)
DOCS = doc_files()


def _env() -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if k != "PYTHONPATH"}
    env["PATH"] = VENV_BIN + os.pathsep + env.get("PATH", "")
    env.update(PYTHONUNBUFFERED="1", COLUMNS="120", TQDM_DISABLE="1")
    return env


def _shell(command: str, cwd: Path, check: str) -> subprocess.CompletedProcess:
    """Run ``command`` with bash in ``cwd``; stdout and stderr together, as a terminal shows them, with the
    folder's own path written as WORK_DIR."""
    try:
        done = subprocess.run(["bash", "-e", "-o", "pipefail", "-c", command], cwd=cwd, env=_env(),
                              stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
                              timeout=BLOCK_TIMEOUT_S)
        for folder in sorted({str(cwd.resolve()), str(cwd)}, key=len, reverse=True):
            done.stdout = done.stdout.replace(folder, WORK_DIR)
        return done
    except subprocess.TimeoutExpired as exc:
        out = exc.stdout.decode(errors="replace") if isinstance(exc.stdout, bytes) else (exc.stdout or "")
        pytest.fail(f"{check}: did not finish within {BLOCK_TIMEOUT_S} s\n--- output so far\n{out[-3000:]}")


def _diff(expected: str, got: str) -> str:
    return "\n".join(difflib.unified_diff(expected.strip("\n").splitlines(), got.strip("\n").splitlines(),
                                          "shown in the doc", "printed", lineterm=""))


def _parse_problem(block: Block) -> str | None:
    """Why ``block`` does not parse as its language, or None."""
    try:
        if block.lang == "python":
            ast.parse(block.text)
        elif block.lang in ("bash", "sh", "console"):
            text = (block.text if block.lang != "console"
                    else "\n".join(c for c, _ in console_commands(block.text) if c))
            done = subprocess.run(["bash", "-n"], input=text, capture_output=True, text=True, timeout=30)
            if done.returncode:
                return done.stderr.strip()
        elif block.lang == "json":
            json.loads(block.text)
        elif block.lang == "yaml":
            import yaml
            yaml.safe_load(block.text)
        elif block.lang == "toml":
            tomllib.loads(block.text)
    except (SyntaxError, ValueError, tomllib.TOMLDecodeError) as exc:
        return f"{type(exc).__name__}: {exc}"
    except Exception as exc:  # yaml's errors
        return f"{type(exc).__name__}: {exc}"
    return None


def _classify(path: Path) -> tuple[list[tuple[str, Block]], list[str]]:
    """Each block with how it is checked ('run', 'output', 'file', 'not run: REASON'), and the problems."""
    found, problems = blocks(path)
    kinds = []
    previous_run = None
    for b in found:
        if b.lang not in LANGS:
            problems.append(f"{b.where}: the block's language is {b.lang or 'not given'!r}; name one of "
                            f"{sorted(LANGS)} (text for a figure or an output)")
            continue
        reason = b.not_run_reason
        if reason is not None:
            kind = f"not run: {reason}"
        elif b.is_output:
            if b.lang != "text":
                problems.append(f"{b.where}: an output block must be ```text")
            if previous_run is None or previous_run.lang not in ("python", "bash", "sh"):
                problems.append(f"{b.where}: an output block must follow a python or bash block that is run")
            kind = "output"
        elif b.directive("file"):
            kind = "file"
        elif b.lang in RUNNABLE:
            kind = "run"
        else:
            problems.append(f"{b.where}: a ```{b.lang} block that is neither run nor marked: add "
                            f"'<!-- docs-test: not run (REASON) -->' (or 'file NAME' / 'output') just above it")
            continue
        if kind != "output":
            previous_run = b if kind == "run" else None
        if kind.startswith("not run") or kind == "file":
            problem = _parse_problem(b)
            if problem:
                problems.append(f"{b.where}: the ```{b.lang} block does not parse: {problem}")
        kinds.append((kind, b))
    return kinds, problems


def test_every_block_is_run_or_marked_and_marked_blocks_parse():
    counts = collections.Counter()
    reasons = collections.Counter()
    problems = []
    for path in DOCS:
        kinds, found_problems = _classify(path)
        problems += found_problems
        for kind, _ in kinds:
            counts[kind.split(":")[0]] += 1
            if kind.startswith("not run: "):
                reasons[kind[len("not run: "):]] += 1
    print(f"\ndocs blocks: {counts['run']} run, {counts['output']} output compared, {counts['file']} written as "
          f"files, {counts['not run']} marked not run, {len(problems)} problem(s)")
    for reason, n in sorted(reasons.items(), key=lambda item: -item[1]):
        print(f"  {n:3d} not run ({reason})")
    assert not problems, "\n".join(problems)
    assert counts["run"] >= 10


def test_output_conventions():
    shown = "total 3\n...\nlast line  \n"
    assert output_matches(shown, "total 3\nlast line\n")
    assert output_matches(shown, "total 3\nanything\nelse\nlast line")
    assert not output_matches(shown, "total 4\nlast line")
    assert not output_matches("a\nb", "a\nb\nc")
    assert output_matches("took 1.5 s, 1,278 rows", "took 12.25 s, 5,113 rows", numbers=True)
    assert not output_matches("took 1.5 s", "took 12.25 min", numbers=True)
    assert console_commands("$ cai x \\\n    --y 1\nout 1\n$ cai z\n") == [("cai x --y 1", "out 1"), ("cai z", "")]


def test_unmarked_unfenced_and_unlabelled_blocks_are_named(tmp_path):
    doc = tmp_path / "doc.md"
    doc.write_text("Intro.\n\n    cai run --data x\n\n* item\n\n    continuation, not code\n\n"
                   "```\nno language\n```\n\n```yaml\na: 1\n```\n\n"
                   "<!-- docs-test: not run (needs AWS) -->\n```python\ndef broken(:\n```\n\n"
                   "<!-- docs-test: frobnicate -->\n```bash\ncai --help\n```\n")
    kinds, problems = _classify(doc)
    text = "\n".join(problems)
    assert f"{doc}:3: an indented code block" in text and ":7:" not in text
    assert f"{doc}:9: the block's language is 'not given'" in text
    assert f"{doc}:13: a ```yaml block that is neither run nor marked" in text
    assert f"{doc}:18: the ```python block does not parse: SyntaxError" in text
    assert f"{doc}:23: unknown directive 'docs-test: frobnicate'" in text
    assert [k for k, _ in kinds] == ["not run: needs AWS", "run"]


@pytest.mark.parametrize("path", [p for p in DOCS if any(k in ("run", "file") for k, _ in _classify(p)[0])],
                         ids=lambda p: str(p.relative_to(ROOT)))
def test_doc_blocks_run_as_shown(path, tmp_path):
    kinds, _ = _classify(path)
    failures = []
    last = None  # (block, output) of the last python/bash block run, for an output block after it
    for kind, b in kinds:
        for setup in b.directive("setup"):
            done = _shell(setup, tmp_path, f"{b.where}: setup `{setup}`")
            if done.returncode:
                failures.append(f"{b.where}: setup `{setup}` exited {done.returncode}\n{done.stdout[-2000:]}")
        if kind == "file":
            name = b.directive("file")[0]
            (tmp_path / name).parent.mkdir(parents=True, exist_ok=True)
            (tmp_path / name).write_text(b.text)
        elif kind == "output":
            if last is not None and not output_matches(b.text, last[1], b.numbers_vary):
                failures.append(f"{b.where}: the output shown is not what {last[0].where} printed\n"
                                f"{_diff(b.text, last[1])}")
        elif kind == "run" and b.lang == "console":
            for command, expected in console_commands(b.text):
                if not command:
                    failures.append(f"{b.where}: output before any `$ ` command line")
                    continue
                done = _shell(command, tmp_path, f"{b.where}: `{command}`")
                if done.returncode:
                    failures.append(f"{b.where}: `{command}` exited {done.returncode}\n{done.stdout[-3000:]}")
                elif not output_matches(expected, done.stdout, b.numbers_vary):
                    failures.append(f"{b.where}: `{command}` printed something other than shown\n"
                                    f"{_diff(expected, done.stdout)}")
        elif kind == "run" and b.lang == "python":
            script = tmp_path / f"docs_block_{path.stem}_{b.line}.py"
            script.write_text(b.text)
            done = _shell(f"python {shlex.quote(script.name)}", tmp_path, f"{b.where}: the python block")
            last = (b, done.stdout)
            if done.returncode:
                failures.append(f"{b.where}: the python block exited {done.returncode}\n{done.stdout[-3000:]}")
        elif kind == "run":
            done = _shell(b.text, tmp_path, f"{b.where}: the {b.lang} block")
            last = (b, done.stdout)
            if done.returncode:
                failures.append(f"{b.where}: the {b.lang} block exited {done.returncode}:\n{b.text}"
                                f"--- output\n{done.stdout[-3000:]}")
    assert not failures, "\n\n".join(failures)


def test_plan_without_the_published_results_names_the_folder_not_the_size(monkeypatch, tmp_path, capsys):
    """`cai plan --data-size 1TB` finds the 1000 GB runs only in the published CAI results folder: without it,
    it says to set that folder rather than that no run of this size was published."""
    from cosmicai.cli import main

    monkeypatch.setenv("CAI_REFERENCE_DIR", str(tmp_path / "absent"))
    assert main(["plan", "--data-size", "1TB", "--seeds", "1", "--partition-sizes", "100MB",
                 "--memory-options", "10240", "--concurrency", "1000"]) == 0
    last = capsys.readouterr().out.strip().splitlines()[-1]
    assert last == ("published: only the paper's 12.6 GB run is built in; for the other published runs (1-12.6 GB, "
                    "100 GB, 983 GB, 1000 GB) set $CAI_REFERENCE_DIR or --reference to the published CAI results "
                    "folder")
