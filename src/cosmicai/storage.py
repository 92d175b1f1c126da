"""URL-based storage over fsspec: local paths, ``file://``, ``s3://bucket/prefix`` and any S3-compatible endpoint.

The S3 endpoint is taken, in order, from ``CAI_S3_ENDPOINT``, ``AWS_ENDPOINT_URL_S3`` or ``AWS_ENDPOINT_URL``
(unset means real AWS). Listings go through s3fs, which pages through ``ListObjectsV2`` (never one
unpaginated call), so more than 1,000 objects are always seen.

Local paths and ``file://`` URLs have ``~`` and environment variables (``$VAR``, ``${VAR}``) expanded where
they are resolved (:func:`local_path`, :func:`filesystem`), so every reader and writer sees the same file:
``~/data`` is ``$HOME/data`` for both, never a folder named ``~``. Remote URLs (``s3://`` ...) are left as they
are: ``~`` and ``$`` are ordinary characters in an object key. A path holding a NUL byte is refused.
(So a local file whose name literally holds ``$NAME``, with NAME set in the environment, cannot be named.)
"""

from __future__ import annotations

import json
import os
import re
import tempfile
import uuid
from concurrent.futures import ThreadPoolExecutor
from typing import Any, Callable, Iterable

import fsspec
from fsspec.core import url_to_fs

from .errors import StorageError

#: Where the S3 endpoint comes from, first set wins (the one list: the Dask backend forwards these to its workers).
ENDPOINT_VARS = ("CAI_S3_ENDPOINT", "AWS_ENDPOINT_URL_S3", "AWS_ENDPOINT_URL")


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


def storage_options(url: str) -> dict[str, Any]:
    """fsspec options for ``url``: the configured S3 endpoint for s3:// URLs."""
    if url.startswith(("s3://", "s3a://")):
        opts: dict[str, Any] = {}
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
    return fs, path


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
        raise StorageError(f"{url}: cannot check existence ({exc})") from exc


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
        raise StorageError(f"{url}: cannot read ({exc})") from exc


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
        raise StorageError(f"{url}: cannot write ({exc})") from exc


class AtomicWriter:
    """A file written in pieces (``write`` or the file object ``fh``) that appears at ``url`` only on
    :meth:`commit`: locally a temporary file in the same folder with the usual permissions, fsynced and renamed;
    on S3 an fsspec file, whose multipart upload completes at commit. :meth:`abort` discards it, so readers see
    the old object or the whole new one. As a context manager it commits, or aborts on an exception."""

    def __init__(self, url: str):
        self.url = url
        self._tmp: str | None = None
        self._final: str | None = local_path(url)
        self.fh: Any = None
        try:
            if self._final is not None:
                folder = os.path.dirname(os.path.abspath(self._final))
                os.makedirs(folder, exist_ok=True)
                fd, self._tmp = tempfile.mkstemp(prefix=".tmp-", dir=folder)
                os.fchmod(fd, 0o666 & ~_UMASK)  # mkstemp makes 0600; give the file the usual permissions
                self.fh = os.fdopen(fd, "wb")
            else:
                fs, path = filesystem(url)
                self.fh = fs.open(path, "wb")
        except _REMOTE_ERRORS as exc:
            self.abort()
            raise StorageError(f"{url}: cannot write ({exc})") from exc

    def write(self, data: bytes) -> None:
        try:
            self.fh.write(data)
        except _REMOTE_ERRORS as exc:
            raise StorageError(f"{self.url}: cannot write ({exc})") from exc

    def commit(self) -> None:
        """Make the written bytes the object at ``url``."""
        try:
            if self._tmp is not None:
                self.fh.flush()
                os.fsync(self.fh.fileno())  # never an empty file under the final name after a crash
                self.fh.close()
                os.replace(self._tmp, self._final)
                self._tmp = None
            else:
                self.fh.close()  # completes the upload: the object appears now
            self.fh = None
        except _REMOTE_ERRORS as exc:
            self.abort()
            raise StorageError(f"{self.url}: cannot write ({exc})") from exc

    def abort(self) -> None:
        """Discard what was written (remove the temporary file, or abort the upload)."""
        fh, self.fh = self.fh, None
        if self._tmp is not None:
            if fh is not None:
                fh.close()
            if os.path.exists(self._tmp):
                os.unlink(self._tmp)
            self._tmp = None
        elif fh is not None and not fh.closed:
            try:
                fh.discard()  # s3fs: abort the multipart upload
            finally:
                fh.closed = True  # never completed later (fsspec closes files when collected)

    def __enter__(self) -> "AtomicWriter":
        return self

    def __exit__(self, exc_type: Any, *exc: Any) -> None:
        if exc_type is None:
            self.commit()
        else:
            self.abort()


def read_json(url: str) -> Any:
    """Read and parse a JSON object; errors name the URL."""
    raw = read_bytes(url)
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
        raise StorageError(f"{url}: cannot list ({exc})") from exc
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
        raise StorageError(f"{url}: cannot stat ({exc})") from exc
    if info.get("type") == "directory":
        return None
    return int(info.get("size") or 0), fingerprint(info)


def remove(url: str, recursive: bool = False) -> None:
    """Delete a file (or a folder with recursive=True); a missing target is not an error."""
    fs, path = filesystem(url)
    try:
        fs.rm(path, recursive=recursive)
    except FileNotFoundError:
        pass
    except _REMOTE_ERRORS as exc:
        raise StorageError(f"{url}: cannot remove ({exc})") from exc


def unique_suffix() -> str:
    """A short random token for temporary names."""
    return uuid.uuid4().hex[:12]
