"""Safe by default: no unpickling of external data in ``src/``, a least-privilege IaC template, and credentials
that never reach a log, an output file or the console.
"""

from __future__ import annotations

import ast
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from faultproxy import ledger

ROOT = Path(__file__).resolve().parents[1]
SRC = ROOT / "src" / "cosmicai"
TEMPLATE = SRC / "backends" / "aws" / "template.yaml"

#: The only pickle.Unpickler subclasses allowed in src/: each must override find_class (an allow-list of globals).
ALLOWED_UNPICKLERS = {"cosmicai/models/astromae/checkpoint.py": {"_RestrictedUnpickler"}}

_PICKLE_MODULES = {"pickle", "_pickle", "cPickle", "dill", "cloudpickle", "joblib", "shelve", "marshal"}
_PICKLE_CALLS = {"load", "loads", "Unpickler", "open"}


def _dotted(node: ast.AST) -> str:
    """'a.b.c' for a Name/Attribute chain, '' otherwise."""
    parts = []
    while isinstance(node, ast.Attribute):
        parts.append(node.attr)
        node = node.value
    if isinstance(node, ast.Name):
        parts.append(node.id)
        return ".".join(reversed(parts))
    return ""


def _kw_is(call: ast.Call, name: str, value: object) -> bool:
    return any(k.arg == name and isinstance(k.value, ast.Constant) and k.value.value is value for k in call.keywords)


def unsafe_loads(source: str, relpath: str) -> list[str]:
    """Every unsafe deserialisation in one module's source, as 'path:line: reason'."""
    tree = ast.parse(source)
    found: list[str] = []

    def bad(node: ast.AST, why: str) -> None:
        found.append(f"{relpath}:{node.lineno}: {why}")

    aliases: dict[str, str] = {}
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            for a in node.names:
                aliases[a.asname or a.name.split(".")[0]] = a.name if a.asname else a.name.split(".")[0]
        elif isinstance(node, ast.ImportFrom) and node.module:
            for a in node.names:
                full = f"{node.module}.{a.name}"
                aliases[a.asname or a.name] = full
                if node.module.split(".")[0] in _PICKLE_MODULES and a.name in _PICKLE_CALLS | {"Unpickler"}:
                    bad(node, f"imports {full} (unpickling entry point)")
                if full in ("torch.load", "torch.serialization.load", "torch.jit.load"):
                    bad(node, f"imports {full} directly (weights_only cannot be checked)")

    allowed = ALLOWED_UNPICKLERS.get(relpath, set())
    for node in ast.walk(tree):
        if isinstance(node, ast.ClassDef):
            bases = {_dotted(b) for b in node.bases}
            resolved = {".".join([aliases.get(b.split(".")[0], b.split(".")[0])] + b.split(".")[1:]) for b in bases}
            if any(b.endswith("Unpickler") for b in resolved):
                if node.name not in allowed:
                    bad(node, f"class {node.name} subclasses an Unpickler and is not allow-listed")
                elif not any(isinstance(f, ast.FunctionDef) and f.name == "find_class" for f in node.body):
                    bad(node, f"allow-listed unpickler {node.name} does not restrict find_class")
        if not isinstance(node, ast.Call):
            continue
        name = _dotted(node.func)
        if not name:
            continue
        head, _, rest = name.partition(".")
        full = aliases.get(head, head) + ("." + rest if rest else "")
        module, _, attr = full.rpartition(".")
        if full in ("torch.load", "torch.serialization.load") and not _kw_is(node, "weights_only", True):
            bad(node, f"{name}() without weights_only=True")
        elif full == "torch.jit.load":
            bad(node, "torch.jit.load() runs TorchScript code from the file")
        elif module.split(".")[0] in _PICKLE_MODULES and attr in _PICKLE_CALLS:
            bad(node, f"{name}() unpickles its input")
        elif attr == "Unpickler":
            bad(node, f"{name}() builds an unrestricted unpickler")
        elif full in ("numpy.load", "np.load") and _kw_is(node, "allow_pickle", True):
            bad(node, f"{name}(allow_pickle=True)")
        elif full in ("pandas.read_pickle", "pd.read_pickle"):
            bad(node, f"{name}() unpickles its input")
        elif full in ("yaml.load", "yaml.unsafe_load", "yaml.full_load"):
            bad(node, f"{name}() can construct arbitrary objects; use yaml.safe_load")
        elif full in ("eval", "exec"):
            bad(node, f"{name}() executes text")
    return found


def test_scanner_catches_every_unsafe_pattern():
    """The scanner itself: each line below is one violation; the safe forms pass."""
    unsafe = (
        "import torch, pickle, numpy as np, yaml\n"
        "import pickle as pk\n"
        "from pickle import loads\n"
        "torch.load(f)\n"
        "torch.load(f, weights_only=False)\n"
        "torch.serialization.load(f)\n"
        "torch.jit.load(f)\n"
        "pickle.load(f)\n"
        "pk.loads(b)\n"
        "pickle.Unpickler(f).load()\n"
        "class U(pickle.Unpickler):\n    def find_class(self, m, n): return 1\n"
        "np.load(f, allow_pickle=True)\n"
        "yaml.load(s)\n"
        "eval(s)\n"
    )
    found = unsafe_loads(unsafe, "cosmicai/x.py")
    assert sorted(int(f.split(":")[1]) for f in found) == [3, 4, 5, 6, 7, 8, 9, 10, 11, 13, 14, 15], found
    safe = ("import torch, pickle, numpy as np, yaml\n"
            "torch.load(f, map_location='cpu', weights_only=True)\n"
            "np.load(f, allow_pickle=False)\nnp.load(f)\nyaml.safe_load(s)\nmodel.eval()\n"
            "except_ = pickle.UnpicklingError\n")
    assert unsafe_loads(safe, "cosmicai/x.py") == []
    restricted = "import pickle\nclass _RestrictedUnpickler(pickle.Unpickler):\n    pass\n"
    assert unsafe_loads(restricted, "cosmicai/models/astromae/checkpoint.py") == [
        "cosmicai/models/astromae/checkpoint.py:2: allow-listed unpickler _RestrictedUnpickler does not restrict find_class"]


def test_src_never_unpickles_external_data():
    files = sorted(SRC.rglob("*.py"))
    assert len(files) > 20
    problems = []
    for path in files:
        problems += unsafe_loads(path.read_text(), path.relative_to(SRC.parent).as_posix())
    assert problems == [], "unsafe deserialisation in src/:\n" + "\n".join(problems)
    # The allow-listed unpickler exists where the allow-list says (a stale entry would hide a move).
    for rel, names in ALLOWED_UNPICKLERS.items():
        text = (SRC.parent / rel).read_text()
        assert all(f"class {n}(" in text for n in names), rel


# --- the IaC template ---------------------------------------------------------------------------------------------

def _load_template(text: str) -> dict:
    from cfnlint.decode.cfn_yaml import loads

    return loads(text)


def _as_list(value: object) -> list:
    return list(value) if isinstance(value, (list, tuple)) else [value]


def policy_problems(template: dict) -> list[str]:
    """Allow statements with a wildcard action on a wildcard resource, NotAction/NotResource allows, and
    *FullAccess / AdministratorAccess managed policies, anywhere in the template."""
    problems: list[str] = []

    def walk(node: object, where: str) -> None:
        if isinstance(node, dict):
            if "Statement" in node:
                for i, st in enumerate(_as_list(node["Statement"])):
                    if not isinstance(st, dict) or st.get("Effect") != "Allow":
                        continue
                    at = f"{where}.Statement[{i}]"
                    if "NotAction" in st or "NotResource" in st:
                        problems.append(f"{at}: Allow with NotAction/NotResource")
                    actions = [a for a in _as_list(st.get("Action", [])) if isinstance(a, str)]
                    resources = [r for r in _as_list(st.get("Resource", [])) if isinstance(r, str)]
                    wild_action = [a for a in actions if a == "*" or a.endswith(":*")]
                    if wild_action and "*" in resources:
                        problems.append(f"{at}: wildcard action {wild_action} on Resource '*'")
            for key, value in node.items():
                walk(value, f"{where}.{key}")
        elif isinstance(node, list):
            for i, value in enumerate(node):
                walk(value, f"{where}[{i}]")
        elif isinstance(node, str) and ("FullAccess" in node or node.endswith(("/AdministratorAccess",
                                                                               "/PowerUserAccess"))):
            problems.append(f"{where}: managed policy {node}")

    walk(template.get("Resources", {}), "Resources")
    return problems


def test_policy_checker_catches_broad_grants():
    bad = """
Resources:
  Fn:
    Type: AWS::Serverless::Function
    Properties:
      Policies:
        - AmazonS3FullAccess
        - Statement:
            - Effect: Allow
              Action: "s3:*"
              Resource: "*"
  Role:
    Type: AWS::IAM::Role
    Properties:
      ManagedPolicyArns: [!Sub "arn:${AWS::Partition}:iam::aws:policy/AdministratorAccess"]
      Policies:
        - PolicyName: p
          PolicyDocument:
            Statement:
              - {Effect: Allow, Action: ["*"], Resource: ["*"]}
              - {Effect: Allow, NotAction: "iam:*", Resource: !Ref X}
              - {Effect: Deny, Action: "*", Resource: "*"}
"""
    found = policy_problems(_load_template(bad))
    assert len(found) == 5, found
    assert any("AmazonS3FullAccess" in f for f in found) and any("AdministratorAccess" in f for f in found)
    assert sum("wildcard action" in f for f in found) == 2 and sum("NotAction" in f for f in found) == 1


def test_template_grants_no_wildcard_action_on_wildcard_resource():
    template = _load_template(TEMPLATE.read_text())
    assert "Resources" in template and any(
        r.get("Type") in ("AWS::Serverless::Function", "AWS::Lambda::Function") for r in template["Resources"].values())
    assert policy_problems(template) == []


# --- credentials never leak -----------------------------------------------------------------------------------

ACCESS = "AKIAFAULTSUITE7Q3ZXW"
SECRET = "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"
WRONG_SECRET = "wRoNg/SeCrEt+Jd84Hs72Ke01Lq9Pw3Mz6Xv5Bn"


@pytest.fixture(scope="module")
def secret_s3(tiny_dataset):
    """A private S3 server with distinctive credentials holding the tiny dataset (one partition corrupted, so
    one rank fails and writes its error record); the session server's environment is restored afterwards."""
    from s3server import S3Server

    from cosmicai import storage

    server = S3Server(bucket="cai-secret", set_env=False)
    if server.kind != "rclone":
        pytest.skip("needs the rclone S3 server (the outputs are scanned in its data folder)")
    server.access_key, server.secret_key = ACCESS, SECRET
    server.start()
    try:
        with pytest.MonkeyPatch.context() as mp:
            for key, value in server.env().items():
                mp.setenv(key, value)
            for name in sorted(os.listdir(tiny_dataset)):
                blob = Path(tiny_dataset, name).read_bytes()
                if name == "part-000003.safetensors":
                    blob = blob[:-1] + bytes([blob[-1] ^ 0xFF])
                storage.write_bytes(storage.join(server.url("data"), name), blob)
            yield server
    finally:
        server.close()


def _cai_run(server, result_url: str, secret: str) -> subprocess.CompletedProcess:
    env = {**os.environ, "AWS_SECRET_ACCESS_KEY": secret}
    cmd = [sys.executable, "-m", "cosmicai.cli", "run", "--data", server.url("data"), "--result", result_url,
           "--model", "astromae-random", "--workers", "1", "--threads", "1", "--batch-size", "12",
           "--allow-failures", "--endpoint", server.endpoint]
    return subprocess.run(cmd, capture_output=True, text=True, timeout=180, env=env)


@pytest.fixture(scope="module")
def denied_run(secret_s3):
    """``cai run`` with a wrong secret key: every request is refused by the server."""
    return _cai_run(secret_s3, secret_s3.url("results/denied"), WRONG_SECRET)


def _scan_tree(folder: Path, needles: tuple[str, ...]) -> list[str]:
    hits = []
    for path in folder.rglob("*"):
        if path.is_file():
            data = path.read_bytes()
            hits += [f"{path}: {n[:6]}..." for n in needles if n.encode() in data]
    return hits


def test_credentials_never_in_outputs_logs_or_console(secret_s3, denied_run, tmp_path):
    ok = _cai_run(secret_s3, secret_s3.url("results/run"), SECRET)
    assert ok.returncode == 0, ok.stderr
    assert "FAILED rank 2" in ok.stdout                         # the failure path ran too
    written = Path(secret_s3.data_dir) / "cai-secret" / "results" / "run"
    summary = json.loads((written / "summary.json").read_text())
    assert summary["completeness"]["rows_out"] == 36 and summary["completeness"]["failed_ranks"] == [2]
    names = {p.relative_to(written).as_posix() for p in written.rglob("*") if p.is_file()}
    assert {"plan.json", "tasks.json", "run.json", "summary.json", "combined_data.json", "predictions.parquet",
            "errors/2.json", "ranks/0.json", "predictions/0.parquet"} <= names
    assert "Traceback" in (written / "errors" / "2.json").read_text()

    leaks = [f"run stdout/stderr contains {n[:6]}..." for n in (ACCESS, SECRET) if n in ok.stdout + ok.stderr]
    leaks += [f"denied run output contains {n[:6]}..." for n in (SECRET, WRONG_SECRET)
              if n in denied_run.stdout + denied_run.stderr]
    leaks += _scan_tree(written, (ACCESS, SECRET, WRONG_SECRET))
    leaks += _scan_tree(Path(secret_s3.data_dir), (SECRET, WRONG_SECRET))
    assert denied_run.returncode != 0 and denied_run.stderr
    assert leaks == []
    ledger("credentials", outputs_scanned=len(names), leaks=len(leaks))


def test_refused_credentials_are_a_clear_error(denied_run, secret_s3):
    """403 from S3 while planning: exit 2 and one line naming the URL, not a traceback."""
    assert denied_run.returncode == 2, denied_run.stderr[-2000:]
    assert "cai: error:" in denied_run.stderr and secret_s3.url("data") in denied_run.stderr
    assert "Traceback" not in denied_run.stderr
