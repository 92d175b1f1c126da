"""cosmicai.storage when the storage fails for real: a full tmpfs, a read-only mount, a folder it may not write,
an S3 endpoint that accepts connections and never answers, and one that answers slowly but steadily.

A failed write leaves nothing behind (no ``.tmp-*`` file) and is one line naming the final path; an S3 endpoint
that never answers is one line naming the URL and the endpoint, after a bounded wait.
"""

from __future__ import annotations

import errno
import os
import socket
import subprocess
import sys
import threading
import time
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path

import pytest

from cosmicai import storage
from cosmicai.errors import ConfigError, StorageError

SRC = str(Path(__file__).resolve().parents[1] / "src")


def _run(*cmd: str) -> subprocess.CompletedProcess:
    return subprocess.run(cmd, capture_output=True, text=True, timeout=30)


def _need_root() -> None:
    if os.geteuid() != 0:
        pytest.skip("needs root to mount a tmpfs / remount read-only")


def _mount(*args: str) -> None:
    out = _run("mount", *args)
    if out.returncode != 0:
        pytest.skip(f"mount {' '.join(args)} failed here: {out.stderr.strip()}")


def _umount(path: Path) -> None:
    if _run("umount", str(path)).returncode != 0:
        _run("umount", "-l", str(path))


def _one_line(message: str) -> None:
    assert "\n" not in message and "Traceback" not in message, message


def _fill(path: Path) -> None:
    """Write zeros to ``path`` until the filesystem is full (unbuffered: nothing is left to flush)."""
    with open(path, "wb", buffering=0) as fh:
        with pytest.raises(OSError) as err:
            while True:
                fh.write(b"\0" * 4096)
    assert err.value.errno == errno.ENOSPC


@pytest.fixture
def full_disk(tmp_path):
    """A real 256 KiB tmpfs, filled up by one ``filler`` file; unmounted at the end."""
    _need_root()
    mnt = tmp_path / "small"
    mnt.mkdir()
    _mount("-t", "tmpfs", "-o", "size=256k", "tmpfs", str(mnt))
    try:
        _fill(mnt / "filler")
        yield mnt
    finally:
        _umount(mnt)


@pytest.fixture
def read_only(tmp_path):
    """A folder holding ``plan.json``, bind-mounted read-only; unmounted at the end."""
    _need_root()
    src, mnt = tmp_path / "src", tmp_path / "ro"
    src.mkdir()
    mnt.mkdir()
    (src / "plan.json").write_bytes(b'{"old": 1}')
    _mount("--bind", str(src), str(mnt))
    try:
        _mount("-o", "remount,bind,ro", str(mnt))
        yield mnt
    finally:
        _umount(mnt)


def _leftovers(folder: Path) -> list[str]:
    return sorted(n for n in os.listdir(folder) if n.startswith(".tmp-"))


# --- full disk ----------------------------------------------------------------------------------------------------

def test_write_on_a_full_disk_is_one_line_and_leaves_nothing(full_disk):
    url = str(full_disk / "summary.json")
    with pytest.raises(StorageError) as err:
        storage.write_bytes(url, b"x" * 20000)
    message = str(err.value)
    assert message.startswith(f"no space left on {url}: free space"), message
    _one_line(message)
    assert sorted(os.listdir(full_disk)) == ["filler"]


def test_full_disk_keeps_the_old_file_whole(full_disk):
    url = full_disk / "plan.json"
    os.remove(full_disk / "filler")
    url.write_bytes(b'{"old": 1}')
    _fill(full_disk / "filler")  # full again, around the existing file
    with pytest.raises(StorageError, match=f"no space left on {url}"):
        storage.write_json(str(url), {"new": list(range(5000))})
    assert url.read_bytes() == b'{"old": 1}'
    assert _leftovers(full_disk) == []


def test_abort_on_a_full_disk_never_masks_the_error(full_disk):
    """Bytes still buffered when a write fails: abort's close fails again (ENOSPC) and must stay quiet, so the
    caller's own error (here a ValueError, as in summarize's parquet writer) reaches the user."""
    url = str(full_disk / "predictions.parquet")
    writer = storage.AtomicWriter(url)
    writer.fh.write(b"x" * 4000)  # fits the buffer: nothing written yet
    writer.abort()
    assert os.listdir(full_disk) == ["filler"]

    with pytest.raises(ValueError, match="the caller's own error"):
        with storage.AtomicWriter(url) as out:
            out.write(b"y" * 4000)
            raise ValueError("the caller's own error")
    assert os.listdir(full_disk) == ["filler"]

    with pytest.raises(StorageError, match=f"no space left on {url}"):  # fails at commit's flush
        with storage.AtomicWriter(url) as out:
            out.write(b"z" * 4000)
    assert os.listdir(full_disk) == ["filler"]


def test_write_straight_to_the_file_object_on_a_full_disk(full_disk):
    """A writer that bypasses ``write`` (pyarrow on ``fh``) gets ENOSPC itself; abort still cleans up."""
    url = str(full_disk / "big.bin")
    writer = storage.AtomicWriter(url)
    with pytest.raises(OSError) as err:
        writer.fh.write(b"x" * 300_000)
    assert err.value.errno == errno.ENOSPC
    writer.abort()
    writer.abort()  # twice is harmless
    assert os.listdir(full_disk) == ["filler"]


# --- read-only, permissions, failing rename/fsync ----------------------------------------------------------------

def test_read_only_mount_is_one_line_and_keeps_the_old_file(read_only):
    url = str(read_only / "plan.json")
    with pytest.raises(StorageError) as err:
        storage.write_json(url, {"new": 2})
    message = str(err.value)
    assert message.startswith(f"{url} is read-only: cannot write"), message
    _one_line(message)
    nested = str(read_only / "ranks" / "0.json")  # the folder cannot even be made: still the final path
    with pytest.raises(StorageError, match=f"^{nested} is read-only"):
        storage.write_bytes(nested, b"{}")
    with pytest.raises(StorageError, match=f"^{url} is read-only: cannot remove"):
        storage.remove(url)
    assert os.listdir(read_only) == ["plan.json"]
    assert (read_only / "plan.json").read_bytes() == b'{"old": 1}'


_WRITE_AS_UNPRIVILEGED = """
import sys
from cosmicai import storage
try:
    storage.write_bytes(sys.argv[1], b"x")
except Exception as exc:
    print(type(exc).__name__, exc)
"""


def test_permission_denied_is_one_line(tmp_path):
    folder = tmp_path / "locked"
    folder.mkdir()
    url = str(folder / "plan.json")
    folder.chmod(0o555)
    try:
        if os.geteuid() == 0:  # root ignores modes: run without the capabilities that let it
            drop = "-dac_override,-dac_read_search,-fowner"
            out = _run("setpriv", f"--bounding-set={drop}", f"--inh-caps={drop}", sys.executable, "-c",
                       _WRITE_AS_UNPRIVILEGED, url)
            message = out.stdout.strip()
            if "PermissionError" in out.stderr or "setpriv:" in out.stderr:
                pytest.skip(f"cannot drop root's capabilities here: {out.stderr.strip()[-200:]}")
        else:
            try:
                storage.write_bytes(url, b"x")
                message = "no error"
            except StorageError as exc:
                message = f"StorageError {exc}"
    finally:
        folder.chmod(0o755)
    assert message.startswith(f"StorageError permission denied: {url} (cannot write)"), message
    _one_line(message)
    assert os.listdir(folder) == []


def test_failing_rename_leaves_no_temporary(tmp_path):
    """The final name is an existing folder: os.replace fails after the bytes are written and fsynced."""
    (tmp_path / "plan.json" / "inside").mkdir(parents=True)
    with pytest.raises(StorageError) as err:
        storage.write_bytes(str(tmp_path / "plan.json"), b"{}")
    assert str(err.value).startswith(f"{tmp_path / 'plan.json'}: cannot write (")
    _one_line(str(err.value))
    assert os.listdir(tmp_path) == ["plan.json"]


def test_failing_fsync_leaves_no_temporary(tmp_path, monkeypatch):
    def broken_fsync(fd: int) -> None:
        raise OSError(errno.EIO, "Input/output error")

    monkeypatch.setattr(os, "fsync", broken_fsync)
    with pytest.raises(StorageError, match=r"plan\.json: cannot write \(\[Errno 5\] Input/output error\)"):
        storage.write_bytes(str(tmp_path / "plan.json"), b"{}")
    assert os.listdir(tmp_path) == []


# --- S3 timeouts --------------------------------------------------------------------------------------------------

class SilentEndpoint:
    """A socket on 127.0.0.1 that accepts connections and never answers (holds them until closed)."""

    def __init__(self) -> None:
        self.sock = socket.socket()
        self.sock.bind(("127.0.0.1", 0))
        self.sock.listen(64)
        self.sock.settimeout(0.1)
        self.held: list[socket.socket] = []
        self.url = f"http://127.0.0.1:{self.sock.getsockname()[1]}"
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._accept, daemon=True)
        self._thread.start()

    def _accept(self) -> None:
        while not self._stop.is_set():
            try:
                conn, _ = self.sock.accept()
            except socket.timeout:
                continue
            except OSError:
                return
            self.held.append(conn)

    def close(self) -> None:
        self._stop.set()
        self._thread.join(5)
        self.sock.close()
        for conn in self.held:
            conn.close()


def _client_env(monkeypatch, endpoint: str) -> None:
    for var in ("CAI_S3_ENDPOINT", "AWS_ENDPOINT_URL", "AWS_ENDPOINT_URL_S3"):
        monkeypatch.setenv(var, endpoint)
    for var, value in (("AWS_ACCESS_KEY_ID", "test"), ("AWS_SECRET_ACCESS_KEY", "test"),
                       ("AWS_DEFAULT_REGION", "us-east-1"), ("AWS_EC2_METADATA_DISABLED", "true"),
                       ("AWS_RESPONSE_CHECKSUM_VALIDATION", "when_required"),
                       ("AWS_REQUEST_CHECKSUM_CALCULATION", "when_required")):
        monkeypatch.setenv(var, value)
    for var in ("AWS_MAX_ATTEMPTS", "AWS_RETRY_MODE", "AWS_SESSION_TOKEN", "AWS_PROFILE"):
        monkeypatch.delenv(var, raising=False)


@pytest.fixture
def silent(monkeypatch):
    endpoint = SilentEndpoint()
    _client_env(monkeypatch, endpoint.url)
    try:
        yield endpoint
    finally:
        endpoint.close()


def _streamed_write(url: str) -> None:
    with storage.AtomicWriter(url) as out:
        out.write(b"{}")


#: (what the message says it could not do, the call)
OPERATIONS = [
    ("read", storage.read_bytes),
    ("check existence", storage.exists),
    ("list", lambda url: storage.list_files(url, recursive=True)),
    ("stat", storage.file_info),
    ("write", lambda url: storage.write_bytes(url, b"{}")),  # a PUT: botocore's Expect: 100-continue is dropped
    ("write", _streamed_write),
    ("remove", lambda url: storage.remove(url, recursive=True)),
]


def _fails_fast(endpoint: SilentEndpoint, doing: str, op, url: str, attempts: int) -> None:
    bound = storage.s3_client_settings().worst_case_s
    before, start, out = len(endpoint.held), time.monotonic(), {}

    def call() -> None:
        try:
            op(url)
        except BaseException as exc:  # noqa: BLE001 - handed to the assertions below
            out["error"] = exc

    thread = threading.Thread(target=call, daemon=True)  # a hang fails the test instead of blocking it
    thread.start()
    thread.join(bound + 10)
    assert not thread.is_alive(), f"{doing}: still waiting after {bound + 10:.0f} s"
    took = time.monotonic() - start
    assert isinstance(out.get("error"), StorageError), (doing, out)
    message = str(out["error"])
    assert message.startswith(f"{url}: cannot {doing}: the S3 endpoint {endpoint.url} did not answer"), message
    assert "CAI_S3_READ_TIMEOUT" in message
    _one_line(message)
    assert storage.S3FS_RETRIES * attempts * 0.25 <= took < bound + 2, (doing, took, bound)
    assert len(endpoint.held) - before == storage.S3FS_RETRIES * attempts, doing  # bounded retries


def test_silent_endpoint_is_one_line_within_the_bound(silent, monkeypatch):
    """Every kind of call, with small timeouts set by the environment: one line naming the URL and the
    endpoint, after exactly S3FS_RETRIES x CAI_S3_MAX_ATTEMPTS connections."""
    monkeypatch.setenv("CAI_S3_CONNECT_TIMEOUT", "0.5")
    monkeypatch.setenv("CAI_S3_READ_TIMEOUT", "0.25")
    monkeypatch.setenv("CAI_S3_MAX_ATTEMPTS", "1")
    url = "s3://bucket/exp/run[1]/plan.json"
    for doing, op in OPERATIONS:
        _fails_fast(silent, doing, op, url, attempts=1)
    monkeypatch.setenv("CAI_S3_MAX_ATTEMPTS", "2")
    assert storage.s3_client_settings().worst_case_s < 3.5
    _fails_fast(silent, "read", storage.read_bytes, url, attempts=2)


@pytest.mark.slow
def test_silent_endpoint_at_the_defaults_answers_within_60_s(silent):
    """The default timeouts and attempts: one storage call on an endpoint that never answers ends in < 60 s."""
    settings = storage.s3_client_settings()
    assert settings.worst_case_s < 60
    start = time.monotonic()
    with pytest.raises(StorageError, match=f"did not answer.*{silent.url}|{silent.url} did not answer"):
        storage.read_bytes("s3://bucket/plan.json")
    took = time.monotonic() - start
    print(f"silent S3 endpoint at the defaults: StorageError after {took:.1f} s")
    assert settings.read_timeout * settings.max_attempts * storage.S3FS_RETRIES <= took < 60


@pytest.mark.parametrize("var,value", [("CAI_S3_READ_TIMEOUT", "soon"), ("CAI_S3_READ_TIMEOUT", "0"),
                                       ("CAI_S3_CONNECT_TIMEOUT", "-1"), ("CAI_S3_CONNECT_TIMEOUT", "nan"),
                                       ("CAI_S3_READ_TIMEOUT", "inf"), ("CAI_S3_MAX_ATTEMPTS", "0"),
                                       ("CAI_S3_MAX_ATTEMPTS", "2.5"), ("AWS_MAX_ATTEMPTS", "lots"),
                                       ("AWS_RETRY_MODE", "eager")])
def test_bad_timeout_settings_are_one_line_naming_the_variable(var, value, monkeypatch):
    monkeypatch.delenv("CAI_S3_MAX_ATTEMPTS", raising=False)
    monkeypatch.setenv(var, value)
    with pytest.raises(ConfigError) as err:
        storage.exists("s3://bucket/plan.json")
    assert str(err.value).startswith(f"{var}={value!r}: must be"), str(err.value)
    _one_line(str(err.value))
    assert storage.storage_options("/local/path") == {}  # local paths do not read them


def test_timeout_settings_reach_the_s3_client(monkeypatch):
    monkeypatch.setenv("CAI_S3_CONNECT_TIMEOUT", "3")
    monkeypatch.setenv("CAI_S3_READ_TIMEOUT", "7.5")
    monkeypatch.setenv("CAI_S3_MAX_ATTEMPTS", "4")
    monkeypatch.setenv("AWS_MAX_ATTEMPTS", "9")  # the cosmicai variable wins
    monkeypatch.delenv("AWS_RETRY_MODE", raising=False)
    fs, _ = storage.filesystem("s3://bucket/x")
    assert fs.config_kwargs == {"connect_timeout": 3.0, "read_timeout": 7.5,
                                "retries": {"total_max_attempts": 4, "mode": "standard"}}
    assert fs.retries == storage.S3FS_RETRIES
    monkeypatch.delenv("CAI_S3_MAX_ATTEMPTS")
    assert storage.s3_client_settings().max_attempts == 9


class _Drip(BaseHTTPRequestHandler):
    """Answers every HEAD with BODY's headers and every GET with BODY, sent in 16 pieces 0.15 s apart (2.4 s in all, each gap under 0.5 s)."""

    protocol_version = "HTTP/1.1"
    BODY = bytes(range(256)) * 1024  # 256 KiB

    def log_message(self, *args: object) -> None:
        pass

    def do_HEAD(self) -> None:  # noqa: N802 - http.server's name
        self.send_response(200)
        self.send_header("Content-Length", str(len(self.BODY)))
        self.send_header("Content-Type", "application/octet-stream")
        self.send_header("ETag", '"drip"')
        self.end_headers()

    def do_GET(self) -> None:  # noqa: N802 - http.server's name
        self.do_HEAD()
        step = len(self.BODY) // 16
        for i in range(0, len(self.BODY), step):
            self.wfile.write(self.BODY[i:i + step])
            self.wfile.flush()
            time.sleep(0.15)


def test_read_timeout_is_per_socket_read_not_per_object(monkeypatch):
    """An object that takes 2.4 s to arrive, at most 0.15 s between pieces, reads whole with a 0.5 s timeout."""
    server = ThreadingHTTPServer(("127.0.0.1", 0), _Drip)
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    try:
        _client_env(monkeypatch, f"http://127.0.0.1:{server.server_address[1]}")
        monkeypatch.setenv("CAI_S3_READ_TIMEOUT", "0.5")
        monkeypatch.setenv("CAI_S3_MAX_ATTEMPTS", "1")
        start = time.monotonic()
        data = storage.read_bytes("s3://bucket/data/part-000001.safetensors")
        took = time.monotonic() - start
    finally:
        server.shutdown()
        server.server_close()
        thread.join(5)
    assert data == _Drip.BODY
    assert took >= 2.0  # really slower than the read timeout, in one attempt
