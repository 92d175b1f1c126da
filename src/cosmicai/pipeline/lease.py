"""One live run per result path: a lease file (``lease.json``) taken with an atomic create.

The lease names its owner (user, host, pid, run id) and carries a heartbeat the owner refreshes every
:data:`HEARTBEAT_S` seconds. A second run on the same result path, ``--overwrite`` included, is refused while
the lease is live. A lease taken on this host by a process that no longer exists (after a ``kill -9`` or a crash) is
taken over by the next run by itself. A lease whose heartbeat is older than :data:`STALE_S` (its owner on another
host, or hung) is broken only when asked (``--break-lease``); a live lease is never broken.

Atomic create: ``O_CREAT | O_EXCL`` on local disk; a conditional put (``If-None-Match: *``, s3fs's ``xb`` mode) on
S3. Servers that ignore the condition make the create racy, not unsafe: the owner re-reads the lease after
writing it and gives up if another run's lease is there.
"""

from __future__ import annotations

import getpass
import json
import os
import socket
import threading
import time
import uuid
from typing import Any

from .. import storage
from ..errors import ConfigError, StorageError
from ..results import LEASE_NAME

HEARTBEAT_S = 15.0
STALE_S = 120.0


class LeaseHeldError(ConfigError):
    """Another live run holds the result path."""


def _now() -> float:
    return time.time()


def _pid_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


def _create_exclusive(url: str, data: bytes) -> bool:
    """Write ``data`` to ``url`` only if nothing is there; False when something is."""
    path = storage.local_path(url)
    if path is not None:
        os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
        try:
            fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o644)
        except FileExistsError:
            return False
        with os.fdopen(fd, "wb") as fh:
            fh.write(data)
            fh.flush()
            os.fsync(fh.fileno())
        return True
    fs, key = storage.filesystem(url)
    try:
        with fs.open(key, "xb") as fh:
            fh.write(data)
    except FileExistsError:
        return False
    except Exception as exc:  # noqa: BLE001 - s3fs/botocore errors vary; a 412 means someone else created it
        if "412" in str(exc) or "PreconditionFailed" in str(exc):
            return False
        raise StorageError(f"{url}: cannot create the run's lease ({type(exc).__name__}: {exc})") from exc
    return True


def describe(info: dict[str, Any]) -> str:
    """``pid P on host H (user U), started T, heartbeat N s ago``."""
    age = _now() - float(info.get("heartbeat", 0))
    return (f"pid {info.get('pid')} on host {info.get('host')} (user {info.get('user')}), started "
            f"{info.get('started_at')}, heartbeat {age:.0f} s ago")


class Lease:
    """The lease of one run on ``result_url``; use as a context manager (refreshes its heartbeat in a thread)."""

    def __init__(self, result_url: str, break_stale: bool = False):
        self.url = storage.join(result_url, LEASE_NAME)
        self.result_url = result_url
        self.break_stale = break_stale
        self.info = {"run_id": uuid.uuid4().hex, "user": _user(), "host": socket.gethostname(), "pid": os.getpid(),
                     "started_at": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()), "heartbeat": _now()}
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None
        self.took_over: dict[str, Any] | None = None

    def acquire(self) -> "Lease":
        """Take the lease, or raise LeaseHeldError naming the live owner."""
        for _ in range(3):
            if _create_exclusive(self.url, self._payload()):
                if self._still_mine():
                    break
                raise LeaseHeldError(f"{self.result_url} was taken by another run at the same moment; retry")
            held = self._read()
            if held is None:  # vanished or unreadable between the create and the read: try again
                continue
            silent = _now() - float(held.get("heartbeat", 0)) > STALE_S
            gone = held.get("host") == socket.gethostname() and isinstance(held.get("pid"), int) \
                and not _pid_alive(held["pid"])
            if not gone and not silent:
                raise LeaseHeldError(f"{self.result_url} is in use by a live run ({describe(held)}); wait for it to "
                                     "finish or stop it first")
            if not gone and not self.break_stale:
                raise LeaseHeldError(f"{self.result_url} holds a stale lease ({describe(held)}); if that run is "
                                     "dead, rerun with --break-lease")
            self.took_over = held
            storage.remove(self.url)
        else:
            raise LeaseHeldError(f"{self.result_url}: could not take the lease {self.url}")
        self._thread = threading.Thread(target=self._beat, name="cai-lease", daemon=True)
        self._thread.start()
        return self

    def release(self) -> None:
        """Stop the heartbeat and remove the lease (if it is still ours)."""
        self._stop.set()
        if self._thread is not None:
            self._thread.join(timeout=5)
        if self._still_mine():
            storage.remove(self.url)

    def __enter__(self) -> "Lease":
        return self.acquire()

    def __exit__(self, *exc: Any) -> None:
        self.release()

    def _payload(self) -> bytes:
        return json.dumps(self.info).encode()

    def _read(self) -> dict[str, Any] | None:
        try:
            raw = storage.read_json(self.url)
        except Exception:  # noqa: BLE001 - a missing or half-written lease reads as absent
            return None
        return raw if isinstance(raw, dict) else None

    def _still_mine(self) -> bool:
        held = self._read()
        return held is not None and held.get("run_id") == self.info["run_id"]

    def _beat(self) -> None:
        while not self._stop.wait(HEARTBEAT_S):
            if not self._still_mine():
                return  # broken by someone else: stop refreshing it
            self.info["heartbeat"] = _now()
            try:
                storage.write_bytes(self.url, self._payload())
            except Exception:  # noqa: BLE001 - a missed heartbeat only makes the lease look older
                pass


def _user() -> str:
    try:
        return getpass.getuser()
    except Exception:  # noqa: BLE001 - no user name in some containers
        return str(os.getuid())
