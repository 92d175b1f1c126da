"""The commands that build, push and deploy the AWS stack (run by ``cai aws deploy`` or printed for the user).

The image is built from the INSTALLED cosmicai package, not from the current folder: :func:`build_context`
copies the package as Python imports it (an editable checkout or a wheel in site-packages, wherever it lies)
into a fresh folder, ``CONTEXT/cosmicai/``; the Dockerfile, ``worker-requirements.txt`` and ``template.yaml``
come with it (package data), and every command names them by absolute path inside CONTEXT.
"""

from __future__ import annotations

import fnmatch
import os
import shlex
import shutil
import subprocess
import tempfile
from dataclasses import dataclass, field
from importlib import resources
from pathlib import Path
from typing import TYPE_CHECKING

from ...errors import ConfigError
from ...lambda_limits import (LAMBDA_TIMEOUT_S, MAP_MAX_CHILDREN, MAX_EPHEMERAL_MB, MAX_MEMORY_MB, MIN_EPHEMERAL_MB,
                     MIN_MEMORY_MB, MIN_TIMEOUT_S)

if TYPE_CHECKING:
    from importlib.resources.abc import Traversable

HERE = os.path.dirname(os.path.abspath(__file__))
#: The installed package's own copies (absolute paths; a build context holds copies of them).
TEMPLATE = os.path.join(HERE, "template.yaml")
DOCKERFILE = os.path.join(HERE, "Dockerfile")
REQUIREMENTS = os.path.join(HERE, "worker-requirements.txt")
PLATFORMS = {"x86_64": "linux/amd64", "arm64": "linux/arm64"}
TOOLS = ("aws", "docker", "sam")
PACKAGE = "cosmicai"
#: Where the deploy files lie inside a build context (the package's own layout under CONTEXT/cosmicai/).
CONTEXT_FILES = {"dockerfile": ("backends", "aws", "Dockerfile"), "template": ("backends", "aws", "template.yaml"),
                 "requirements": ("backends", "aws", "worker-requirements.txt")}
#: Names left out of the copied package: byte code (the image compiles its own) and build metadata.
CONTEXT_IGNORE = ("__pycache__", "*.pyc", "*.pyo", "*.egg-info")


def package_files() -> Traversable:
    """The installed cosmicai package (where ``import cosmicai`` finds it; an editable install's source tree)."""
    return resources.files(PACKAGE)


def context_path(context: str, what: str) -> str:
    """Absolute path of the Dockerfile / template / requirements file (``what``) inside a build context."""
    return os.path.join(os.path.abspath(context), PACKAGE, *CONTEXT_FILES[what])


def build_context(dest: str | None = None) -> str:
    """Assemble a Docker build context from the installed package; returns its absolute path.

    ``DEST/cosmicai/`` becomes a copy of the package tree without ``__pycache__``, ``*.pyc`` and ``*.egg-info``.
    ``dest`` may exist but must not already hold ``cosmicai/``; by default it is a new temporary folder, which
    the caller removes. Works from any current directory, for an editable install and a non-editable one.
    """
    dest = os.path.abspath(dest) if dest else tempfile.mkdtemp(prefix="cai-lambda-context-")
    target = os.path.join(dest, PACKAGE)
    if os.path.lexists(target):
        raise ConfigError(f"build context {dest}: {target} already exists (give an empty or new folder)")
    os.makedirs(dest, exist_ok=True)
    source = package_files()
    _copy_tree(source, target)
    missing = [os.path.join(*parts) for what, parts in CONTEXT_FILES.items()
               if not os.path.isfile(context_path(dest, what))]
    if missing:
        shutil.rmtree(target, ignore_errors=True)
        raise ConfigError(f"the installed cosmicai package ({source}) lacks {', '.join(missing)}: it was installed "
                          "without its package data")
    return dest


def _copy_tree(src: Traversable, dst: str) -> None:
    os.makedirs(dst, exist_ok=True)
    for entry in src.iterdir():
        if any(fnmatch.fnmatch(entry.name, pattern) for pattern in CONTEXT_IGNORE):
            continue
        target = os.path.join(dst, entry.name)
        if entry.is_dir():
            _copy_tree(entry, target)
        elif isinstance(entry, Path):
            shutil.copy2(entry, target)
        elif entry.is_file():  # a package imported from a zip or another loader
            with open(target, "wb") as fh:
                fh.write(entry.read_bytes())


@dataclass
class DeploySettings:
    """Everything ``cai aws deploy`` needs; the names mirror template.yaml's parameters."""

    stack: str
    region: str
    data_bucket: str
    data_prefix: str
    result_bucket: str
    result_prefix: str = "cai-results"
    arch: str = "x86_64"
    memory_mb: int = 3008
    control_memory_mb: int = 1024
    timeout_s: int = LAMBDA_TIMEOUT_S
    ephemeral_mb: int = MIN_EPHEMERAL_MB
    reserved_concurrency: int = 0
    max_concurrency: int = 100
    tolerated_failure_percentage: float = 0.0
    allow_failures: bool = False
    model: str = "astromae-demo"
    log_retention_days: int = 14
    repository: str = "cosmicai-lambda"
    tag: str = "latest"
    account: str | None = None
    #: Where runs may name weights besides the data location ('' = nowhere else), and models besides the
    #: built-in ones and ``model`` (comma separated): the stack's trust settings, fixed at deploy time.
    weights_bucket: str = ""
    weights_prefix: str = ""
    allowed_models: str = ""
    extra: dict[str, str] = field(default_factory=dict)

    def validate(self) -> "DeploySettings":
        if self.arch not in PLATFORMS:
            raise ConfigError(f"--arch must be one of {sorted(PLATFORMS)}, got {self.arch!r}")
        for name, value, lo, hi in (("--memory", self.memory_mb, MIN_MEMORY_MB, MAX_MEMORY_MB),
                                    ("--timeout", self.timeout_s, MIN_TIMEOUT_S, LAMBDA_TIMEOUT_S),
                                    ("--ephemeral", self.ephemeral_mb, MIN_EPHEMERAL_MB, MAX_EPHEMERAL_MB),
                                    ("--max-concurrency", self.max_concurrency, 0, MAP_MAX_CHILDREN)):
            if not lo <= value <= hi:
                raise ConfigError(f"{name} must be within {lo}-{hi}, got {value}")
        if not 0 <= self.tolerated_failure_percentage <= 100:
            raise ConfigError(f"--tolerated-failure-percentage must be within 0-100, got {self.tolerated_failure_percentage}")
        for name, value in (("--data-prefix", self.data_prefix), ("--result-prefix", self.result_prefix)):
            if not value.strip("/") or value != value.strip("/"):
                raise ConfigError(f"{name} must be a non-empty key prefix without leading/trailing '/', got {value!r}")
        if self.weights_prefix != self.weights_prefix.strip("/") or (self.weights_prefix and not self.weights_bucket):
            raise ConfigError(f"--weights-prefix {self.weights_prefix!r}: needs --weights-bucket and no leading or "
                              "trailing '/'")
        models = [m for m in self.allowed_models.replace(" ", ",").split(",") if m]
        self.allowed_models = ",".join(models)
        return self

    @property
    def registry(self) -> str:
        account = self.account or "${ACCOUNT}"
        return f"{account}.dkr.ecr.{self.region}.amazonaws.com"

    @property
    def image_uri(self) -> str:
        return f"{self.registry}/{self.repository}:{self.tag}-{self.arch}"

    def parameter_overrides(self) -> list[str]:
        params = {"ImageUri": self.image_uri, "Architecture": self.arch, "MemorySize": self.memory_mb,
                  "ControlMemorySize": self.control_memory_mb, "Timeout": self.timeout_s,
                  "EphemeralStorage": self.ephemeral_mb, "InferReservedConcurrency": self.reserved_concurrency,
                  "MaxConcurrency": self.max_concurrency,
                  "ToleratedFailurePercentage": f"{self.tolerated_failure_percentage:g}",
                  "AllowFailures": str(self.allow_failures).lower(), "DataBucket": self.data_bucket,
                  "DataPrefix": self.data_prefix, "ResultBucket": self.result_bucket,
                  "ResultPrefix": self.result_prefix, "ModelName": self.model,
                  "LogRetentionDays": self.log_retention_days, **self.extra}
        trust = {"WeightsBucket": self.weights_bucket, "WeightsPrefix": self.weights_prefix,
                 "AllowedModels": self.allowed_models}
        params.update({k: v for k, v in trust.items() if v})  # empty: the template's default (none)
        return [f"{k}={v}" for k, v in params.items()]


def commands(s: DeploySettings, context: str) -> list[list[str]]:
    """The deploy as argv lists: ECR repository, login, buildx build (of ``context``, a :func:`build_context`
    folder), push, sam deploy. Every path is absolute, so they run from any folder."""
    s.validate()
    context = os.path.abspath(context)
    return [
        ["aws", "ecr", "create-repository", "--repository-name", s.repository, "--region", s.region,
         "--image-scanning-configuration", "scanOnPush=true"],
        ["sh", "-c", f"aws ecr get-login-password --region {s.region} | docker login --username AWS "
                     f"--password-stdin {s.registry}"],
        ["docker", "buildx", "build", "--platform", PLATFORMS[s.arch], "--provenance=false", "-t", s.image_uri,
         "-f", context_path(context, "dockerfile"), "--load", context],
        ["docker", "push", s.image_uri],
        ["sam", "deploy", "--template-file", context_path(context, "template"), "--stack-name", s.stack,
         "--region", s.region, "--resolve-s3", "--capabilities", "CAPABILITY_IAM", "CAPABILITY_AUTO_EXPAND",
         "--no-fail-on-empty-changeset", "--parameter-overrides", *s.parameter_overrides()],
    ]


def script(s: DeploySettings, context: str) -> str:
    """The deploy as a shell script the user can run (the account id looked up with ``aws sts``)."""
    lines = [f"# build context (the installed cosmicai package): {os.path.abspath(context)}",
             "set -euo pipefail", "ACCOUNT=$(aws sts get-caller-identity --query Account --output text)"
             if not s.account else f"ACCOUNT={s.account}"]
    for argv in commands(s, context):
        text = argv[2] if argv[:2] == ["sh", "-c"] else " ".join(_quote(a) for a in argv)
        if argv[:3] == ["aws", "ecr", "create-repository"]:
            text += " || true   # already exists is fine"
        lines.append(text)
    return "\n".join(lines)


def _quote(arg: str) -> str:
    # Keep ${ACCOUNT} expandable: double-quote arguments that use it.
    if "${ACCOUNT}" in arg:
        return '"' + arg.replace('"', '\\"') + '"'
    return shlex.quote(arg)


def missing_tools() -> list[str]:
    """The deploy tools (aws, docker, sam) not on PATH."""
    return [t for t in TOOLS if shutil.which(t) is None]


def execute(s: DeploySettings, context: str) -> None:
    """Run the deploy (needs aws, docker with buildx, sam and AWS credentials) from a :func:`build_context`."""
    if not s.account:
        s.account = subprocess.run(["aws", "sts", "get-caller-identity", "--query", "Account", "--output", "text"],
                                   check=True, capture_output=True, text=True).stdout.strip()
    for i, argv in enumerate(commands(s, context)):
        print("+ " + " ".join(shlex.quote(a) for a in argv), flush=True)
        rc = subprocess.run(argv, cwd=context).returncode
        if rc != 0 and i != 0:  # create-repository fails harmlessly when the repository exists
            raise ConfigError(f"deploy step failed (exit {rc}): {' '.join(argv[:3])} ...")
