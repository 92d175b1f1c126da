"""One live run per result path: a lease file (``lease.json``) created only where none exists.

The lease names its owner (user, host, pid, run id, and where that pid lives: the boot id and the pid namespace)
and carries a heartbeat the owner refreshes every :data:`HEARTBEAT_S` seconds. A second run on the same result
path, ``--overwrite`` included, is refused while the lease is live.

Liveness is decided by the heartbeat: its age is counted from the earliest of the recorded heartbeat, the lease's
last write as the storage saw it (file mtime, S3 ``LastModified``) and now, so a heartbeat from a clock that runs
ahead counts from its last write and expires after :data:`STALE_S` of silence like any other. A lease whose
owner's pid is gone is taken over at once, but only when the lease was written on this host, in this boot and in
this pid namespace (so a pid that is merely not visible from another container is never taken for dead). A
lease silent for :data:`STALE_S`, or one that cannot be read as a lease, is broken only when asked
(``--break-lease``).

Every write is conditional, so a run never overwrites or deletes a lease it does not hold:

- local disk: ``O_CREAT | O_EXCL`` to create; heartbeat, take-over and release check, under an ``flock`` of the
  result folder, that the file still holds the bytes this run last wrote or read before replacing or removing it;
- S3: ``If-None-Match: *`` to create, ``If-Match: <ETag>`` to heartbeat, take over and delete. Before the
  first lease on an endpoint and bucket, a probe object under the run's own result prefix checks that the server
  enforces these conditions; a server that ignores them is refused (:class:`UnsafeLeaseError`) unless the risk is
  accepted (``allow_unsafe``, ``--allow-unsafe-lease``, or ``CAI_ALLOW_UNSAFE_LEASE=1``), and then the run
  warns on stderr and falls back to read-compare-write, which two runs starting together can both pass.

A run whose lease is taken while it runs (its heartbeat finds another lease there) stops refreshing it, warns on
stderr, and :meth:`Lease.release` (the end of the ``with`` block) raises :class:`LeaseHeldError`.
"""

from __future__ import annotations

import contextlib
import errno
import getpass
import json
import math
import os
import socket
import sys
import threading
import time
import uuid
from dataclasses import dataclass
from typing import Any, Iterator

from .. import storage
from ..errors import ConfigError, StorageError
from ..results import RunFolder

HEARTBEAT_S = 15.0
STALE_S = 120.0
#: Environment variable that accepts an S3 server ignoring conditional writes ("1", "true" or "yes").
UNSAFE_ENV = "CAI_ALLOW_UNSAFE_LEASE"
#: A lease is a few hundred bytes; anything larger is not read.
MAX_LEASE_BYTES = 64 * 1024
#: How long to wait for another process's (millisecond-long) lease update under the folder lock.
LOCK_WAIT_S = 10.0
_TRIES = 5
_PID_MAX = 4_194_304  # Linux's largest pid_max
_BOGUS_ETAG = '"00000000000000000000000000000000"'


class LeaseHeldError(ConfigError):
    """Another live run holds the result path (or took it from this run)."""


class UnsafeLeaseError(ConfigError):
    """The S3 server ignores conditional writes, so a lease there cannot exclude a second run."""


def _now() -> float:
    return time.time()


# --------------------------------------------------------------------------- who and where a process is

def _read_text(path: str) -> str | None:
    try:
        with open(path, encoding="ascii", errors="replace") as fh:
            return fh.read().strip()
    except OSError:
        return None


def _boot_id() -> str | None:
    return _read_text("/proc/sys/kernel/random/boot_id")


def _pid_ns() -> int | None:
    try:
        return os.stat("/proc/self/ns/pid").st_ino
    except OSError:
        return None


def _pid_start(pid: int | str = "self") -> int | None:
    """The process's start time in clock ticks since boot (field 22 of /proc/PID/stat), None if unknown."""
    stat = _read_text(f"/proc/{pid}/stat")
    if not stat or ")" not in stat:
        return None
    fields = stat.rsplit(")", 1)[1].split()
    try:
        return int(fields[19])
    except (IndexError, ValueError):
        return None


def _pid_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


def _owner_gone(info: dict[str, Any]) -> bool:
    """True only when ``info`` provably names a process of this host, boot and pid namespace that has ended."""
    boot, ns = _boot_id(), _pid_ns()
    if boot is None or ns is None:
        return False
    if (info.get("host"), info.get("boot_id"), info.get("pid_ns")) != (socket.gethostname(), boot, ns):
        return False
    pid = info["pid"]
    if not _pid_alive(pid):
        return True
    started = info.get("pid_start")
    return isinstance(started, int) and _pid_start(pid) not in (None, started)  # the pid was reused


def describe(info: dict[str, Any]) -> str:
    """``pid P on host H (user U), started T, heartbeat N s ago`` (or what is wrong with a malformed lease)."""
    if info.get("problem"):
        return f"a malformed lease: {info['problem']}"
    now = _now()
    try:
        beat = float(info.get("heartbeat", 0))
    except (TypeError, ValueError):
        beat = 0.0
    written = info.get("written_at")
    last = min(beat, now, written if isinstance(written, (int, float)) else math.inf)
    ahead = f", its clock {beat - now:.0f} s ahead" if beat > now + 1 else ""
    return (f"pid {info.get('pid')} on host {info.get('host')} (user {info.get('user')}), started "
            f"{info.get('started_at')}, heartbeat {now - last:.0f} s ago{ahead}")


def _problem(info: Any) -> str | None:
    """Why a parsed lease is not a lease, or None."""
    if not isinstance(info, dict):
        return f"it holds a JSON {type(info).__name__}, not an object"
    checks = (("run_id", str, "a run id"), ("host", str, "a host name"), ("pid", int, "a process id"),
              ("heartbeat", (int, float), "a time"))
    for key, kind, what in checks:
        value = info.get(key)
        if isinstance(value, bool) or not isinstance(value, kind) or (key == "heartbeat" and not math.isfinite(value)) \
                or (key == "pid" and not 0 < value <= _PID_MAX):
            shown = repr(value)
            return f"its {key} is {shown[:40] + '...' if len(shown) > 40 else shown}, not {what}"
    return None


@dataclass
class _Seen:
    """A lease as read: its bytes, the token a conditional write needs, the storage's write time, its fields."""

    token: str | bytes
    written_at: float | None
    info: dict[str, Any]
    problem: str | None = None


def _parse(raw: bytes, token: str | bytes, written_at: float | None) -> _Seen:
    problem: str | None
    info: Any = None
    if not raw.strip():
        problem = "it is empty"
    else:
        try:
            info = json.loads(raw.decode("utf-8"))
            problem = _problem(info)
        except (UnicodeDecodeError, ValueError, RecursionError):
            problem = f"its {len(raw)} bytes are not JSON"
    if problem is not None:
        return _Seen(token, written_at, {"problem": problem}, problem)
    return _Seen(token, written_at, {**info, "written_at": written_at})


# --------------------------------------------------------------------------- local disk

def _os_error(exc: OSError, path: str, what: str) -> StorageError:
    if exc.errno in (errno.ENOSPC, errno.EDQUOT):
        reason = "no space left on" if exc.errno == errno.ENOSPC else "disk quota exceeded on"
        return StorageError(f"{reason} {path}: {what}; free some space and rerun")
    if exc.errno == errno.EROFS:
        return StorageError(f"{path} is read-only: {what}; give a writable --result")
    if exc.errno in (errno.EACCES, errno.EPERM):
        return StorageError(f"{path}: permission denied: {what}")
    return StorageError(f"{path}: {what} ({exc.strerror or exc})")


class _LocalStore:
    """``lease.json`` in a local folder; the token is the file's bytes, compared under an flock of the folder."""

    unsafe = False

    def __init__(self, url: str, run_id: str):
        self.path = os.path.abspath(storage.local_path(url) or url)
        self.folder = os.path.dirname(self.path)
        self._tmp = os.path.join(self.folder, f".tmp-lease-{run_id}")

    @contextlib.contextmanager
    def _locked(self) -> Iterator[None]:
        try:
            os.makedirs(self.folder, exist_ok=True)
            fd = os.open(self.folder, os.O_RDONLY | os.O_DIRECTORY)
        except OSError as exc:
            raise _os_error(exc, self.folder, "the run's lease cannot be written") from exc
        try:
            _flock(fd, self.folder)
            yield
        finally:
            os.close(fd)  # releases the flock

    def _read_unlocked(self) -> _Seen | None:
        try:
            fd = os.open(self.path, os.O_RDONLY)
        except FileNotFoundError:
            return None
        except OSError as exc:
            raise _os_error(exc, self.path, "cannot read the run's lease") from exc
        with os.fdopen(fd, "rb") as fh:
            st = os.fstat(fd)
            if st.st_size > MAX_LEASE_BYTES:
                return _Seen(b"", st.st_mtime, {"problem": f"it is {st.st_size} bytes"}, f"it is {st.st_size} bytes")
            raw = fh.read(MAX_LEASE_BYTES + 1)
        return _parse(raw, raw, st.st_mtime)

    def read(self) -> _Seen | None:
        with self._locked():
            return self._read_unlocked()

    def create(self, data: bytes) -> bytes | None:
        with self._locked():
            try:
                fd = os.open(self.path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o644)
            except FileExistsError:
                return None
            except OSError as exc:
                raise _os_error(exc, self.folder, "the run's lease cannot be written") from exc
            try:
                with os.fdopen(fd, "wb") as fh:
                    fh.write(data)
                    fh.flush()
                    os.fsync(fh.fileno())
            except OSError as exc:
                with contextlib.suppress(OSError):  # the file is ours: never leave an empty or partial lease
                    os.unlink(self.path)
                raise _os_error(exc, self.folder, "the run's lease cannot be written") from exc
            return data

    def replace(self, data: bytes, token: str | bytes) -> bytes | None:
        """Write ``data`` if the lease still holds ``token``'s bytes; None (nothing written) otherwise."""
        with self._locked():
            seen = self._read_unlocked()
            if seen is None or seen.token != token:
                return None
            try:
                with open(self._tmp, "wb") as fh:
                    fh.write(data)
                    fh.flush()
                    os.fsync(fh.fileno())
                os.replace(self._tmp, self.path)
            except OSError as exc:
                with contextlib.suppress(OSError):
                    os.unlink(self._tmp)
                raise _os_error(exc, self.folder, "the run's lease cannot be refreshed") from exc
            return data

    def delete(self, token: str | bytes) -> bool:
        """Remove the lease if it still holds ``token``'s bytes; False (left alone) otherwise."""
        with self._locked():
            seen = self._read_unlocked()
            if seen is None or seen.token != token:
                return False
            try:
                os.unlink(self.path)
            except OSError as exc:
                raise _os_error(exc, self.folder, "the run's lease cannot be removed") from exc
            return True


def _flock(fd: int, folder: str) -> None:
    """An exclusive flock on ``fd`` within :data:`LOCK_WAIT_S`; where the filesystem has no flock, nothing."""
    try:
        import fcntl
    except ImportError:  # not on POSIX: the bytes check alone guards the lease
        return
    deadline = time.monotonic() + LOCK_WAIT_S
    while True:
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
            return
        except BlockingIOError:
            if time.monotonic() > deadline:
                raise LeaseHeldError(f"{folder}: another process has held the lease lock for {LOCK_WAIT_S:.0f} s; "
                                     "is it stopped? retry when it is gone") from None
            time.sleep(0.01)
        except OSError:  # ENOLCK/EINVAL: this filesystem has no flock; the bytes check alone guards the lease
            return


# --------------------------------------------------------------------------- S3

@dataclass
class _Probe:
    """What an S3 endpoint does with conditional writes (probed once per endpoint and bucket per process)."""

    ignored: str | None   # the condition the server ignored, None when it enforces both
    delete_if_match: bool
    ms: float


_PROBES: dict[tuple[str, str], _Probe] = {}
_PROBE_LOCK = threading.Lock()


def _s3_error(exc: BaseException) -> tuple[str, int | None]:
    """(error code, HTTP status) of an s3fs/botocore exception, looking through s3fs's translation."""
    err: BaseException | None = exc
    for _ in range(4):  # StorageError <- s3fs's OSError <- botocore's ClientError
        if err is None:
            break
        response = getattr(err, "response", None)
        if isinstance(response, dict):
            return (str(response.get("Error", {}).get("Code", "")),
                    response.get("ResponseMetadata", {}).get("HTTPStatusCode"))
        err = err.__cause__ or err.__context__
    if isinstance(exc, FileExistsError):
        return "PreconditionFailed", 412
    if isinstance(exc, FileNotFoundError):
        return "NoSuchKey", 404
    return type(exc).__name__, None


def _is_precondition(exc: BaseException) -> bool:
    code, status = _s3_error(exc)
    return status in (409, 412) or code in ("PreconditionFailed", "ConditionalRequestConflict")


def _is_conflict(exc: BaseException) -> bool:
    """409: another conditional write to the key was in flight; the caller looks again."""
    code, status = _s3_error(exc)
    return status == 409 or code == "ConditionalRequestConflict"


class _Conflict(StorageError):
    """A conditional write met another one in flight (S3's 409); nothing was written."""


def _is_unsupported(exc: BaseException) -> bool:
    """The server refused the request's condition itself (400 InvalidArgument, 501 NotImplemented)."""
    return _s3_error(exc)[1] in (400, 501)


def _is_missing(exc: BaseException) -> bool:
    code, status = _s3_error(exc)
    return status == 404 or code in ("NoSuchKey", "404")


class _S3Store:
    """``lease.json`` on S3; the token is the object's ETag."""

    def __init__(self, url: str):
        self.url = url
        self.fs, path = storage.filesystem(url)
        self.bucket, self.key, _ = self.fs.split_path(path)
        self.endpoint = storage.s3_endpoint()
        self.probe: _Probe | None = None
        self.unsafe = False

    def where(self) -> str:
        return f"the S3 endpoint {self.endpoint}" if self.endpoint else "AWS S3"

    def _call(self, method: str, what: str, **kw: Any) -> dict[str, Any]:
        try:
            return self.fs.call_s3(method, Bucket=self.bucket, **kw)
        except Exception as exc:  # noqa: BLE001 - classified by the caller or named here
            if _is_precondition(exc) or _is_missing(exc):
                raise
            raise StorageError(f"{self.url}: cannot {what} ({type(exc).__name__}: {exc})") from exc

    def _get(self, key: str) -> tuple[bytes, dict[str, Any]] | None:
        async def get() -> tuple[bytes, dict[str, Any]]:
            resp = await self.fs._call_s3("get_object", Bucket=self.bucket, Key=key)
            body = resp["Body"]
            try:
                size = int(resp.get("ContentLength") or 0)
                data = b"" if size > MAX_LEASE_BYTES else await body.read()
            finally:
                body.close()
            return data, resp

        from fsspec.asyn import sync

        try:
            return sync(self.fs.loop, get)
        except Exception as exc:  # noqa: BLE001
            if _is_missing(exc):
                return None
            raise StorageError(f"{self.url}: cannot read the run's lease ({type(exc).__name__}: {exc})") from exc

    def read(self) -> _Seen | None:
        got = self._get(self.key)
        if got is None:
            return None
        raw, resp = got
        written = resp.get("LastModified")
        written_at = written.timestamp() if hasattr(written, "timestamp") else None
        size = int(resp.get("ContentLength") or 0)
        if size > MAX_LEASE_BYTES:
            return _Seen(resp["ETag"], written_at, {"problem": f"it is {size} bytes"}, f"it is {size} bytes")
        return _parse(raw, resp["ETag"], written_at)

    def create(self, data: bytes) -> str | None:
        if self.unsafe and self.read() is not None:  # the server would overwrite it: look first (racy)
            return None
        try:
            return self._call("put_object", "create the run's lease", Key=self.key, Body=data,
                              IfNoneMatch="*")["ETag"]
        except Exception as exc:  # noqa: BLE001
            if _is_precondition(exc):
                return None
            raise

    def replace(self, data: bytes, token: str | bytes) -> str | None:
        if self.unsafe:  # read-compare-write: the best a server without conditions allows
            seen = self.read()
            if seen is None or seen.token != token:
                return None
            return self._call("put_object", "refresh the run's lease", Key=self.key, Body=data)["ETag"]
        try:
            return self._call("put_object", "refresh the run's lease", Key=self.key, Body=data,
                              IfMatch=token)["ETag"]
        except Exception as exc:  # noqa: BLE001
            if _is_conflict(exc):
                raise _Conflict(f"{self.url}: another write to the lease was in flight") from exc
            if _is_precondition(exc) or _is_missing(exc):
                return None
            raise

    def delete(self, token: str | bytes) -> bool:
        if self.unsafe or (self.probe is not None and not self.probe.delete_if_match):
            # The server cannot delete conditionally: HEAD, compare, DELETE. A run that takes the lease between
            # the two calls loses it, and its next heartbeat (a conditional put on a missing key) finds out.
            try:
                etag = self._call("head_object", "check the run's lease", Key=self.key)["ETag"]
            except Exception as exc:  # noqa: BLE001
                if _is_missing(exc) or _is_precondition(exc):
                    return False
                raise
            if etag != token:
                return False
            self._call("delete_object", "remove the run's lease", Key=self.key)
            return True
        for _ in range(_TRIES):
            try:
                self._call("delete_object", "remove the run's lease", Key=self.key, IfMatch=token)
                return True
            except Exception as exc:  # noqa: BLE001
                if _is_conflict(exc):
                    time.sleep(0.1)
                    continue
                if _is_precondition(exc) or _is_missing(exc):
                    return False
                raise
        return False

    def check_conditions(self) -> _Probe:
        """Probe (once per endpoint and bucket in this process) whether the server enforces conditional writes."""
        cache_key = (self.endpoint or "aws", self.bucket)
        with _PROBE_LOCK:
            if cache_key not in _PROBES:
                _PROBES[cache_key] = self._probe()
            self.probe = _PROBES[cache_key]
        return self.probe

    def _probe(self) -> _Probe:
        key = f"{self.key.rsplit('/', 1)[0]}/.cai-lease-probe-{uuid.uuid4().hex}" if "/" in self.key \
            else f".cai-lease-probe-{uuid.uuid4().hex}"
        t0 = time.perf_counter()
        ignored, delete_if_match = None, False
        try:
            self._call("put_object", "probe conditional writes", Key=key, Body=b"1")
            for body, cond, what in ((b"2", {"IfNoneMatch": "*"}, "If-None-Match: *"),
                                     (b"3", {"IfMatch": _BOGUS_ETAG}, "If-Match on another ETag")):
                try:
                    self._call("put_object", "probe conditional writes", Key=key, Body=body, **cond)
                    ignored = f"a put with {what} replaced an existing object"
                except Exception as exc:  # noqa: BLE001 - 412 is the answer wanted
                    if _is_unsupported(exc):
                        ignored = f"a put with {what} was refused: {_s3_error(exc)[0]}"
                    elif not _is_precondition(exc):
                        raise
                if ignored is not None:
                    break
            if ignored is None:
                try:
                    self.fs.call_s3("delete_object", Bucket=self.bucket, Key=key, IfMatch=_BOGUS_ETAG)
                except Exception as exc:  # noqa: BLE001 - 412: enforced; anything else: not supported
                    delete_if_match = _is_precondition(exc)
        finally:
            with contextlib.suppress(Exception):  # the probe's own literal key; a plain DELETE is idempotent
                self.fs.call_s3("delete_object", Bucket=self.bucket, Key=key)
        return _Probe(ignored, delete_if_match, (time.perf_counter() - t0) * 1000)


def _env_allows_unsafe() -> bool:
    return os.environ.get(UNSAFE_ENV, "").strip().lower() in ("1", "true", "yes")


# --------------------------------------------------------------------------- the lease

class Lease:
    """The lease of one run on ``result_url``; use as a context manager (refreshes its heartbeat in a thread).

    ``break_stale`` breaks a lease silent for :data:`STALE_S` or malformed (``--break-lease``); ``allow_unsafe``
    (or ``CAI_ALLOW_UNSAFE_LEASE=1``) runs on an S3 server that ignores conditional writes, with a warning.
    """

    def __init__(self, result_url: str, break_stale: bool = False, allow_unsafe: bool = False):
        self.url = RunFolder(result_url).lease
        self.result_url = result_url
        self.break_stale = break_stale
        self.allow_unsafe = allow_unsafe
        self.info = {"run_id": uuid.uuid4().hex, "user": _user(), "host": socket.gethostname(), "pid": os.getpid(),
                     "pid_start": _pid_start(), "boot_id": _boot_id(), "pid_ns": _pid_ns(),
                     "started_at": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()), "heartbeat": _now()}
        self._stop = threading.Event()
        self._io = threading.Lock()
        self._thread: threading.Thread | None = None
        self._store: _LocalStore | _S3Store | None = None
        self._token: str | bytes | None = None
        self.took_over: dict[str, Any] | None = None
        #: Why this run lost its lease while running (another run holds it now), or None.
        self.lost: str | None = None

    def acquire(self) -> "Lease":
        """Take the lease, or raise LeaseHeldError naming the live owner (UnsafeLeaseError: see the module)."""
        store = self._open_store()
        for attempt in range(_TRIES):
            time.sleep(0.05 * attempt)  # after a change seen mid-way, give the other writer a moment
            payload = self._payload()
            token = store.create(payload)
            if token is not None:
                if store.unsafe:
                    seen = store.read()
                    if seen is None or seen.info.get("run_id") != self.info["run_id"]:
                        raise LeaseHeldError(f"{self.result_url} was taken by another run at the same moment; "
                                             "retry")
                    token = seen.token
                self._token = token
                break
            seen = store.read()
            if seen is None:  # removed between the create and the read: try again
                continue
            self._judge(seen)
            try:
                token = store.replace(payload, seen.token)
            except _Conflict:  # another run is writing it right now: look again
                continue
            if token is not None:
                self._token, self.took_over = token, seen.info
                break
        else:
            raise LeaseHeldError(f"{self.result_url}: could not take the lease {self.url}: it changed on every one "
                                 f"of {_TRIES} tries; is another run starting there?")
        self._thread = threading.Thread(target=self._beat, name="cai-lease", daemon=True)
        self._thread.start()
        return self

    def release(self) -> None:
        """Stop the heartbeat and remove the lease if it is still ours; LeaseHeldError if it was taken meanwhile."""
        self._stop.set()
        with self._io:
            if self._store is not None and self._token is not None and self.lost is None:
                if not self._store.delete(self._token):
                    self.lost = "its lease was replaced by another run's"
                self._token = None
        if self._thread is not None:
            self._thread.join(timeout=5)
        if self.lost is not None:
            raise LeaseHeldError(f"{self.result_url}: this run lost its lease while running ({self.lost}); its "
                                 "results may be mixed with that run's: check them, or rerun with --overwrite once "
                                 "the other run has finished")

    def check(self) -> None:
        """Raise LeaseHeldError if another run has taken the lease from this one."""
        if self.lost is not None:
            raise LeaseHeldError(f"{self.result_url}: this run lost its lease ({self.lost})")

    def __enter__(self) -> "Lease":
        return self.acquire()

    def __exit__(self, exc_type: Any, *exc: Any) -> None:
        try:
            self.release()
        except LeaseHeldError:
            if exc_type is None:  # never mask the error the run already has
                raise

    # ------------------------------------------------------------------ internals

    def _open_store(self) -> _LocalStore | _S3Store:
        if storage.local_path(self.url) is not None:
            self._store = _LocalStore(self.url, self.info["run_id"])
            return self._store
        store = _S3Store(self.url)
        probe = store.check_conditions()
        if probe.ignored is not None:
            where = f"{store.where()} (bucket {store.bucket})"
            if not (self.allow_unsafe or _env_allows_unsafe()):
                raise UnsafeLeaseError(
                    f"{where} ignores conditional writes ({probe.ignored}), so a lease on {self.result_url} cannot "
                    f"keep a second run out; use a server that enforces them, or accept the risk with "
                    f"--allow-unsafe-lease or {UNSAFE_ENV}=1")
            print(f"cai: warning: {where} ignores conditional writes: the lease on {self.result_url} cannot keep "
                  f"a second run out (accepted with --allow-unsafe-lease or {UNSAFE_ENV}=1)", file=sys.stderr)
            store.unsafe = True
        self._store = store
        return store

    def _judge(self, seen: _Seen) -> None:
        """Return if ``seen`` may be taken over; raise LeaseHeldError naming it otherwise."""
        if seen.problem is not None:
            if self.break_stale:
                return
            raise LeaseHeldError(f"{self.url} is not a valid lease ({seen.problem}); if no run is using "
                                 f"{self.result_url}, rerun with --break-lease to clear it")
        held = seen.info
        if _owner_gone(held):
            return
        now = _now()
        last = min(float(held["heartbeat"]), now, seen.written_at if seen.written_at is not None else math.inf)
        if now - last <= STALE_S:
            raise LeaseHeldError(f"{self.result_url} is in use by a live run ({describe(held)}); wait for it to "
                                 "finish or stop it first")
        if not self.break_stale:
            raise LeaseHeldError(f"{self.result_url} holds a stale lease ({describe(held)}); if that run is "
                                 "dead, rerun with --break-lease")

    def _payload(self) -> bytes:
        return json.dumps(self.info).encode()

    def _beat(self) -> None:
        last_ok = time.monotonic()
        warned = False
        while not self._stop.wait(HEARTBEAT_S):
            with self._io:
                if self._stop.is_set() or self._store is None or self._token is None:
                    return
                self.info["heartbeat"] = _now()
                try:
                    token = self._store.replace(self._payload(), self._token)
                except Exception as exc:  # noqa: BLE001 - a missed heartbeat only makes the lease look older
                    if time.monotonic() - last_ok > STALE_S and not warned:
                        warned = True
                        print(f"cai: warning: the lease {self.url} could not be refreshed for "
                              f"{time.monotonic() - last_ok:.0f} s ({exc}); another run may take it over",
                              file=sys.stderr)
                    continue
                if token is None:
                    self._lose()
                    return
                self._token, last_ok, warned = token, time.monotonic(), False

    def _lose(self) -> None:
        try:
            seen = self._store.read() if self._store is not None else None
        except Exception:  # noqa: BLE001 - the loss is reported either way
            seen = None
        self.lost = f"now held by {describe(seen.info)}" if seen is not None else "the lease was removed"
        self._token = None
        print(f"cai: warning: {self.result_url}: another run took this run's lease ({self.lost}); "
              "stopped refreshing it", file=sys.stderr)


def _user() -> str:
    try:
        return getpass.getuser()
    except Exception:  # noqa: BLE001 - no user name in some containers
        return str(os.getuid())
