"""Fenced code blocks of README.md and docs/*.md, with the ``docs-test`` directives that say how each is checked.

The conventions (checked by ``tests/test_docs.py``):

* Every block is fenced (an indented code block is an error) and names its language: ``python``, ``bash``,
  ``sh``, ``console``, ``json``, ``yaml``, ``toml`` or ``text``.
* ``python``, ``bash`` and ``sh`` blocks are run; ``console`` blocks are runs shown with their output: each
  ``$ `` line (continued by a trailing ``\\``) is a command and the lines up to the next ``$ `` are the output it
  must print (stdout and stderr together). A ``python``/``bash`` block's output is shown in a ``text`` block
  just after it marked ``<!-- docs-test: output -->``.
* Output is compared line by line, trailing spaces ignored. A line ``...`` stands for any number of lines.
  ``<!-- docs-test: output (numbers vary) -->`` (or ``<!-- docs-test: numbers vary -->`` before a console block)
  compares with every number replaced by ``N``. The folder the blocks run in prints as ``/path/to/work``.
* HTML comments on the lines just above a fence are its directives, ``<!-- docs-test: ... -->``:

  - ``not run (REASON)``: not run; still checked to parse (python: ``ast.parse``; bash/sh/console commands:
    ``bash -n``; json/yaml/toml: parsed). Every block that is not run needs one, ``text`` figures included.
  - ``output`` / ``output (numbers vary)``: this ``text`` block is the output of the block run before it.
  - ``file NAME``: the block's text is written to NAME in the doc's folder (json/yaml/toml are parsed first),
    for the blocks after it to use.
  - ``setup COMMAND``: a shell command run in the doc's folder before this block (hidden from readers), e.g.
    ``<!-- docs-test: setup cai data synth --galaxies 48 --out galaxies -->``.

The blocks of one Markdown file run in order in one fresh temporary folder, with the dev venv's ``bin`` first
on ``PATH`` (so ``cai`` and ``python`` are the venv's).
"""

from __future__ import annotations

import re
from dataclasses import dataclass, field
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
LANGS = {"python", "bash", "sh", "console", "json", "yaml", "toml", "text"}
RUNNABLE = {"python", "bash", "sh", "console"}

_FENCE = re.compile(r"^(?P<indent>\s*)(?P<fence>`{3,}|~{3,})(?P<lang>[^\s`]*)\s*$")
_COMMENT = re.compile(r"^\s*<!--(.*?)-->\s*$")
_DIRECTIVE = re.compile(r"^\s*docs-test:\s*(.*?)\s*$")
_LIST_ITEM = re.compile(r"^\s*([*+-]|\d+[.)])\s")


@dataclass
class Block:
    path: Path
    line: int                       # 1-based line of the opening fence
    lang: str
    text: str                       # the block's content, its fence indentation removed
    directives: list[str] = field(default_factory=list)

    @property
    def where(self) -> str:
        return f"{_rel(self.path)}:{self.line}"

    def directive(self, name: str) -> list[str]:
        """The arguments of every directive starting with ``name``."""
        return [d[len(name):].strip() for d in self.directives if d == name or d.startswith(name + " ")]

    @property
    def not_run_reason(self) -> str | None:
        for d in self.directives:
            m = re.fullmatch(r"not run \((.+)\)", d)
            if m:
                return m.group(1)
        return None

    @property
    def is_output(self) -> bool:
        return any(d in ("output", "output (numbers vary)") for d in self.directives)

    @property
    def numbers_vary(self) -> bool:
        return any(d in ("output (numbers vary)", "numbers vary") for d in self.directives)


def _rel(path: Path) -> str:
    return str(path.relative_to(ROOT)) if path.is_relative_to(ROOT) else str(path)


def doc_files() -> list[Path]:
    return [ROOT / "README.md", *sorted((ROOT / "docs").glob("*.md"))]


def blocks(path: Path) -> tuple[list[Block], list[str]]:
    """The fenced blocks of ``path`` and the problems found while reading it (unclosed fences, indented code
    blocks, unknown directives)."""
    lines = path.read_text().splitlines()
    found: list[Block] = []
    problems: list[str] = []
    rel = _rel(path)
    i = 0
    while i < len(lines):
        m = _FENCE.match(lines[i])
        if not m:
            if _indented_code(lines, i):
                problems.append(f"{rel}:{i + 1}: an indented code block; fence it (```bash ... ```) so it is "
                                f"run or marked: {lines[i].strip()[:60]!r}")
            i += 1
            continue
        start, indent, fence = i, len(m.group("indent")), m.group("fence")
        body = []
        i += 1
        while i < len(lines) and not (lines[i].strip().startswith(fence) and lines[i].strip().strip(fence[0]) == ""):
            body.append(lines[i][indent:] if lines[i][:indent].strip() == "" else lines[i].lstrip())
            i += 1
        if i == len(lines):
            problems.append(f"{rel}:{start + 1}: the code fence is never closed")
        directives = []
        j = start - 1
        while j >= 0 and _COMMENT.match(lines[j]):
            d = _DIRECTIVE.match(_COMMENT.match(lines[j]).group(1))
            if d:
                directives.insert(0, d.group(1))
            j -= 1
        found.append(Block(path, start + 1, m.group("lang"), "\n".join(body) + "\n", directives))
        i += 1
    for b in found:
        for d in b.directives:
            if not re.fullmatch(r"not run \(.+\)|output|output \(numbers vary\)|numbers vary|file \S+|setup .+", d):
                problems.append(f"{b.where}: unknown directive 'docs-test: {d}' (see tests/docs_blocks.py)")
    return found, problems


def _indented_code(lines: list[str], i: int) -> bool:
    """An indented (4-space) code block starts at line i: an indented line after a blank line whose paragraph
    before is neither a list item nor a list item's indented continuation."""
    if not re.match(r"^( {4,}|\t)\S", lines[i]) or i == 0 or lines[i - 1].strip():
        return False
    j = i - 1
    while j >= 0 and not lines[j].strip():
        j -= 1
    if j < 0:
        return False
    prev = lines[j]
    if prev.startswith((" ", "\t")) or _LIST_ITEM.match(prev) or _COMMENT.match(prev):
        return False
    # a paragraph that belongs to a list item: walk back to its first line
    while j > 0 and lines[j - 1].strip():
        j -= 1
    return not _LIST_ITEM.match(lines[j])


def console_commands(text: str) -> list[tuple[str, str]]:
    """(command, expected output) pairs of a console block: ``$ `` lines, ``\\`` continuations joined."""
    pairs: list[tuple[str, list[str]]] = []
    lines = text.splitlines()
    k = 0
    while k < len(lines):
        line = lines[k]
        if line.startswith("$ "):
            command = line[2:]
            while command.endswith("\\") and k + 1 < len(lines):
                k += 1
                command = command[:-1].rstrip() + " " + lines[k].strip()
            pairs.append((command, []))
        elif pairs:
            pairs[-1][1].append(line)
        else:
            pairs.append(("", [line]))  # output before any command: reported by the test
        k += 1
    return [(c, "\n".join(out)) for c, out in pairs]


def normalise(text: str, numbers: bool) -> list[str]:
    lines = [line.rstrip() for line in text.strip("\n").splitlines()]
    if numbers:
        lines = [re.sub(r"\d+(?:[.,]\d+)*", "N", line) for line in lines]
    return lines


def output_matches(expected: str, got: str, numbers: bool = False) -> bool:
    """True when ``got`` is ``expected`` line for line (``...`` lines match any lines)."""
    exp, out = normalise(expected, numbers), normalise(got, numbers)
    pattern = "".join(r"(?:[^\n]*\n)*?" if line.strip() == "..." else re.escape(line) + r"\n" for line in exp)
    return re.fullmatch(pattern, "".join(line + "\n" for line in out)) is not None
