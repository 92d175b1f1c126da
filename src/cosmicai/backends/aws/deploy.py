"""The commands that build, push and deploy the AWS stack (run by ``cai aws deploy`` or printed for the user)."""

from __future__ import annotations

import os
import shlex
import shutil
import subprocess
from dataclasses import dataclass, field

from ...errors import ConfigError

HERE = os.path.dirname(os.path.abspath(__file__))
TEMPLATE = os.path.join(HERE, "template.yaml")
DOCKERFILE = os.path.join(HERE, "Dockerfile")
PLATFORMS = {"x86_64": "linux/amd64", "arm64": "linux/arm64"}
TOOLS = ("aws", "docker", "sam")


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
    timeout_s: int = 900
    ephemeral_mb: int = 512
    reserved_concurrency: int = 0
    max_concurrency: int = 100
    tolerated_failure_percentage: float = 0.0
    allow_failures: bool = False
    model: str = "astromae-demo"
    log_retention_days: int = 14
    repository: str = "cosmicai-lambda"
    tag: str = "latest"
    account: str | None = None
    extra: dict[str, str] = field(default_factory=dict)

    def validate(self) -> "DeploySettings":
        if self.arch not in PLATFORMS:
            raise ConfigError(f"--arch must be one of {sorted(PLATFORMS)}, got {self.arch!r}")
        for name, value, lo, hi in (("--memory", self.memory_mb, 128, 10240), ("--timeout", self.timeout_s, 1, 900),
                                    ("--ephemeral", self.ephemeral_mb, 512, 10240),
                                    ("--max-concurrency", self.max_concurrency, 0, 10000)):
            if not lo <= value <= hi:
                raise ConfigError(f"{name} must be within {lo}-{hi}, got {value}")
        if not 0 <= self.tolerated_failure_percentage <= 100:
            raise ConfigError(f"--tolerated-failure-percentage must be within 0-100, got {self.tolerated_failure_percentage}")
        for name, value in (("--data-prefix", self.data_prefix), ("--result-prefix", self.result_prefix)):
            if not value.strip("/") or value != value.strip("/"):
                raise ConfigError(f"{name} must be a non-empty key prefix without leading/trailing '/', got {value!r}")
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
        return [f"{k}={v}" for k, v in params.items()]


def commands(s: DeploySettings, repo_root: str = ".") -> list[list[str]]:
    """The deploy as argv lists: ECR repository, login, buildx build, push, sam deploy."""
    s.validate()
    return [
        ["aws", "ecr", "create-repository", "--repository-name", s.repository, "--region", s.region,
         "--image-scanning-configuration", "scanOnPush=true"],
        ["sh", "-c", f"aws ecr get-login-password --region {s.region} | docker login --username AWS "
                     f"--password-stdin {s.registry}"],
        ["docker", "buildx", "build", "--platform", PLATFORMS[s.arch], "--provenance=false", "-t", s.image_uri,
         "-f", os.path.relpath(DOCKERFILE, repo_root), "--load", repo_root],
        ["docker", "push", s.image_uri],
        ["sam", "deploy", "--template-file", os.path.relpath(TEMPLATE, repo_root), "--stack-name", s.stack,
         "--region", s.region, "--resolve-s3", "--capabilities", "CAPABILITY_IAM", "CAPABILITY_AUTO_EXPAND",
         "--no-fail-on-empty-changeset", "--parameter-overrides", *s.parameter_overrides()],
    ]


def script(s: DeploySettings, repo_root: str = ".") -> str:
    """The deploy as a shell script the user can run (the account id looked up with ``aws sts``)."""
    lines = ["set -euo pipefail", "ACCOUNT=$(aws sts get-caller-identity --query Account --output text)"
             if not s.account else f"ACCOUNT={s.account}"]
    for argv in commands(s, repo_root):
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


def execute(s: DeploySettings, repo_root: str = ".") -> None:
    """Run the deploy (needs aws, docker with buildx, sam and AWS credentials)."""
    if not s.account:
        s.account = subprocess.run(["aws", "sts", "get-caller-identity", "--query", "Account", "--output", "text"],
                                   check=True, capture_output=True, text=True).stdout.strip()
    for i, argv in enumerate(commands(s, repo_root)):
        print("+ " + " ".join(shlex.quote(a) for a in argv), flush=True)
        rc = subprocess.run(argv, cwd=repo_root).returncode
        if rc != 0 and i != 0:  # create-repository fails harmlessly when the repository exists
            raise ConfigError(f"deploy step failed (exit {rc}): {' '.join(argv[:3])} ...")
