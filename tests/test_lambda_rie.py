"""The Lambda container image, built with buildah from the project's Dockerfile and run through the Lambda Runtime
Interface Emulator (aws-lambda-rie), offline, against a real S3 server on 127.0.0.1.

The base image is a STAND-IN (tests/lambda_standin.py): ``public.ecr.aws/lambda/python:3.12`` cannot be pulled
here, so an image of that name is built from Debian 12 (debootstrap) with Debian's Python 3.11, pip and
``awslambdaric``, with AWS's conventions (/var/task, /var/runtime, /lambda-entrypoint.sh). It differs from AWS's:
Debian instead of Amazon Linux 2023, Python 3.11 instead of 3.12 (the cp311 wheels of worker-requirements.txt are
installed, with their hashes checked). The Dockerfile itself is built unchanged.

Each handler runs in its own emulator, chrooted into the image's root filesystem mounted read-only (tmpfs /tmp,
as Lambda), with the image's ENV and ENTRYPOINT: initialize, every item of tasks.json, two items the plan did not
write (refused with errorType/errorMessage, nothing written), summarize. Rows in == rows out and the predictions
equal the full install's. Sizes, the emulator's Init Duration and the first invoke are printed (``pytest -s``).

Without root, buildah or debootstrap these tests skip with the reason; tests/test_lambda_image.py runs the same
handlers through the emulator in a venv built from the Dockerfile's steps.
"""

from __future__ import annotations

import json
import os
import time
from pathlib import Path
from types import SimpleNamespace

import pytest

import lambda_standin as ls
from cosmicai.backends.aws import deploy

pytestmark = [pytest.mark.slow, pytest.mark.s3]


@pytest.fixture(scope="module")
def rie_binary() -> Path:
    try:
        return ls.fetch_rie()
    except (RuntimeError, OSError, KeyError, StopIteration) as exc:
        pytest.skip(f"could not get aws-lambda-rie from {ls.SAM_CLI}: {str(exc).splitlines()[0]}")


@pytest.fixture(scope="module")
def built_image(rie_binary, tmp_path_factory):
    """The project's image, built with buildah over the stand-in base, mounted (a container of it)."""
    reason = ls.image_unavailable()
    if reason:
        pytest.skip(reason)
    bh = ls.Buildah()
    t0 = time.perf_counter()
    cached = bh.inspect(ls.BASE_NAME)
    base = ls.ensure_base(bh, rie_binary)
    base_s = time.perf_counter() - t0
    context = deploy.build_context(str(tmp_path_factory.mktemp("lambda-build") / "context"))
    t0 = time.perf_counter()
    info = ls.build(bh, context, deploy.context_path(context, "dockerfile"),
                    Path(deploy.context_path(context, "requirements")), ls.base_python(base))
    build_s = time.perf_counter() - t0
    ctr = f"cai-lambda-rie-{os.getpid()}"
    bh.remove_container(ctr)
    try:
        bh("from", "--name", ctr, "--pull-never", ls.IMAGE_NAME)
        rootfs = Path(bh("mount", ctr).strip())
        sizes = {row["names"][0] if row.get("names") else row["id"]: row["size"]
                 for row in json.loads(bh("images", "--json"))}
        got = SimpleNamespace(bh=bh, info=info, base=base, rootfs=rootfs, config=info["OCIv1"]["config"],
                              image_mb=_mb(sizes[ls.IMAGE_NAME]), base_mb=_mb(sizes[f"{ls.BASE_NAME}"]),
                              rootfs_mib=ls.du_mib(rootfs), task_mib=ls.du_mib(rootfs / "var" / "task"),
                              base_s=base_s, base_cached=bool(cached) and cached["FromImageID"] == base["FromImageID"],
                              build_s=build_s)
        print(f"\nstand-in base {'reused' if got.base_cached else 'built'} in {base_s:.1f} s; "
              f"buildah bud {build_s:.1f} s; image {got.image_mb:.0f} MB (base {got.base_mb:.0f} MB, added "
              f"{got.image_mb - got.base_mb:.0f} MB); du rootfs {got.rootfs_mib:.0f} MiB, /var/task "
              f"{got.task_mib:.0f} MiB")
        yield got
    finally:
        bh.remove_container(ctr)
        bh("rmi", ls.IMAGE_NAME, what="buildah rmi (the test image; the stand-in base stays cached)")


def _mb(size: str) -> float:
    """``buildah images --json`` size ("1.23 GB", "158 MB") in MB."""
    value, unit = size.split()
    return float(value) * {"kB": 1e-3, "MB": 1.0, "GB": 1e3}[unit]


def test_image_builds_from_the_dockerfile_on_the_standin_base(built_image):
    config = built_image.config
    env = dict(item.split("=", 1) for item in config["Env"])
    # The base's conventions and the Dockerfile's own settings, as the image records them.
    assert config["Entrypoint"] == ["/lambda-entrypoint.sh"] and config["WorkingDir"] == "/var/task"
    assert config["Cmd"] == ["cosmicai.backends.aws.handlers.infer"]
    assert env["LAMBDA_TASK_ROOT"] == "/var/task" and env["LAMBDA_RUNTIME_DIR"] == "/var/runtime"
    assert (env["HOME"], env["CAI_MODEL"], env["CAI_MODE"]) == ("/tmp", "astromae-demo", "exact")
    assert ls.base_python(built_image.base) == "3.11"  # Debian 12's Python: the stand-in's, not AWS's 3.12
    root = built_image.rootfs
    task = root / "var" / "task"
    assert (task / "cosmicai" / "backends" / "aws" / "handlers.py").is_file()
    assert list((task / "cosmicai" / "__pycache__").glob("__init__.cpython-311.pyc"))  # compiled at build time
    assert (task / "onnxruntime").is_dir() and (task / "pyarrow").is_dir() and (task / "numpy").is_dir()
    assert not (task / "worker-requirements.txt").exists() and not (task / "bin").exists()
    assert not [p for p in ("torch", "galsim", "astropy", "dask", "matplotlib", "onnx") if (task / p).exists()]
    assert not list((task / "pyarrow").glob("libarrow_flight.so*"))  # the Dockerfile's removals happened
    assert (root / "var" / "runtime" / "awslambdaric").is_dir() and os.access(root / "lambda-entrypoint.sh", os.X_OK)
    # The build's wheelhouse and pip config were mounted, not committed: only their empty mount points remain.
    assert not (root / "etc" / "pip.conf").exists()
    assert not list((root / "tmp").rglob("pip.conf")) and not list((root / "tmp").rglob("*.whl"))
    assert 50 < built_image.task_mib < 800 and built_image.image_mb > built_image.base_mb


def test_image_handlers_run_through_the_runtime_interface_emulator(built_image, s3_server, tiny_dataset, tmp_path):
    image_env = dict(item.split("=", 1) for item in built_image.config["Env"])
    prefix = f"t-rie-{os.getpid()}-{int(time.time())}"
    env = dict(image_env, **ls.function_env(s3_server, prefix))

    def start(function: str) -> ls.Rie:
        return ls.Rie(f"{ls.HANDLERS}.{function}", env, "/usr/local/bin/aws-lambda-rie", tmp_path / f"{function}.log",
                      rootfs=built_image.rootfs, entrypoint=built_image.config["Entrypoint"],
                      workdir=built_image.config["WorkingDir"])

    got = ls.run_through_rie(start, s3_server, tiny_dataset, prefix)
    ls.assert_pipeline(got, tiny_dataset, tmp_path, image_env)
