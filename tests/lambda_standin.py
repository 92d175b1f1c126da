"""The Lambda image, built and run offline: a STAND-IN for AWS's base image, buildah, and the Lambda Runtime
Interface Emulator (RIE).

The stand-in base. ``public.ecr.aws/lambda/python:3.12`` cannot be pulled without a registry, so
:func:`ensure_base` builds an image under that name from a minimal Debian root filesystem (``debootstrap``, Debian's
``python3`` and ``pip``) plus ``awslambdaric`` from PyPI, with the real base image's conventions:
``LAMBDA_TASK_ROOT=/var/task`` (the WORKDIR), ``LAMBDA_RUNTIME_DIR=/var/runtime`` (awslambdaric lives there),
``/lambda-entrypoint.sh`` as ENTRYPOINT (it runs ``python -m awslambdaric <handler>`` through
``/var/runtime/bootstrap``, under ``/usr/local/bin/aws-lambda-rie`` when ``AWS_LAMBDA_RUNTIME_API`` is unset, as
AWS's does), and ``pip``/``python`` on PATH. How it differs from AWS's: Debian 12 (glibc 2.36) instead of Amazon
Linux 2023 (glibc 2.34), and Debian's Python (3.11) instead of 3.12, so the build installs the cp311 wheels of
worker-requirements.txt (hashed for every Python it supports); no boto3 bundled in /var/runtime.

The build. buildah (``--storage-driver vfs``, ``--isolation chroot``, no daemon, as root) with its storage under
:data:`CACHE` (``CAI_LAMBDA_CACHE``, default /var/tmp/cosmicai-lambda). The Dockerfile's ``pip install`` reads the
wheels from a local wheelhouse (``pip download`` of worker-requirements.txt, cached under CACHE): a ``pip.conf``
with ``no-index``/``find-links`` is bind-mounted as pip's user config (``$HOME/.config/pip``, HOME=/tmp per the
Dockerfile) for the build's RUN steps only (not committed: the mount points are empty folders under /tmp),
and ``--require-hashes`` still checks every wheel; the build itself needs no network.

Caches, each keyed by what makes it: the stand-in base (a label holds its recipe's digest), the RIE (extracted from
the pinned aws-sam-cli wheel, which ships it under ``samcli/local/rapid/``), the wheelhouses. A brand-new machine
builds them all; nothing fetched is kept in the repository.

Running. :class:`Rie` starts ``aws-lambda-rie`` bound to 127.0.0.1 (both its invoke address and its Runtime API)
with one handler, either chrooted into the image's mounted root filesystem (read-only, a fresh tmpfs on /tmp, as
Lambda gives) with the image's own ENV, WORKDIR and ENTRYPOINT, or on this machine with a venv's Python.
"""

from __future__ import annotations

import hashlib
import http.client
import json
import os
import platform
import re
import shutil
import subprocess
import sys
import tempfile
import time
import zipfile
from pathlib import Path
from typing import Any

from s3server import free_port, wait_for_port

BASE_NAME = "public.ecr.aws/lambda/python:3.12"
#: The test image (one tag per test process; removed after the test).
IMAGE_NAME = f"localhost/cosmicai-lambda:test-{os.getpid()}"
CACHE = Path(os.environ.get("CAI_LAMBDA_CACHE", "/var/tmp/cosmicai-lambda"))
SUITE = "bookworm"
MIRROR = os.environ.get("CAI_DEBIAN_MIRROR", "http://deb.debian.org/debian")
PACKAGES = ("python3", "python3-pip", "python-is-python3")
#: awslambdaric and its two dependencies, pinned (binary wheels only).
RUNTIME_PINS = ("awslambdaric==4.2.2", "simplejson==3.20.2", "snapshot-restore-py==1.0.0")
SAM_CLI = "aws-sam-cli==1.170.0"
#: Debian 12's glibc is 2.36: its pip takes manylinux_2_36 down to manylinux_2_17 (= manylinux2014) wheels.
GLIBC_MINOR = 36
RIE_ARCH = {"x86_64": "x86_64", "aarch64": "arm64"}
RECIPE_LABEL = "org.cosmicai.standin-recipe"
PY_LABEL = "org.cosmicai.standin-python"
INVOKE_PATH = "/2015-03-31/functions/function/invocations"

#: The real base image's /lambda-entrypoint.sh, with the same two branches.
ENTRYPOINT = """#!/bin/sh
# Stand-in for the AWS Lambda base image's entrypoint (same behaviour): the handler is the one argument.
if [ $# -ne 1 ]; then
  echo "entrypoint requires the handler name to be the first argument" 1>&2
  exit 142
fi
export _HANDLER="$1"
RUNTIME_ENTRYPOINT=/var/runtime/bootstrap
if [ -z "${AWS_LAMBDA_RUNTIME_API}" ]; then
  exec /usr/local/bin/aws-lambda-rie $RUNTIME_ENTRYPOINT
else
  exec $RUNTIME_ENTRYPOINT
fi
"""
BOOTSTRAP = """#!/bin/sh
# Stand-in runtime bootstrap: awslambdaric from /var/runtime, the task root first on sys.path (python -m).
cd "${LAMBDA_TASK_ROOT}" || exit 1
PYTHONPATH="${LAMBDA_RUNTIME_DIR}" exec /usr/bin/python3 -m awslambdaric "${_HANDLER}"
"""
BASE_ENV = {"LANG": "C.UTF-8", "TZ": ":/etc/localtime",
            "PATH": "/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin",
            "LAMBDA_TASK_ROOT": "/var/task", "LAMBDA_RUNTIME_DIR": "/var/runtime"}


def machine() -> str:
    return platform.machine()


def recipe_digest() -> str:
    """Digest of everything that makes the stand-in base (its cache key)."""
    recipe = {"suite": SUITE, "mirror": MIRROR, "packages": PACKAGES, "pins": RUNTIME_PINS, "sam": SAM_CLI,
              "entrypoint": ENTRYPOINT, "bootstrap": BOOTSTRAP, "env": BASE_ENV, "arch": machine(), "v": 1}
    return hashlib.sha256(json.dumps(recipe, sort_keys=True).encode()).hexdigest()[:16]


def image_unavailable() -> str | None:
    """Why the buildah image cannot be built here (one line), or None."""
    if os.geteuid() != 0:
        return "building the image with buildah needs root (vfs storage, chroot isolation)"
    if machine() not in RIE_ARCH:
        return f"no Lambda architecture for machine {machine()}"
    for tool in ("buildah", "debootstrap"):
        if shutil.which(tool) is None:
            return f"{tool} is not installed (apt-get install buildah debootstrap)"
    return None


def _run(cmd: list[str], timeout: float, what: str, **kw: Any) -> str:
    try:
        out = subprocess.run(cmd, capture_output=True, text=True, timeout=timeout, **kw)
    except subprocess.TimeoutExpired as exc:
        raise RuntimeError(f"{what}: no result within {timeout:.0f} s ({' '.join(cmd[:4])} ...)") from exc
    if out.returncode != 0:
        raise RuntimeError(f"{what} failed (exit {out.returncode}): {' '.join(cmd[:6])} ...\n"
                           f"{(out.stdout + out.stderr)[-4000:]}")
    return out.stdout


# --- downloads (cached) ------------------------------------------------------------------------------------
def fetch_rie(cache: Path = CACHE) -> Path:
    """``aws-lambda-rie`` for this machine, from the pinned aws-sam-cli wheel (only that file is extracted)."""
    arch = RIE_ARCH[machine()]
    version = SAM_CLI.split("==")[1]
    target = cache / "rie" / version / f"aws-lambda-rie-{arch}"
    if target.is_file():
        return target
    with tempfile.TemporaryDirectory(dir=cache.parent if cache.parent.is_dir() else None) as tmp:
        _run([sys.executable, "-m", "pip", "download", "--no-deps", "--only-binary=:all:", "-q", "-d", tmp,
              SAM_CLI], 300, f"pip download {SAM_CLI}")
        wheel = next(Path(tmp).glob("aws_sam_cli-*.whl"))
        target.parent.mkdir(parents=True, exist_ok=True)
        with zipfile.ZipFile(wheel) as zf:
            data = zf.read(f"samcli/local/rapid/aws-lambda-rie-{arch}")
        partial = target.with_suffix(".part")
        partial.write_bytes(data)
        partial.chmod(0o755)
        partial.rename(target)
    return target


def wheelhouse(requirements: list[str] | Path, python: str, cache: Path = CACHE) -> Path:
    """Binary wheels for ``python`` (``3.11``) on this Linux, downloaded once into a folder keyed by the
    requirements; a requirements FILE is downloaded with ``--require-hashes``."""
    text = requirements.read_text() if isinstance(requirements, Path) else "\n".join(requirements)
    key = hashlib.sha256(f"{python} {machine()}\n{text}".encode()).hexdigest()[:16]
    folder = cache / "wheels" / key
    if (folder / ".complete").is_file():
        return folder
    folder.mkdir(parents=True, exist_ok=True)
    cmd = [sys.executable, "-m", "pip", "download", "--no-deps", "--only-binary=:all:", "-q", "-d", str(folder),
           "--python-version", python, "--implementation", "cp", "--abi", f"cp{python.replace('.', '')}",
           *[a for minor in range(GLIBC_MINOR, 16, -1) for a in ("--platform", f"manylinux_2_{minor}_{machine()}")]]
    if isinstance(requirements, Path):
        cmd += ["--require-hashes", "-r", str(requirements)]
    else:
        cmd += list(requirements)
    _run(cmd, 600, "pip download (wheelhouse)")
    (folder / ".complete").write_text("")
    return folder


# --- buildah -------------------------------------------------------------------------------------------------
class Buildah:
    """buildah with vfs storage under ``root`` (reproducible, no daemon) and chroot isolation."""

    def __init__(self, root: Path = CACHE / "storage") -> None:
        self.root = root
        self.base = ["buildah", "--root", str(root / "root"), "--runroot", str(root / "run"),
                     "--storage-driver", "vfs"]

    def __call__(self, *args: str, timeout: float = 600, what: str = "buildah") -> str:
        return _run(self.base + list(args), timeout, what, env=dict(os.environ, BUILDAH_ISOLATION="chroot"))

    def inspect(self, name: str, kind: str = "image") -> dict[str, Any] | None:
        out = subprocess.run(self.base + ["inspect", "--type", kind, name], capture_output=True, text=True,
                             timeout=120)
        return json.loads(out.stdout) if out.returncode == 0 else None

    def remove_container(self, name: str) -> None:
        subprocess.run(self.base + ["rm", name], capture_output=True, timeout=300)


def ensure_base(bh: Buildah, rie: Path) -> dict[str, Any]:
    """The stand-in base image, tagged :data:`BASE_NAME`; rebuilt only when its recipe changed."""
    digest = recipe_digest()
    found = bh.inspect(BASE_NAME)
    if found and labels(found).get(RECIPE_LABEL) == digest:
        return found
    ctr = f"cai-standin-{os.getpid()}"
    bh.remove_container(ctr)
    bh("from", "--name", ctr, "scratch", what="buildah from scratch")
    try:
        root = Path(bh("mount", ctr).strip())
        _run(["debootstrap", "--variant=minbase", f"--include={','.join(PACKAGES)}", SUITE, str(root), MIRROR],
             900, "debootstrap (Debian packages)")
        python = _run(["chroot", str(root), "python3", "-c", "import sys; print('%d.%d' % sys.version_info[:2])"],
                      60, "the stand-in's python3").strip()
        wheels = wheelhouse(list(RUNTIME_PINS), python)
        shutil.copytree(wheels, root / "tmp" / "wheels")
        _run(["chroot", str(root), "python3", "-m", "pip", "install", "-q", "--no-index", "--find-links",
              "/tmp/wheels", "--no-deps", "--only-binary=:all:", "--target", "/var/runtime", *RUNTIME_PINS],
             300, "pip install awslambdaric into /var/runtime")
        shutil.copy2(rie, root / "usr" / "local" / "bin" / "aws-lambda-rie")
        for path, text in ((root / "lambda-entrypoint.sh", ENTRYPOINT), (root / "var/runtime/bootstrap", BOOTSTRAP)):
            path.write_text(text)
            path.chmod(0o755)
        (root / "var" / "task").mkdir(exist_ok=True)
        for junk in ("tmp/wheels", "var/cache/apt/archives", "var/lib/apt/lists", "usr/share/doc", "usr/share/man",
                     "usr/share/info", "usr/share/locale"):
            shutil.rmtree(root / junk, ignore_errors=True)
        (root / "var/cache/apt/archives/partial").mkdir(parents=True)
        (root / "var/lib/apt/lists/partial").mkdir(parents=True)
        bh("unmount", ctr)
        config = ["--workingdir", "/var/task", "--entrypoint", '["/lambda-entrypoint.sh"]', "--cmd", "",
                  "--label", f"{RECIPE_LABEL}={digest}", "--label", f"{PY_LABEL}={python}"]
        for key, value in BASE_ENV.items():
            config += ["--env", f"{key}={value}"]
        bh("config", *config, ctr)
        bh("commit", "--format", "docker", "--rm", ctr, BASE_NAME, what="buildah commit (stand-in base)")
    finally:
        bh.remove_container(ctr)
    got = bh.inspect(BASE_NAME)
    assert got is not None
    if found and found["FromImageID"] != got["FromImageID"]:  # the stale stand-in, now untagged
        subprocess.run(bh.base + ["rmi", found["FromImageID"]], capture_output=True, timeout=300)
    return got


def labels(info: dict[str, Any]) -> dict[str, str]:
    return info.get("OCIv1", {}).get("config", {}).get("Labels") or {}


def base_python(info: dict[str, Any]) -> str:
    """The stand-in's Python version (``3.11``), as its label records it."""
    return labels(info)[PY_LABEL]


#: Where the build's RUN steps see the wheelhouse and pip's user config (HOME=/tmp, the Dockerfile's ENV). Under
#: /tmp: the mount points stay as empty folders, which Lambda's own fresh /tmp hides at run time.
BUILD_WHEELS = "/tmp/cai-wheels"
BUILD_PIP_CONFIG = "/tmp/.config/pip"


def build(bh: Buildah, context: str, dockerfile: str, requirements: Path, python: str) -> dict[str, Any]:
    """``buildah bud`` of the project's Dockerfile over the stand-in base, offline (wheels from a wheelhouse)."""
    wheels = wheelhouse(requirements, python)
    conf = CACHE / "wheels" / f"pip-{wheels.name}"
    conf.mkdir(exist_ok=True)
    (conf / "pip.conf").write_text(f"[global]\nno-index = true\nfind-links = {BUILD_WHEELS}\n")
    bh("bud", "--isolation", "chroot", "--pull-never", "--format", "docker", "--layers=false",
       "--volume", f"{wheels}:{BUILD_WHEELS}:ro", "--volume", f"{conf}:{BUILD_PIP_CONFIG}:ro",
       "-f", dockerfile, "-t", IMAGE_NAME, context, timeout=900, what="buildah bud (the project's Dockerfile)")
    got = bh.inspect(IMAGE_NAME)
    assert got is not None
    return got


def du_mib(path: Path) -> float:
    """``du -sm`` of a folder (allocated blocks; hard links counted once), in MiB."""
    return int(_run(["du", "-sk", str(path)], 300, "du").split()[0]) / 1024


# --- the emulator --------------------------------------------------------------------------------------------
class Rie:
    """``aws-lambda-rie`` serving ONE handler on 127.0.0.1; :meth:`invoke` POSTs an event like Lambda's Invoke.

    ``rootfs``: chroot into that (image) root, read-only, with a fresh tmpfs /tmp, and run the emulator ``rie``
    (a path inside the image) over the image's ``entrypoint`` with the handler, in ``workdir``; else run the
    emulator ``rie`` over ``command`` (e.g. a venv's ``python -m awslambdaric``) on this machine in ``cwd``.
    ``env`` is the whole environment of the function; its own private mount namespace ends with it.
    """

    def __init__(self, handler: str, env: dict[str, str], rie: str, log: Path, *, rootfs: Path | None = None,
                 entrypoint: list[str] | None = None, workdir: str = "/var/task", command: list[str] | None = None,
                 cwd: str | None = None) -> None:
        self.port, api = free_port(), free_port()
        flags = ["--runtime-interface-emulator-address", f"127.0.0.1:{self.port}",
                 "--runtime-api-address", f"127.0.0.1:{api}", "--log-level", "info"]
        env = dict(env, AWS_LAMBDA_FUNCTION_TIMEOUT="300", AWS_LAMBDA_FUNCTION_MEMORY_SIZE="3008",
                   AWS_LAMBDA_FUNCTION_NAME=handler.rsplit(".", 1)[-1])
        self.log_path = log
        self._log = open(log, "ab")
        if rootfs is not None:
            inner = ["chroot", str(rootfs), "/bin/sh", "-c", 'cd "$0" && exec "$@"', workdir,
                     rie, *flags, *(entrypoint or []), handler]
            setup = (f'set -e; R="$1"; shift; mount --bind "$R" "$R"; mount -o remount,bind,ro "$R"; '
                     f'mount -t tmpfs -o size=512m,mode=1777 tmpfs "$R/tmp"; mount -t proc proc "$R/proc"; '
                     f'mount --rbind /dev "$R/dev"; exec env -i "$@"')
            env_args = [f"{k}={v}" for k, v in env.items()]
            cmd = ["unshare", "-m", "--propagation", "private", "sh", "-c", setup, "sh", str(rootfs), *env_args,
                   *inner]
            self.proc = subprocess.Popen(cmd, stdout=self._log, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL,
                                         start_new_session=True)
        else:
            self.proc = subprocess.Popen([rie, *flags, *(command or []), handler], cwd=cwd, env=env,
                                         stdout=self._log, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL,
                                         start_new_session=True)
        try:
            wait_for_port(self.port, self.proc, 30)
        except RuntimeError:
            self.close()
            raise RuntimeError(f"aws-lambda-rie did not start: {self.log()[-2000:]}")

    def invoke(self, event: Any, timeout: float = 300) -> tuple[Any, float]:
        """POST the event; returns (the decoded response, seconds)."""
        conn = http.client.HTTPConnection("127.0.0.1", self.port, timeout=timeout)
        t0 = time.perf_counter()
        conn.request("POST", INVOKE_PATH, body=json.dumps(event), headers={"Content-Type": "application/json"})
        resp = conn.getresponse()
        body = resp.read()
        seconds = time.perf_counter() - t0
        conn.close()
        if resp.status != 200:
            raise RuntimeError(f"RIE answered HTTP {resp.status}: {body[:500]!r}")
        return json.loads(body), seconds

    def log(self) -> str:
        self._log.flush()
        return self.log_path.read_text(errors="replace")

    def reports(self) -> list[dict[str, float]]:
        """The ``REPORT`` lines of the log: Duration, Init Duration (cold start only), in ms."""
        out = []
        for line in self.log().splitlines():
            if "REPORT RequestId" in line:
                out.append({k.strip(): float(v) for k, v in re.findall(r"([A-Za-z ]+): ([\d.]+) ms", line)})
        return out

    def init_ms(self) -> list[float]:
        """Each INIT phase's duration in ms, from the emulator's own ``INIT REPORT(durationMs: ...)`` log line
        (its REPORT line's ``Init Duration`` is not the init time: the emulator starts the runtime lazily)."""
        return [float(v) for v in re.findall(r"INIT REPORT\(durationMs: ([\d.]+)\)", self.log())]

    def close(self) -> None:
        if self.proc.poll() is None:
            self.proc.terminate()
            try:
                self.proc.wait(timeout=10)
            except subprocess.TimeoutExpired:
                os.killpg(self.proc.pid, 9)
                self.proc.wait(timeout=10)
        self._log.close()

    def __enter__(self) -> "Rie":
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


def is_error(payload: Any) -> bool:
    """A Lambda function error's payload: ``{"errorType", "errorMessage", ...}``."""
    return isinstance(payload, dict) and "errorType" in payload and "errorMessage" in payload


# --- the pipeline, driven through the emulator ----------------------------------------------------------------
HANDLERS = "cosmicai.backends.aws.handlers"


def function_env(s3_server: Any, prefix: str) -> dict[str, str]:
    """What a deployed stack gives its functions: the S3 endpoint and keys, and its locations under ``prefix``."""
    env = dict(s3_server.env(), CAI_DATA_BUCKET=s3_server.bucket, CAI_DATA_PREFIX=f"{prefix}/data",
               CAI_RESULT_BUCKET=s3_server.bucket, CAI_RESULT_PREFIX=f"{prefix}/result",
               CAI_THREADS="1", OMP_NUM_THREADS="1")
    if s3_server.kind == "rclone":  # rclone ignores conditional writes: the lease would refuse it
        env["CAI_ALLOW_UNSAFE_LEASE"] = "1"
    return env


def crafted_items(item: dict[str, Any], outside_url: str) -> dict[str, dict[str, Any]]:
    """Items the plan did not write: a rank the plan does not have, and rank 0 reading a partition not in the plan."""
    foreign = json.loads(json.dumps(item))
    foreign["task"]["partitions"][0]["url"] = outside_url
    return {"rank not in the plan": dict(json.loads(json.dumps(item)), rank=7),
            "partition not in the plan": foreign}


def run_through_rie(start: Any, s3_server: Any, tiny_dataset: str, prefix: str) -> dict[str, Any]:
    """initialize -> every item of tasks.json -> the crafted items -> summarize, each handler in its own emulator
    (``start(handler_function_name) -> Rie``). Returns what the test asserts on."""
    from cosmicai import storage

    base = f"s3://{s3_server.bucket}/{prefix}"
    data, result = f"{base}/data", f"{base}/result/run1"
    for name in sorted(os.listdir(tiny_dataset)):
        storage.write_bytes(f"{data}/{name}", Path(tiny_dataset, name).read_bytes())
    storage.write_bytes(f"{data}/other/part-000009.safetensors",
                        Path(tiny_dataset, sorted(n for n in os.listdir(tiny_dataset) if n.endswith(".safetensors"))[0])
                        .read_bytes())
    out: dict[str, Any] = {"data": data, "result": result, "infer": [], "reports": {}}
    with start("initialize") as rie:
        out["state"], out["initialize_s"] = rie.invoke({"data": data, "result": result, "batch_size": 5,
                                                        "world_size": 4})
        out["reports"]["initialize"], out["init_ms"] = rie.reports(), {"initialize": rie.init_ms()}
    state = out["state"]
    if is_error(state):
        raise AssertionError(f"initialize failed through the emulator: {state}")
    tasks = storage.read_json(f"s3://{state['tasks_bucket']}/{state['tasks_key']}")
    out["tasks"] = tasks
    run_dir = Path(s3_server.data_dir, s3_server.bucket, prefix, "result", "run1")
    with start("infer") as rie:
        for item in tasks:
            payload, seconds = rie.invoke(item)
            out["infer"].append((payload, seconds))
        before = sorted(p.relative_to(run_dir).as_posix() for p in run_dir.rglob("*") if p.is_file())
        out["crafted"] = {what: rie.invoke(item)[0] for what, item in
                          crafted_items(tasks[0], f"{data}/other/part-000009.safetensors").items()}
        out["written_by_crafted"] = sorted(
            set(p.relative_to(run_dir).as_posix() for p in run_dir.rglob("*") if p.is_file()) - set(before))
        out["reports"]["infer"], out["init_ms"]["infer"] = rie.reports(), rie.init_ms()
        out["infer_log"] = rie.log()
    with start("summarize") as rie:
        out["summary"], _ = rie.invoke({"result_url": result, "allow_failures": False})
        out["reports"]["summarize"] = rie.reports()
    return out


def full_install_predictions(tiny_dataset: str, folder: Path, model: str, mode: str) -> Any:
    """The same run on this (full) install, in process; its predictions table."""
    import pyarrow.parquet as pq

    from cosmicai.backends.local import LocalBackend
    from cosmicai.config import load_config
    from cosmicai.runners.pipeline import run

    config = {"data": tiny_dataset, "result": str(folder), "batch_size": 5, "world_size": 4, "threads": 1,
              "model": model, "mode": mode}
    run(load_config(config)[0], backend=LocalBackend(1, 1, in_process=True), progress=False)
    return pq.read_table(folder / "predictions.parquet")


def assert_pipeline(got: dict, tiny_dataset: str, tmp_path: Path, image_env: dict[str, str]) -> None:
    """What the emulator tests assert on :func:`run_through_rie`'s result; prints the measurements."""
    import io

    import pyarrow.parquet as pq

    from cosmicai import storage

    state = got["state"]
    assert state["num_tasks"] == len(got["tasks"]) == 4 and state["result_url"] == got["result"]
    payloads = [p for p, _ in got["infer"]]
    assert [p.get("status") for p in payloads] == ["ok"] * 4, payloads
    assert sorted(p["rank"] for p in payloads) == [0, 1, 2, 3] and sum(p["rows"] for p in payloads) == 48
    first = payloads[0]
    assert first["container_first_invocation"] and first["init_s"] > 0
    assert not any(p["container_first_invocation"] for p in payloads[1:])  # one warm environment
    infer_reports = got["reports"]["infer"]
    # One INIT (the cold start) for six invokes: the emulator's REPORT carries Init Duration on the first only.
    assert len(infer_reports) == 4 + 2 and "Init Duration" in infer_reports[0]
    assert not any("Init Duration" in r for r in infer_reports[1:]) and len(got["init_ms"]["infer"]) == 1
    # Items the plan did not write: refused as Lambda function errors, nothing written under the run.
    for what, payload in got["crafted"].items():
        assert is_error(payload), (what, payload)
        assert payload["errorType"] == "ConfigError" and payload["errorMessage"], (what, payload)
    assert got["written_by_crafted"] == []
    summary = got["summary"]
    assert summary["complete"] and summary["failed_ranks"] == [] and summary["missing_ranks"] == [], summary
    assert summary["rows_in"] == summary["rows_out"] == 48
    mine = pq.read_table(io.BytesIO(storage.read_bytes(f"{got['result']}/predictions.parquet")))
    full = full_install_predictions(tiny_dataset, tmp_path / "local", image_env["CAI_MODEL"], image_env["CAI_MODE"])
    assert mine.num_rows == full.num_rows == 48
    for col in ("object_id", "partition", "row", "z_true"):
        assert mine.column(col).to_pylist() == full.column(col).to_pylist(), col
    dz = abs(mine.column("z_pred").to_numpy().astype("float64") - full.column("z_pred").to_numpy())
    assert dz.max() <= 1e-6, dz.max()
    print(f"\nemulator: infer INIT {got['init_ms']['infer'][0]:.0f} ms (rapid's INIT REPORT; handler init_s "
          f"{first['init_s']:.2f} s); first invoke {got['infer'][0][1]:.2f} s round trip, Duration "
          f"{infer_reports[0]['Duration']:.0f} ms; warm invokes "
          + ", ".join(f"{s:.2f}" for _, s in got["infer"][1:]) + " s; initialize "
          f"{got['initialize_s']:.2f} s (INIT {got['init_ms']['initialize'][0]:.0f} ms)")
