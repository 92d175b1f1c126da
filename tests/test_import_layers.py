"""Import structure of ``src/cosmicai``, read statically with ``ast`` (nothing is imported to build it):

* no import cycle among cosmicai modules, counting module-level and function-level imports alike, and dynamic
  imports resolved: a string naming a cosmicai module (``"cosmicai.backends.local:from_options"`` in a registry)
  and an f-string over a cosmicai package (``f"cosmicai.cli.{name}"``) are edges too;
* the layer rules of docs/architecture.md;
* one size parser (``cosmicai.sizes.parse_size``);
* the Lambda / Step Functions limits written down once, in ``cosmicai.lambda_limits`` (and template.yaml's
  parameter bounds agreeing with them).

An import ``from X import name`` is an edge to the module ``X.name`` when that is a module, else to ``X`` (a
package's ``__init__``). The implicit import of a module's parent packages is not an edge: every module has it,
so it would make every package that imports one of its own submodules look cyclic.
"""

from __future__ import annotations

import ast
import re
import subprocess
import sys
from pathlib import Path

import pytest

SRC = Path(__file__).resolve().parents[1] / "src"
PACKAGE = SRC / "cosmicai"
LIMITS = PACKAGE / "lambda_limits.py"
TEMPLATE = PACKAGE / "backends" / "aws" / "template.yaml"


def _modules() -> dict[str, tuple[Path, bool]]:
    """Dotted module name -> (file, is a package ``__init__``) for every module under src/cosmicai."""
    out = {}
    for path in sorted(PACKAGE.rglob("*.py")):
        parts = list(path.relative_to(SRC).with_suffix("").parts)
        is_pkg = parts[-1] == "__init__"
        out[".".join(parts[:-1] if is_pkg else parts)] = (path, is_pkg)
    return out


def _import_graph() -> dict[str, dict[str, str]]:
    """Module -> {imported cosmicai module: "file:line" of the first import of it}, every import counted."""
    modules = _modules()

    def known(name: str) -> str | None:
        while name and name not in modules:
            name = name.rpartition(".")[0]
        return name or None

    graph: dict[str, dict[str, str]] = {}
    for mod, (path, is_pkg) in modules.items():
        package = mod if is_pkg else mod.rpartition(".")[0]
        edges: dict[str, str] = {}
        tree = ast.parse(path.read_text(), str(path))
        groups = {id(n.value) for n in ast.walk(tree) if isinstance(n, ast.Assign)
                  and any(isinstance(t, ast.Name) and t.id.endswith("GROUP") for t in n.targets)}
        for node in ast.walk(tree):
            if id(node) in groups:  # an entry-point group's name, not a module to import
                continue
            targets: list[str | None] = []
            if isinstance(node, ast.Import):
                targets = [known(a.name) for a in node.names if a.name.split(".")[0] == "cosmicai"]
            elif isinstance(node, ast.ImportFrom):
                if node.level:
                    base = package.split(".")[:len(package.split(".")) - (node.level - 1)]
                    origin = ".".join(base + ([node.module] if node.module else []))
                else:
                    origin = node.module or ""
                if origin.split(".")[0] != "cosmicai":
                    continue
                targets = [f"{origin}.{a.name}" if f"{origin}.{a.name}" in modules else known(origin)
                           for a in node.names]
            targets += _dynamic_targets(node, modules)
            for target in targets:
                if target and target != mod:
                    where = path.relative_to(SRC.parent) if path.is_relative_to(SRC.parent) else path
                    edges.setdefault(target, f"{where}:{node.lineno}")
        graph[mod] = edges
    return graph


#: A string that names a cosmicai module, optionally with an attribute: what a registry imports on first use.
DYNAMIC_TARGET = re.compile(r"^(cosmicai(?:\.\w+)+)(?::(\w+))?$")


def _dynamic_targets(node: ast.AST, modules: dict[str, tuple[Path, bool]]) -> list[str]:
    """Modules a dynamic import may load: ``"cosmicai.x.y"`` / ``"cosmicai.x.y:attr"`` string constants naming a
    module or package (entry-point group names, assigned to ``*GROUP``, are skipped by the caller), and every
    module under the package of an f-string that starts ``"cosmicai.<package>."``."""
    if isinstance(node, ast.Constant) and isinstance(node.value, str):
        m = DYNAMIC_TARGET.match(node.value)
        if m and m.group(1) in modules:
            return [m.group(1)]
    if isinstance(node, ast.JoinedStr) and node.values and isinstance(node.values[0], ast.Constant):
        head = str(node.values[0].value)
        if head.startswith("cosmicai.") and head.endswith(".") and head[:-1] in modules:
            return [m for m in modules if m.startswith(head) and not m.endswith(".__main__")]  # run, never imported
    return []


def _cycles(graph: dict[str, dict[str, str]]) -> list[tuple[list[str], set[str]]]:
    """(one cycle as a closed path a -> ... -> a, its modules) per strongly connected component of more than one
    module (Tarjan's algorithm)."""
    index: dict[str, int] = {}
    low: dict[str, int] = {}
    stack: list[str] = []
    on_stack: set[str] = set()
    components: list[set[str]] = []

    def visit(v: str) -> None:
        index[v] = low[v] = len(index)
        stack.append(v)
        on_stack.add(v)
        for w in graph[v]:
            if w not in index:
                visit(w)
                low[v] = min(low[v], low[w])
            elif w in on_stack:
                low[v] = min(low[v], index[w])
        if low[v] == index[v]:
            comp = set()
            while True:
                w = stack.pop()
                on_stack.discard(w)
                comp.add(w)
                if w == v:
                    break
            if len(comp) > 1:
                components.append(comp)

    for v in sorted(graph):
        if v not in index:
            visit(v)
    return [(_closed_path(graph, comp), comp) for comp in components]


def _closed_path(graph: dict[str, dict[str, str]], comp: set[str]) -> list[str]:
    """A shortest cycle through the first module of ``comp`` (breadth first, within ``comp``)."""
    start = min(comp)
    paths = {start: [start]}
    frontier = [start]
    while frontier:
        nxt = []
        for v in frontier:
            for w in sorted(graph[v]):
                if w == start:
                    return paths[v] + [start]
                if w in comp and w not in paths:
                    paths[w] = paths[v] + [w]
                    nxt.append(w)
        frontier = nxt
    raise AssertionError(f"no cycle through {start} in {sorted(comp)}")  # cannot happen for a component


def test_no_import_cycles():
    graph = _import_graph()
    assert len(graph) > 50
    cycles = _cycles(graph)
    lines = []
    for cycle, comp in cycles:
        lines.append(" -> ".join(cycle) + f"   (modules in this tangle: {', '.join(sorted(comp))})")
        lines += [f"    {a} -> {b}  ({graph[a][b]})" for a, b in zip(cycle, cycle[1:])]
    print("\n".join(lines))
    assert not cycles, "import cycles among cosmicai modules:\n" + "\n".join(lines)


def test_graph_resolves_dynamic_imports():
    """The registries' "module:attr" strings and the CLI's f-string over its command modules are edges, so the
    layer rules and the cycle check see what they load."""
    graph = _import_graph()
    assert {"cosmicai.backends.local", "cosmicai.backends.dask", "cosmicai.backends.lithops",
            "cosmicai.runners.stepfunctions"} <= set(graph["cosmicai.runners.registry"])
    assert {"cosmicai.cli.run", "cosmicai.cli.aws", "cosmicai.cli.cluster"} <= set(graph["cosmicai.cli"])
    assert "cosmicai.models.astromae" in graph["cosmicai.models"]  # the shipped models register on import
    assert "cosmicai.models.astromae.load" in graph["cosmicai.models.astromae"]  # their factories


def test_dynamic_import_targets_exist():
    """Every "cosmicai.module:attr" string names a module that defines attr (a registry entry cannot go stale)."""
    modules = _modules()
    missing = []
    for path in sorted(PACKAGE.rglob("*.py")):
        for node in ast.walk(ast.parse(path.read_text())):
            if not (isinstance(node, ast.Constant) and isinstance(node.value, str)):
                continue
            m = DYNAMIC_TARGET.match(node.value)
            if not m or not m.group(2):
                continue
            where = f"{path.relative_to(SRC.parent)}:{node.lineno}"
            if m.group(1) not in modules:
                missing.append(f"{where}: {node.value!r}: no module {m.group(1)}")
                continue
            tree = ast.parse(modules[m.group(1)][0].read_text())
            defined = {n.name for n in tree.body if isinstance(n, (ast.FunctionDef, ast.ClassDef))}
            defined |= {t.id for n in tree.body if isinstance(n, ast.Assign) for t in n.targets
                        if isinstance(t, ast.Name)}
            if m.group(2) not in defined:
                missing.append(f"{where}: {node.value!r}: {m.group(1)} defines no {m.group(2)}")
    assert not missing, "\n".join(missing)


def test_graph_sees_function_level_and_relative_imports():
    graph = _import_graph()
    assert "cosmicai.analysis.cost" in graph["cosmicai.simulator.simulate"]  # module level, relative
    assert "cosmicai.data.split" in graph["cosmicai.cli.data"]  # inside cmd_split: commands import lazily
    assert "cosmicai.models.astromae.fast" in graph["cosmicai.models.registry"]  # inside functions: torch is lazy
    # the two cycles of issue #18 stay broken: the dependency goes one way only
    assert "cosmicai.analysis.lambda_reports" in graph["cosmicai.analysis.cost"]
    assert not graph["cosmicai.backends.aws.logs"]
    assert "cosmicai.data.sources" in graph["cosmicai.data.split"]
    assert "cosmicai.data.split" not in graph["cosmicai.data.sources"]


def _defs(name: str) -> list[str]:
    return sorted(f"{p.relative_to(SRC.parent)}:{node.lineno}" for p in PACKAGE.rglob("*.py")
                  for node in ast.walk(ast.parse(p.read_text()))
                  if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef)) and node.name == name)


def test_one_size_parser():
    defs = _defs("parse_size")
    assert len(defs) == 1 and defs[0].startswith("src/cosmicai/sizes.py:"), \
        f"parse_size must be defined once, in src/cosmicai/sizes.py; found {defs}"


def _limit_names() -> set[str]:
    tree = ast.parse(LIMITS.read_text())
    return {t.id for node in tree.body if isinstance(node, (ast.Assign, ast.AnnAssign))
            for t in (node.targets if isinstance(node, ast.Assign) else [node.target]) if isinstance(t, ast.Name)}


def _assigned_names(target: ast.expr) -> list[str]:
    if isinstance(target, ast.Name):
        return [target.id]
    if isinstance(target, (ast.Tuple, ast.List)):
        return [n for elt in target.elts for n in _assigned_names(elt)]
    return []


def test_lambda_limits_live_in_one_module():
    names = _limit_names()
    assert {"MIN_MEMORY_MB", "MAX_MEMORY_MB", "LAMBDA_TIMEOUT_S", "MIN_EPHEMERAL_MB", "MAX_EPHEMERAL_MB",
            "MAP_MAX_CHILDREN"} <= names
    problems = []
    for path in sorted(PACKAGE.rglob("*.py")):
        if path == LIMITS:
            continue
        for node in ast.walk(ast.parse(path.read_text())):
            if isinstance(node, ast.Assign):
                targets, value = [n for t in node.targets for n in _assigned_names(t)], node.value
            elif isinstance(node, ast.AnnAssign) and node.value is not None:
                targets, value = _assigned_names(node.target), node.value
            else:
                continue
            where = f"{path.relative_to(SRC.parent)}:{node.lineno}"
            for name in sorted(set(targets) & names):
                problems.append(f"{where}: assigns {name} (import it from cosmicai.lambda_limits)")
            if any(isinstance(c, ast.Constant) and type(c.value) in (int, float) and c.value == 10_240
                   for c in ast.walk(value)):
                problems.append(f"{where}: assigns the literal 10240 to {', '.join(targets) or 'a name'} "
                                f"(use cosmicai.lambda_limits.MAX_MEMORY_MB / MAX_EPHEMERAL_MB)")
    assert not problems, "\n".join(problems)


def test_limits_import_without_boto3():
    code = ("import sys\n"
            "sys.modules['boto3'] = sys.modules['botocore'] = None\n"
            "import cosmicai.lambda_limits, cosmicai.analysis.cost, cosmicai.simulator.planner\n"
            "print(cosmicai.lambda_limits.MAX_MEMORY_MB)\n")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert out.returncode == 0, out.stderr
    assert out.stdout.strip() == "10240"


def _template_bounds() -> dict[str, dict[str, int]]:
    """CloudFormation parameter -> {"MinValue": n, "MaxValue": n} from template.yaml's Parameters section."""
    bounds: dict[str, dict[str, int]] = {}
    section = param = None
    for line in TEMPLATE.read_text().splitlines():
        if re.match(r"^\S", line):
            section = line.split(":")[0]
            continue
        m = re.match(r"^  (\w+):\s*$", line)
        if section == "Parameters" and m:
            param = m.group(1)
            continue
        m = re.match(r"^    (MinValue|MaxValue):\s*(\d+)\s*$", line)
        if section == "Parameters" and param and m:
            bounds.setdefault(param, {})[m.group(1)] = int(m.group(2))
    return bounds


def test_template_bounds_match_the_limits():
    from cosmicai import lambda_limits as limits

    bounds = _template_bounds()
    memory = {"MinValue": limits.MIN_MEMORY_MB, "MaxValue": limits.MAX_MEMORY_MB}
    assert bounds["MemorySize"] == memory and bounds["ControlMemorySize"] == memory
    assert bounds["SummarizeMemorySize"]["MaxValue"] == limits.MAX_MEMORY_MB
    assert bounds["Timeout"] == {"MinValue": limits.MIN_TIMEOUT_S, "MaxValue": limits.LAMBDA_TIMEOUT_S}
    assert bounds["EphemeralStorage"] == {"MinValue": limits.MIN_EPHEMERAL_MB, "MaxValue": limits.MAX_EPHEMERAL_MB}
    assert bounds["MaxConcurrency"]["MaxValue"] == limits.MAP_MAX_CHILDREN


#: The layer rules of docs/architecture.md: (layer, what it must never import).
LAYER_RULES = (
    ("cosmicai.pipeline", ("cosmicai.backends", "cosmicai.runners", "cosmicai.cli", "cosmicai.analysis",
                           "cosmicai.experiments", "cosmicai.simulator", "cosmicai.api")),
    ("cosmicai.models", ("cosmicai.config", "cosmicai.pipeline", "cosmicai.data", "cosmicai.backends",
                         "cosmicai.runners", "cosmicai.cli", "cosmicai.analysis", "cosmicai.experiments",
                         "cosmicai.simulator", "cosmicai.api")),
    ("cosmicai.data", ("cosmicai.pipeline", "cosmicai.models", "cosmicai.backends", "cosmicai.runners",
                       "cosmicai.cli", "cosmicai.analysis", "cosmicai.experiments", "cosmicai.api")),
    ("cosmicai.analysis", ("cosmicai.pipeline.infer", "cosmicai.runners", "cosmicai.backends", "cosmicai.experiments",
                           "cosmicai.cli", "cosmicai.api")),
    ("cosmicai.simulator", ("cosmicai.pipeline", "cosmicai.runners", "cosmicai.backends", "cosmicai.experiments",
                            "cosmicai.cli", "cosmicai.api")),
    ("cosmicai.backends", ("cosmicai.runners", "cosmicai.cli", "cosmicai.analysis", "cosmicai.experiments",
                           "cosmicai.simulator", "cosmicai.api")),
    ("cosmicai.runners", ("cosmicai.cli", "cosmicai.api", "cosmicai.experiments")),
)


def _within(module: str, package: str) -> bool:
    return module == package or module.startswith(package + ".")


def test_layers_import_only_downwards():
    """Stages never import backends, runners or the CLI; models never the pipeline or the data layer; analysis
    only reads results (it runs nothing); backends do not reach up into runners or analysis."""
    graph = _import_graph()
    broken = [f"{module} -> {dep} ({where})" for layer, banned in LAYER_RULES
              for module, deps in graph.items() if _within(module, layer)
              for dep, where in deps.items() if any(_within(dep, b) for b in banned)]
    assert not broken, "\n".join(broken)


def test_nothing_below_the_cli_imports_the_cli():
    graph = _import_graph()
    broken = [f"{module} -> {dep} ({where})" for module, deps in graph.items() if not _within(module, "cosmicai.cli")
              for dep, where in deps.items() if _within(dep, "cosmicai.cli")]
    assert not broken, "\n".join(broken)


def test_the_rules_catch_a_breach(tmp_path, monkeypatch):
    """The layer check fails on a module that breaks a rule through a registry string alone."""
    probe = tmp_path / "_layer_probe.py"
    probe.write_text('TARGET = "cosmicai.runners.stepfunctions:StepFunctionsRunner"\n')
    real = _modules
    monkeypatch.setattr(sys.modules[__name__], "_modules",
                        lambda: {**real(), "cosmicai.analysis._layer_probe": (probe, False)})
    graph = _import_graph()
    assert "cosmicai.runners.stepfunctions" in graph["cosmicai.analysis._layer_probe"]
    with pytest.raises(AssertionError, match="cosmicai.analysis._layer_probe -> cosmicai.runners.stepfunctions"):
        test_layers_import_only_downwards()


#: The names of a run's files and folders (results.py): only ``results.RunFolder`` joins them to a result URL.
RUN_FILE_NAMES = {"PLAN_NAME", "PLAN_HASH_NAME", "TASK_DIGESTS_NAME", "TASKS_NAME", "LEASE_NAME", "RUN_NAME",
                  "COMBINED_NAME", "PREDICTIONS_NAME", "SUMMARY_NAME", "RANKS_DIR", "PREDICTIONS_DIR", "ERRORS_DIR",
                  "FAST_CHECK_DIR"}


def test_run_paths_are_joined_only_by_run_folder():
    """No `storage.join(result, SUMMARY_NAME)` outside results.py: every path of a run comes from RunFolder."""
    found = []
    for path in sorted(PACKAGE.rglob("*.py")):
        if path == PACKAGE / "results.py":
            continue
        for node in ast.walk(ast.parse(path.read_text())):
            if isinstance(node, ast.Call) and getattr(node.func, "attr", getattr(node.func, "id", "")) == "join":
                names = {n.id for a in node.args for n in ast.walk(a) if isinstance(n, ast.Name)}
                names |= {n.attr for a in node.args for n in ast.walk(a) if isinstance(n, ast.Attribute)}
                if names & RUN_FILE_NAMES:
                    found.append(f"{path.relative_to(SRC.parent)}:{node.lineno}: {ast.unparse(node)}")
    assert not found, "use results.RunFolder(url).<file> instead:\n" + "\n".join(found)
