"""URL-based storage over fsspec: local paths, ``file://``, ``s3://bucket/prefix`` and any S3-compatible endpoint.

The S3 endpoint is taken, in order, from ``CAI_S3_ENDPOINT``, ``AWS_ENDPOINT_URL_S3`` or ``AWS_ENDPOINT_URL``
(unset means real AWS). Listings go through s3fs, which pages through ``ListObjectsV2`` (never one
unpaginated call), so more than 1,000 objects are always seen.

Local paths and ``file://`` URLs have ``~`` and environment variables (``$VAR``, ``${VAR}``) expanded where
they are resolved (:func:`local_path`, :func:`filesystem`), so every reader and writer sees the same file:
``~/data`` is ``$HOME/data`` for both, never a folder named ``~``. Remote URLs (``s3://`` ...) are left as they
are: ``~`` and ``$`` are ordinary characters in an object key. A path holding a NUL byte is refused.
(So a local file whose name literally holds ``$NAME``, with NAME set in the environment, cannot be named.)

Names are literal everywhere: ``[ ] * ? { }`` and spaces are ordinary characters, never patterns. Removal is
done here (exact keys, exact files), not through fsspec's ``rm``, which expands globs on S3.

S3 calls have a connect timeout, a read timeout (per socket read, so large objects still stream) and a bounded
number of attempts, set by ``CAI_S3_CONNECT_TIMEOUT`` (seconds, default 5), ``CAI_S3_READ_TIMEOUT`` (seconds,
default 10) and ``CAI_S3_MAX_ATTEMPTS`` (botocore attempts per request, default 2, or ``AWS_MAX_ATTEMPTS``).
s3fs retries a timed-out request once more on top, so an endpoint that never answers is reported in about
2 x attempts x read timeout (about 42 s at the defaults), in one line naming the URL and the endpoint.

A failed write leaves nothing behind (no temporary file) and says why in one line: ``no space left on PATH``,
``PATH is read-only`` or ``permission denied: PATH``.
"""

from __future__ import annotations

import asyncio
import contextlib
import errno
import itertools
import json
import math
import os
import re
import shutil
import socket
import tempfile
from collections import deque
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from typing import Any, Callable, Iterable, Iterator
from urllib.parse import urlsplit

import fsspec
from fsspec.core import url_to_fs

from .errors import CaiError, ConfigError, StorageError

#: Where the S3 endpoint comes from, first set wins (the one list: the Dask backend forwards these to its workers).
ENDPOINT_VARS = ("CAI_S3_ENDPOINT", "AWS_ENDPOINT_URL_S3", "AWS_ENDPOINT_URL")
#: The variables that bound S3 calls (see :func:`s3_client_settings`).
S3_TIMEOUT_VARS = ("CAI_S3_CONNECT_TIMEOUT", "CAI_S3_READ_TIMEOUT", "CAI_S3_MAX_ATTEMPTS", "AWS_MAX_ATTEMPTS",
                   "AWS_RETRY_MODE")
#: Every variable the S3 client reads from the environment (a remote worker needs the same values).
S3_CLIENT_VARS = ENDPOINT_VARS + S3_TIMEOUT_VARS
DEFAULT_CONNECT_TIMEOUT = 5.0
DEFAULT_READ_TIMEOUT = 10.0
DEFAULT_MAX_ATTEMPTS = 2
#: s3fs's own retry loop around each request (it also retries a body that breaks mid-read); s3fs's default is 5,
#: which multiplies every timeout by five.
S3FS_RETRIES = 2


def _timeout_types() -> tuple[type[BaseException], ...]:
    try:
        from botocore.exceptions import ConnectTimeoutError, ReadTimeoutError
    except ImportError:
        return (asyncio.TimeoutError, socket.timeout)
    return (asyncio.TimeoutError, socket.timeout, ConnectTimeoutError, ReadTimeoutError)


def _unreachable_types() -> tuple[type[BaseException], ...]:
    try:
        from botocore.exceptions import EndpointConnectionError
    except ImportError:
        return ()
    return (EndpointConnectionError,)


_TIMEOUTS = _timeout_types()
_UNREACHABLE = _unreachable_types()


def _remote_error_types() -> tuple[type[BaseException], ...]:
    """OSError plus botocore's connection/credential errors, which s3fs lets through unwrapped."""
    try:
        from botocore.exceptions import BotoCoreError
    except ImportError:
        return (OSError,)
    return (OSError, BotoCoreError)


_REMOTE_ERRORS = _remote_error_types()
#: The errors storage back ends raise (OSError and botocore's): callers writing through a file object wrap these.
REMOTE_ERRORS = _REMOTE_ERRORS


def _current_umask() -> int:
    mask = os.umask(0)
    os.umask(mask)
    return mask


_UMASK = _current_umask()


def s3_endpoint() -> str | None:
    """The S3 endpoint URL from the environment, or None for AWS itself."""
    for var in ENDPOINT_VARS:
        if os.environ.get(var):
            return os.environ[var]
    return None


def is_remote(url: str) -> bool:
    """True for URLs with a non-local protocol (s3://, gs://, memory://, ...)."""
    proto = url.split("://", 1)[0] if "://" in url else "file"
    return proto not in ("file", "local")


@dataclass(frozen=True)
class S3ClientSettings:
    """How long an S3 request may wait and how often it is tried (from the environment)."""

    connect_timeout: float
    read_timeout: float
    max_attempts: int
    retry_mode: str

    @property
    def worst_case_s(self) -> float:
        """About the longest one storage call waits on an endpoint that accepts connections and never answers."""
        backoff = sum(min(2.0 ** i, 20.0) for i in range(self.max_attempts - 1))  # botocore: at most 2**i s
        return S3FS_RETRIES * (self.max_attempts * self.read_timeout + backoff) + 0.1 * (S3FS_RETRIES - 1)

    def config_kwargs(self) -> dict[str, Any]:
        """``botocore.config.Config`` arguments (s3fs's ``config_kwargs``)."""
        return {"connect_timeout": self.connect_timeout, "read_timeout": self.read_timeout,
                "retries": {"total_max_attempts": self.max_attempts, "mode": self.retry_mode}}


def _env_seconds(var: str, default: float) -> float:
    raw = os.environ.get(var, "").strip()
    if not raw:
        return default
    try:
        value = float(raw)
    except ValueError:
        value = math.nan
    if not (math.isfinite(value) and 0 < value <= 3600):
        raise ConfigError(f"{var}={raw!r}: must be a number of seconds above 0 and at most 3600 "
                          f"(default {default:g}); fix or unset it")
    return value


def _env_attempts(default: int) -> int:
    for var in ("CAI_S3_MAX_ATTEMPTS", "AWS_MAX_ATTEMPTS"):
        raw = os.environ.get(var, "").strip()
        if not raw:
            continue
        if not (raw.isdigit() and 1 <= int(raw) <= 20):
            raise ConfigError(f"{var}={raw!r}: must be a whole number of attempts from 1 to 20 "
                              f"(default {default}); fix or unset it")
        return int(raw)
    return default


def s3_client_settings() -> S3ClientSettings:
    """Timeouts and attempts for S3 requests: ``CAI_S3_CONNECT_TIMEOUT``, ``CAI_S3_READ_TIMEOUT`` (seconds; the
    read timeout bounds each socket read, not a whole object), ``CAI_S3_MAX_ATTEMPTS`` (else ``AWS_MAX_ATTEMPTS``)
    and ``AWS_RETRY_MODE`` (default ``standard``). A bad value is a ConfigError naming the variable."""
    mode = os.environ.get("AWS_RETRY_MODE", "").strip() or "standard"
    if mode not in ("standard", "adaptive", "legacy"):
        raise ConfigError(f"AWS_RETRY_MODE={mode!r}: must be standard, adaptive or legacy; fix or unset it")
    return S3ClientSettings(connect_timeout=_env_seconds("CAI_S3_CONNECT_TIMEOUT", DEFAULT_CONNECT_TIMEOUT),
                            read_timeout=_env_seconds("CAI_S3_READ_TIMEOUT", DEFAULT_READ_TIMEOUT),
                            max_attempts=_env_attempts(DEFAULT_MAX_ATTEMPTS), retry_mode=mode)


def _drop_expect_continue(params: dict[str, Any], **_: Any) -> None:
    params.get("headers", {}).pop("Expect", None)


def _bound_puts(url: str, fs: Any) -> None:
    """botocore asks ``Expect: 100-continue`` on every S3 PUT with a body, and aiohttp waits for that interim
    answer with no timeout at all: a PUT to an endpoint that never answers would hang for ever. s3fs's client
    sends PUTs without the header instead (the body goes at once; the read timeout bounds the wait for the
    answer). Registered once per client, after botocore's own handler."""
    try:
        client = fs.s3  # s3fs's client, made on first use
    except _REMOTE_ERRORS as exc:
        raise storage_error(url, exc, "connect to S3") from exc
    if getattr(fs, "_cai_bounded_client", None) is not client:
        client.meta.events.register("before-call.s3", _drop_expect_continue, unique_id="cai-no-expect-continue")
        fs._cai_bounded_client = client


def _is_s3(url: str) -> bool:
    return url.startswith(("s3://", "s3a://"))


def storage_options(url: str) -> dict[str, Any]:
    """fsspec options for ``url``: for s3:// URLs the configured endpoint and the timeouts and attempts of
    :func:`s3_client_settings` (s3fs ``config_kwargs``)."""
    if _is_s3(url):
        opts: dict[str, Any] = {"config_kwargs": s3_client_settings().config_kwargs()}
        endpoint = s3_endpoint()
        if endpoint:
            opts["endpoint_url"] = endpoint
        return opts
    return {}


def expand(url: str) -> str:
    """``url`` with ``~`` and ``$VAR`` / ``${VAR}`` expanded when it is a local path or ``file://`` URL.

    Remote URLs come back unchanged. Unset variables are left as written (``os.path.expandvars``). A NUL
    byte, which no filesystem or object store accepts, is a StorageError naming the path.
    """
    if "\x00" in url:
        raise StorageError(f"{url!r}: a path cannot contain a NUL byte")
    if is_remote(url):
        return url
    for proto in ("file://", "local://"):
        if url.startswith(proto):
            return proto + _expand_path(url[len(proto):])
    return _expand_path(url)


def _expand_path(path: str) -> str:
    return os.path.expanduser(os.path.expandvars(path)) if ("~" in path or "$" in path) else path


def filesystem(url: str) -> tuple[fsspec.AbstractFileSystem, str]:
    """The fsspec filesystem for ``url`` and the path within it (``~`` and ``$VAR`` expanded in local paths)."""
    url = expand(url)
    fs, path = url_to_fs(url, **storage_options(url))
    if _is_s3(url):
        fs.retries = S3FS_RETRIES  # not an s3fs option: an attribute of the (cached) filesystem
        _bound_puts(url, fs)
    return fs, path


def _one_line(exc: BaseException) -> str:
    return " ".join(str(exc).split()) or type(exc).__name__


def storage_error(url: str, exc: BaseException, doing: str = "write") -> StorageError:
    """The one-line StorageError for ``exc``, raised while trying to ``doing`` (read, write, list...) ``url``.

    A full disk or quota, a read-only filesystem, a refused permission and an S3 endpoint that does not answer
    each get their own message naming ``url`` and what to do; anything else is ``URL: cannot DOING (reason)``.
    """
    if isinstance(exc, StorageError):
        return exc
    code = getattr(exc, "errno", None)
    if code in (errno.ENOSPC, errno.EDQUOT):
        return StorageError(f"no space left on {url}: free space (or raise the quota) there, or write "
                            "somewhere else, then run again")
    if code == errno.EROFS:
        return StorageError(f"{url} is read-only: cannot {doing} there; use a writable location (or remount "
                            "it read-write), then run again")
    if code in (errno.EACCES, errno.EPERM) or isinstance(exc, PermissionError):
        return StorageError(f"permission denied: {url} (cannot {doing}): fix its permissions or credentials, "
                            "or use another location")
    if isinstance(exc, _TIMEOUTS):
        return StorageError(_timeout_message(url, doing))
    if isinstance(exc, _UNREACHABLE):
        return StorageError(f"{url}: cannot {doing}: cannot reach the S3 endpoint {_endpoint_name()} "
                            f"({_one_line(exc)}); check CAI_S3_ENDPOINT and the network")
    return StorageError(f"{url}: cannot {doing} ({_one_line(exc)})")


def _endpoint_name() -> str:
    return s3_endpoint() or "AWS S3 (no CAI_S3_ENDPOINT set)"


def _timeout_message(url: str, doing: str) -> str:
    try:
        cfg = s3_client_settings()
        limits = (f"connect timeout {cfg.connect_timeout:g} s, read timeout {cfg.read_timeout:g} s, "
                  f"{cfg.max_attempts} attempt(s) x {S3FS_RETRIES}")
    except ConfigError:
        limits = "timed out"
    return (f"{url}: cannot {doing}: the S3 endpoint {_endpoint_name()} did not answer ({limits}); check the "
            "endpoint and the network, or raise CAI_S3_READ_TIMEOUT / CAI_S3_MAX_ATTEMPTS")


def _protocol(url: str) -> str:
    return url.split("://", 1)[0] + "://" if "://" in url else ""


def join(url: str, *parts: str) -> str:
    """Join path parts onto a URL with '/' (works for local paths and s3://)."""
    out = url.rstrip("/") if url not in ("/", "") else url
    for part in parts:
        part = str(part).strip("/")
        if part:
            out = f"{out}/{part}" if out else part
    return out


def basename(url: str) -> str:
    """The last path component of a URL."""
    return url.rstrip("/").rsplit("/", 1)[-1]


def local_path(url: str) -> str | None:
    """The local filesystem path behind ``url`` (``~`` and ``$VAR`` expanded), or None for remote URLs."""
    if is_remote(url):
        return None
    url = expand(url)
    for proto in ("file://", "local://"):
        if url.startswith(proto):
            return url[len(proto):]
    return url


def natural_key(name: str) -> list:
    """Sort key that orders embedded numbers numerically: 2.pt before 10.pt."""
    return [int(tok) if tok.isdigit() else tok for tok in re.split(r"(\d+)", name)]


def exists(url: str) -> bool:
    """True if a file or directory exists at ``url``."""
    fs, path = filesystem(url)
    try:
        fs.invalidate_cache(path)
    except Exception:  # noqa: BLE001 - not every filesystem caches
        pass
    try:
        return fs.exists(path)
    except _REMOTE_ERRORS as exc:
        raise storage_error(url, exc, "check existence") from exc


def read_bytes(url: str) -> bytes:
    """Read a whole object; StorageError names the URL when it is missing or unreadable."""
    fs, path = filesystem(url)
    try:
        return fs.cat_file(path)  # one GET (fs.open would HEAD first)
    except FileNotFoundError as exc:
        raise StorageError(f"{url}: no such file") from exc
    except IsADirectoryError as exc:
        raise StorageError(f"{url}: is a directory, expected a file") from exc
    except _REMOTE_ERRORS as exc:
        raise storage_error(url, exc, "read") from exc


def map_urls(fn: Callable[[str], Any], urls: Iterable[str], threads: int = 16) -> list[Any]:
    """``[fn(url) for url in urls]`` with up to ``threads`` requests in flight (object stores reward
    parallel requests); results keep the order of ``urls``, exceptions are returned in place of results."""
    def call(url: str) -> Any:
        try:
            return fn(url)
        except Exception as exc:  # noqa: BLE001 - handed back to the caller, who names the URL
            return exc

    urls = list(urls)
    if len(urls) <= 1:
        return [call(u) for u in urls]
    with ThreadPoolExecutor(max_workers=min(threads, len(urls))) as pool:
        return list(pool.map(call, urls))


def write_bytes(url: str, data: bytes) -> None:
    """Write an object atomically: readers see the old object or the whole new one, never a part.

    Local files go through :class:`AtomicWriter` (a temporary name in the same folder, fsynced, renamed); an S3
    PUT is atomic.
    """
    if local_path(url) is not None:
        with AtomicWriter(url) as out:
            out.write(data)
        return
    try:
        fs, path = filesystem(url)
        fs.pipe_file(path, data)
    except _REMOTE_ERRORS as exc:
        raise storage_error(url, exc, "write") from exc


class AtomicWriter:
    """A file written in pieces (``write`` or the file object ``fh``) that appears at ``url`` only on
    :meth:`commit`: locally a temporary file in the same folder with the usual permissions, fsynced and renamed;
    on S3 an fsspec file, whose multipart upload completes at commit. :meth:`abort` discards it, so readers see
    the old object or the whole new one. As a context manager it commits, or aborts on an exception.

    Any failure (opening, writing, fsync, close, rename) aborts first, so no temporary file is left, and raises
    the one-line :func:`storage_error` naming ``url``; :meth:`abort` itself never raises."""

    def __init__(self, url: str):
        self.url = url
        self._tmp: str | None = None
        self._final: str | None = local_path(url)
        self.fh: Any = None
        with self._aborting_on_error():
            if self._final is not None:
                folder = os.path.dirname(os.path.abspath(self._final))
                os.makedirs(folder, exist_ok=True)
                fd, self._tmp = tempfile.mkstemp(prefix=".tmp-", dir=folder)
                self.fh = os.fdopen(fd, "wb")
                os.fchmod(fd, 0o666 & ~_UMASK)  # mkstemp makes 0600; give the file the usual permissions
            else:
                fs, path = filesystem(url)
                self.fh = fs.open(path, "wb")

    def write(self, data: bytes) -> None:
        with self._aborting_on_error():
            self.fh.write(data)

    def commit(self) -> None:
        """Make the written bytes the object at ``url``."""
        with self._aborting_on_error():
            if self._tmp is not None:
                self.fh.flush()
                os.fsync(self.fh.fileno())  # never an empty file under the final name after a crash
                self.fh.close()
                os.replace(self._tmp, self._final)
                self._tmp = None
            else:
                self.fh.close()  # completes the upload: the object appears now
            self.fh = None

    def abort(self) -> None:
        """Discard what was written (remove the temporary file, or abort the upload). Never raises: it runs
        while another error is on its way, which must reach the user unmasked."""
        fh, self.fh = self.fh, None
        tmp, self._tmp = self._tmp, None
        if tmp is not None:
            if fh is not None:
                try:
                    fh.close()  # flushes what is buffered, which can fail again (ENOSPC); the fd is closed anyway
                except Exception:  # noqa: BLE001 - the file is being thrown away
                    pass
            try:
                os.unlink(tmp)
            except OSError:
                pass  # already gone, or the folder turned read-only: nothing more can be done
        elif fh is not None:  # not committed (a failed close has already marked it closed)
            try:
                fh.discard()  # s3fs: abort the multipart upload
            except Exception:  # noqa: BLE001 - an upload left incomplete is never visible
                pass
            finally:
                fh.closed = True  # never completed later (fsspec closes files when collected)

    @contextlib.contextmanager
    def _aborting_on_error(self) -> Iterator[None]:
        try:
            yield
        except BaseException as exc:
            self.abort()
            if isinstance(exc, _REMOTE_ERRORS) and not isinstance(exc, CaiError):
                raise storage_error(self.url, exc, "write") from exc
            raise

    def __enter__(self) -> "AtomicWriter":
        return self

    def __exit__(self, exc_type: Any, *exc: Any) -> None:
        if exc_type is None:
            self.commit()
        else:
            self.abort()


def read_json(url: str) -> Any:
    """Read and parse a JSON object; errors name the URL."""
    return parse_json(url, read_bytes(url))


def parse_json(url: str, raw: bytes) -> Any:
    """``raw`` (the bytes of ``url``) parsed as JSON; StorageError naming the URL when it is not."""
    try:
        return json.loads(raw)
    except (UnicodeDecodeError, json.JSONDecodeError) as exc:
        raise StorageError(f"{url}: not valid JSON ({exc})") from exc


def write_json(url: str, obj: Any, indent: int | None = 1) -> None:
    """Serialise ``obj`` as JSON and write it atomically."""
    write_bytes(url, json.dumps(obj, indent=indent, default=_json_default).encode())


def _json_default(obj: Any) -> Any:
    if hasattr(obj, "tolist"):
        return obj.tolist()
    if hasattr(obj, "__fspath__"):
        return os.fspath(obj)
    raise TypeError(f"not JSON serialisable: {type(obj).__name__}")


def list_files(url: str, suffixes: Iterable[str] | str | None = None, recursive: bool = False) -> list[str]:
    """List the files under a folder URL (paginated on S3), as full URLs in natural numeric order.

    Returns an empty list when the folder does not exist.
    """
    return [u for u, _ in list_files_with_sizes(url, suffixes, recursive)]


def list_files_with_sizes(url: str, suffixes: Iterable[str] | str | None = None,
                          recursive: bool = False) -> list[tuple[str, int]]:
    """Like :func:`list_files`, with each file's size in bytes: ``[(url, size), ...]``."""
    return [(u, n) for u, n, _ in list_files_with_info(url, suffixes, recursive)]


def list_files_with_info(url: str, suffixes: Iterable[str] | str | None = None,
                         recursive: bool = False) -> list[tuple[str, int, str | None]]:
    """Like :func:`list_files`, with each file's size and :func:`fingerprint`: ``[(url, size, fingerprint)]``."""
    fs, path = filesystem(url)
    if isinstance(suffixes, str):
        suffixes = (suffixes,)
    try:
        fs.invalidate_cache(path)
    except Exception:  # noqa: BLE001
        pass
    try:
        if recursive:
            found = fs.find(path, detail=True)
            entries = [(name, info) for name, info in found.items() if info.get("type") != "directory"]
        else:
            entries = [(e["name"], e) for e in fs.ls(path, detail=True) if e.get("type") != "directory"]
    except FileNotFoundError:
        return []
    except _REMOTE_ERRORS as exc:
        raise storage_error(url, exc, "list") from exc
    proto = _protocol(url)
    out = []
    for name, info in entries:
        if suffixes and not any(name.endswith(s) for s in suffixes):
            continue
        full = proto + name if proto and not name.startswith(proto) else name
        out.append((full, int(info.get("size") or 0), fingerprint(info)))
    return sorted(out, key=lambda item: natural_key(item[0]))


def fingerprint(info: dict[str, Any]) -> str | None:
    """A cheap content fingerprint from a listing or stat entry: ``etag:...`` on S3, ``mtime:...`` locally
    (``modified:...`` where only a timestamp is known); None when the entry has neither. A file replaced by a
    same-named, same-sized one gets another fingerprint."""
    tag = info.get("ETag") or info.get("etag")
    if tag:
        return f"etag:{str(tag).strip(chr(34))}"
    if info.get("mtime") is not None:
        return f"mtime:{float(info['mtime']):.6f}"
    if info.get("LastModified") is not None:
        return f"modified:{info['LastModified']}"
    return None


def size(url: str) -> int | None:
    """Size in bytes of the file at ``url``, or None when there is no such file."""
    found = file_info(url)
    return None if found is None else found[0]


def file_info(url: str) -> tuple[int, str | None] | None:
    """(size in bytes, :func:`fingerprint`) of the file at ``url``, or None when there is no such file."""
    fs, path = filesystem(url)
    try:
        fs.invalidate_cache(path)
    except Exception:  # noqa: BLE001
        pass
    try:
        info = fs.info(path)
    except FileNotFoundError:
        return None
    except _REMOTE_ERRORS as exc:
        raise storage_error(url, exc, "stat") from exc
    if info.get("type") == "directory":
        return None
    return int(info.get("size") or 0), fingerprint(info)


def remove(url: str, recursive: bool = False) -> None:
    """Delete the file at ``url``, or with recursive=True also everything inside the folder ``url`` (on S3: the
    object ``url`` and every key starting with ``url/``). The name is literal: ``run[1]`` never removes ``run1``.
    A missing target is not an error. A folder is never removed without recursive=True: locally that is a
    StorageError naming it (on S3, where a folder is not an object, deleting it is the no-op it is for any
    missing object, or the same StorageError where the server refuses)."""
    try:
        path = local_path(url)
        if path is not None:
            _remove_local(url, path, recursive)
            return
        fs, key = filesystem(url)
        if recursive:
            _remove_tree_remote(url, fs, key.rstrip("/"))
        else:
            _remove_file_remote(url, fs, key)
    except FileNotFoundError:
        pass
    except _REMOTE_ERRORS as exc:
        raise storage_error(url, exc, "remove") from exc


def _remove_local(url: str, path: str, recursive: bool) -> None:
    path = os.path.abspath(path)
    if os.path.isdir(path) and not os.path.islink(path):
        if not recursive:
            raise StorageError(f"{url}: is a folder, not removed (remove(url, recursive=True) removes folders)")
        if os.path.dirname(path) == path:
            raise StorageError(f"{url}: refusing to remove the root of a filesystem")
        shutil.rmtree(path)
    else:
        os.remove(path)  # a link is removed, never what it points to


def _remove_file_remote(url: str, fs: Any, key: str) -> None:
    try:
        fs.rm_file(key)  # one exact name; fs.rm would expand patterns
    except FileNotFoundError:
        raise
    except OSError:
        if fs.isdir(key):  # some servers refuse to delete a "folder" key; say what it is, like locally
            raise StorageError(f"{url}: is a folder, not removed (remove(url, recursive=True) removes folders)")
        raise


def _remove_tree_remote(url: str, fs: fsspec.AbstractFileSystem, key: str) -> None:
    if not hasattr(fs, "call_s3"):
        names = [n for n in fs.find(key) if n == key or n.startswith(key + "/")]
        for name in names:
            fs.rm_file(name)
        return
    bucket, _, prefix = key.partition("/")
    keys = _s3_keys(fs, bucket, prefix + "/" if prefix else "")
    if prefix and _s3_object_exists(fs, bucket, prefix):
        keys.append(prefix)
    try:
        for i in range(0, len(keys), 1000):
            _s3_delete(url, fs, bucket, keys[i:i + 1000])
    finally:
        fs.invalidate_cache(key)


def _s3_keys(fs: Any, bucket: str, prefix: str) -> list[str]:
    """Every key starting with ``prefix`` (a literal string, paged through ListObjectsV2)."""
    keys: list[str] = []
    kwargs: dict[str, Any] = {"Bucket": bucket, "Prefix": prefix}
    while True:
        page = fs.call_s3("list_objects_v2", **kwargs)
        keys += [c["Key"] for c in page.get("Contents", []) if c["Key"].startswith(prefix)]
        if not page.get("IsTruncated"):
            return keys
        kwargs["ContinuationToken"] = page["NextContinuationToken"]


def _s3_object_exists(fs: Any, bucket: str, key: str) -> bool:
    try:
        fs.call_s3("head_object", Bucket=bucket, Key=key)
    except FileNotFoundError:
        return False
    return True


def _s3_delete(url: str, fs: Any, bucket: str, keys: list[str]) -> None:
    out = fs.call_s3("delete_objects", Bucket=bucket, Delete={"Objects": [{"Key": k} for k in keys], "Quiet": True})
    failed = [e for e in out.get("Errors", []) if e.get("Code") != "NoSuchKey"]
    if failed:
        first = failed[0]
        more = f" and {len(failed) - 1} more" if len(failed) > 1 else ""
        raise StorageError(f"{url}: cannot remove s3://{bucket}/{first.get('Key')}{more} "
                           f"({first.get('Code')}: {first.get('Message')})")


# Bulk reads and streamed writes (summarize reads every rank's outputs and writes one Parquet file).

class _KeepOpen:
    """A write-only view of a file object whose ``close`` does not close it (pyarrow closes its sink when the
    Parquet writer closes; committing or discarding the file is :class:`StreamedParquet`'s decision)."""

    def __init__(self, fh: Any) -> None:
        self._fh = fh
        self.closed = False

    def write(self, data: Any) -> int:
        return self._fh.write(data)

    def tell(self) -> int:
        return self._fh.tell()

    def flush(self) -> None:
        self._fh.flush()

    def writable(self) -> bool:
        return True

    def close(self) -> None:
        self.closed = True


class StreamedParquet:
    """A Parquet file written table by table through :class:`AtomicWriter`, so it appears on :meth:`commit`, and
    :meth:`abort` leaves the old file: readers never see a part."""

    def __init__(self, url: str, schema: Any, row_group_rows: int = 1024 * 1024) -> None:
        import pyarrow.parquet as pq

        self.url, self.row_group_rows = url, row_group_rows
        self._out = AtomicWriter(url)
        try:
            self._writer = pq.ParquetWriter(_KeepOpen(self._out.fh), schema)
        except REMOTE_ERRORS as exc:
            self._out.abort()
            raise storage_error(url, exc, "write") from exc

    def write(self, table: Any) -> None:
        try:
            self._writer.write_table(table, row_group_size=self.row_group_rows)
        except REMOTE_ERRORS as exc:
            raise storage_error(self.url, exc, "write") from exc

    def commit(self) -> None:
        try:
            self._writer.close()
        except REMOTE_ERRORS as exc:
            self._out.abort()
            raise storage_error(self.url, exc, "write") from exc
        self._out.commit()

    def abort(self) -> None:
        writer = getattr(self, "_writer", None)
        if writer is not None and writer.is_open:
            try:
                writer.close()  # into the view only; the file itself is discarded below
            except Exception:  # noqa: BLE001 - already failing; the file is thrown away
                pass
        self._out.abort()


class BulkReader:
    """Whole-object reads of many small objects (summarize's records and predictions): local files directly, S3
    objects through pyarrow's S3 client.

    Summarize reads two small objects per rank (its record and its predictions); through s3fs each GET costs
    about 2.5 ms of Python CPU under the GIL, which alone is about 50 s at 10,240 ranks. pyarrow's C++ client
    does the same GETs with a quarter of the CPU and without the GIL. It is configured like ``storage`` (the
    endpoint from :func:`s3_endpoint`, credentials from the standard AWS chain) and used only to read:
    any failure falls back to :func:`read_bytes` for that object, so errors, retries and messages are
    this module's; after a few failures that storage then read fine, the fast path is switched off for the run."""

    FALLBACKS_BEFORE_OFF = 4

    def __init__(self, url: str) -> None:
        self._fs = arrow_s3(url) if url.startswith(("s3://", "s3a://")) else None
        self._fallbacks = 0

    def read_bytes(self, url: str) -> bytes:
        fs = self._fs
        if fs is not None:
            try:
                with fs.open_input_stream(url.split("://", 1)[1], compression=None) as fh:
                    return fh.read()
            except Exception:  # noqa: BLE001 - storage reads it again and names the problem its own way
                data = read_bytes(url)
                self._fallbacks += 1
                if self._fallbacks >= self.FALLBACKS_BEFORE_OFF:
                    self._fs = None
                return data
        return read_bytes(url)

    def read_json(self, url: str) -> Any:
        return parse_json(url, self.read_bytes(url))

    def read_table(self, url: str) -> Any:
        """One rank's predictions table, whole (a damaged file fails here, before anything of it is used)."""
        import pyarrow as pa
        import pyarrow.parquet as pq

        path = local_path(url)
        source = path if path is not None else pa.BufferReader(self.read_bytes(url))
        return pq.read_table(source, use_threads=False)


def arrow_s3(url: str) -> Any:
    """A pyarrow S3FileSystem for reading ``url``'s bucket, or None when pyarrow cannot make one here."""
    try:
        import pyarrow.fs as pafs

        settings = s3_client_settings()  # the same timeouts and attempts as every other S3 call
        opts: dict[str, Any] = {"allow_delayed_open": True, "connect_timeout": settings.connect_timeout,
                                "request_timeout": settings.read_timeout,
                                "retry_strategy": pafs.AwsStandardS3RetryStrategy(max_attempts=settings.max_attempts)}
        endpoint = s3_endpoint()
        region = os.environ.get("AWS_REGION") or os.environ.get("AWS_DEFAULT_REGION")
        if endpoint:
            parts = urlsplit(endpoint if "://" in endpoint else f"https://{endpoint}")
            opts.update(endpoint_override=parts.netloc + parts.path.rstrip("/"), scheme=parts.scheme or "https")
        elif not region:
            region = pafs.resolve_s3_region(url.split("://", 1)[1].split("/", 1)[0])
        if region:
            opts["region"] = region
        return pafs.S3FileSystem(**opts)
    except Exception:  # noqa: BLE001 - no S3 support in this pyarrow, no region...: storage reads everything
        return None


def read_ahead(fn: Any, urls: list[str], ahead: int = 32, threads: int = 16) -> Any:
    """``fn(url)`` for each url, yielded in order, with at most ``ahead`` calls started and not yet consumed
    (on ``threads`` threads); an exception is yielded in place of its result."""
    if not urls:
        return
    pool = ThreadPoolExecutor(max_workers=max(1, min(threads, len(urls))), thread_name_prefix="cai-read-ahead")
    pending: deque = deque()
    try:
        it = iter(urls)
        for url in itertools.islice(it, ahead):
            pending.append(pool.submit(fn, url))
        while pending:
            future = pending.popleft()
            nxt = next(it, None)
            if nxt is not None:
                pending.append(pool.submit(fn, nxt))
            try:
                result = future.result()
            except Exception as exc:  # noqa: BLE001 - handed back to the caller, who names the URL
                result = exc
            yield result
    finally:
        for future in pending:
            future.cancel()
        pool.shutdown(wait=True, cancel_futures=True)
