"""Fault injection helpers for the reliability suite (tests/test_faults*.py).

:class:`FaultProxy` is a threaded HTTP proxy on 127.0.0.1 in front of a real S3 server. It fails the first K
requests that match a :class:`Rule` with a given status and an S3 XML error body (``SlowDown``,
``InternalError``, ``ServiceUnavailable``...) or by dropping the connection, and forwards every other request
unchanged: method, path, headers (``Host`` included, so SigV4 signatures made for the proxy's address still
verify upstream) and body. Responses come back with the upstream status line, headers and body (a chunked body
is re-sent as one chunk). Point a client at ``proxy.endpoint`` instead of the server's.

The module also holds the two plug-in models the suite uses where timing must be controlled or inference cost
must vanish (loaded by cosmicai's ``package.module:factory`` model names, with ``tests/`` on ``sys.path``), and
:func:`ledger`, which appends one JSON line per injected fault to ``$CAI_RELIABILITY_LOG`` when it is set
(``scripts/reliability_report.py`` reads it back into the figures of ``docs/reliability.md``).
"""

from __future__ import annotations

import http.client
import json
import os
import re
import socket
import threading
import time
from dataclasses import dataclass, field
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Any
from urllib.parse import urlsplit

import numpy as np

S3_MESSAGES = {
    "SlowDown": "Please reduce your request rate.",
    "InternalError": "We encountered an internal error. Please try again.",
    "ServiceUnavailable": "Service is unable to handle request.",
}


@dataclass
class Rule:
    """Fail the first ``times`` requests whose method and path (with query) match.

    ``status`` None drops the connection without answering (a network reset); otherwise the proxy answers
    ``status`` with an S3 ``<Error>`` body carrying ``code``.
    """

    method: str | None = None
    path: str = ".*"
    status: int | None = 503
    code: str = "SlowDown"
    times: int = 1
    hits: int = 0
    failed: int = 0
    _pattern: re.Pattern = field(init=False, repr=False)

    def __post_init__(self) -> None:
        self._pattern = re.compile(self.path)

    def matches(self, method: str, path: str) -> bool:
        return (self.method is None or self.method == method) and bool(self._pattern.search(path))


class FaultProxy:
    """Threaded fault-injecting HTTP proxy; use as a context manager or call :meth:`start` / :meth:`close`."""

    def __init__(self, upstream: str) -> None:
        parts = urlsplit(upstream)
        self.upstream_host = parts.hostname or "127.0.0.1"
        self.upstream_port = parts.port or 80
        self.rules: list[Rule] = []
        #: (method, path, status sent or None when dropped, injected?) for every request, in order.
        self.log: list[tuple[str, str, int | None, bool]] = []
        self._lock = threading.Lock()
        self._injected = 0
        self._server: ThreadingHTTPServer | None = None
        self._thread: threading.Thread | None = None

    @property
    def endpoint(self) -> str:
        assert self._server is not None, "proxy not started"
        return f"http://127.0.0.1:{self._server.server_address[1]}"

    def add_rule(self, method: str | None = None, path: str = ".*", status: int | None = 503,
                 code: str = "SlowDown", times: int = 1) -> Rule:
        """Add a rule (see :class:`Rule`); rules are tried in the order added, the first one matching that still
        has failures left fails the request."""
        rule = Rule(method=method, path=path, status=status, code=code, times=times)
        with self._lock:
            self.rules.append(rule)
        return rule

    def clear(self) -> None:
        """Remove every rule: from now on everything is forwarded."""
        with self._lock:
            self.rules.clear()

    @property
    def injected(self) -> int:
        """Requests failed on purpose so far (by any rule, including removed ones)."""
        with self._lock:
            return self._injected

    def forwarded(self, method: str | None = None, path: str = ".*") -> int:
        """Requests forwarded upstream (optionally only those matching ``method``/``path``)."""
        pattern = re.compile(path)
        with self._lock:
            return sum(1 for m, p, s, f in self.log if not f and (method is None or m == method)
                       and pattern.search(p))

    def _decide(self, method: str, path: str) -> Rule | None:
        with self._lock:
            for rule in self.rules:
                if rule.matches(method, path):
                    rule.hits += 1
                    if rule.failed < rule.times:
                        rule.failed += 1
                        self._injected += 1
                        return rule
        return None

    def _record(self, method: str, path: str, status: int | None, injected: bool = False) -> None:
        with self._lock:
            self.log.append((method, path, status, injected))

    def start(self) -> "FaultProxy":
        proxy = self

        class Handler(_ProxyHandler):
            owner = proxy

        self._server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self._server.daemon_threads = True
        self._thread = threading.Thread(target=self._server.serve_forever, name="faultproxy", daemon=True)
        self._thread.start()
        return self

    def close(self) -> None:
        if self._server is not None:
            self._server.shutdown()
            self._server.server_close()
            self._server = None

    def __enter__(self) -> "FaultProxy":
        return self.start()

    def __exit__(self, *exc: object) -> None:
        self.close()


def s3_error_body(code: str, resource: str, request_id: str) -> bytes:
    """The XML body S3 sends with an error status."""
    message = S3_MESSAGES.get(code, code)
    return (f'<?xml version="1.0" encoding="UTF-8"?>\n<Error><Code>{code}</Code><Message>{message}</Message>'
            f"<Resource>{resource}</Resource><RequestId>{request_id}</RequestId></Error>").encode()


class _ProxyHandler(BaseHTTPRequestHandler):
    owner: FaultProxy
    protocol_version = "HTTP/1.1"

    def log_message(self, format: str, *args: Any) -> None:  # noqa: A002 - quiet
        pass

    def _read_body(self) -> bytes:
        """The request body exactly as sent (Content-Length or raw chunked framing)."""
        if "chunked" in (self.headers.get("Transfer-Encoding") or "").lower():
            raw = bytearray()
            while True:
                line = self.rfile.readline()
                raw += line
                size = int(line.split(b";", 1)[0].strip() or b"0", 16)
                if size == 0:
                    while True:  # trailers up to the blank line
                        trailer = self.rfile.readline()
                        raw += trailer
                        if trailer in (b"\r\n", b"\n", b""):
                            return bytes(raw)
                raw += self.rfile.read(size + 2)
        length = int(self.headers.get("Content-Length") or 0)
        return self.rfile.read(length) if length else b""

    def _handle(self) -> None:
        body = self._read_body()
        rule = self.owner._decide(self.command, self.path)
        if rule is not None:
            self._fail(rule)
            return
        self._forward(body)

    def _fail(self, rule: Rule) -> None:
        self.owner._record(self.command, self.path, rule.status, True)
        if rule.status is None:
            self.close_connection = True
            try:
                self.connection.shutdown(socket.SHUT_RDWR)
            except OSError:
                pass
            return
        request_id = f"faultproxy-{len(self.owner.log)}"
        payload = s3_error_body(rule.code, urlsplit(self.path).path, request_id)
        self.send_response_only(rule.status)
        self.send_header("Content-Type", "application/xml")
        self.send_header("x-amz-request-id", request_id)
        self.send_header("Content-Length", "0" if self.command == "HEAD" else str(len(payload)))
        self.end_headers()
        if self.command != "HEAD":
            self.wfile.write(payload)
        self.wfile.flush()

    def _forward(self, body: bytes) -> None:
        conn = http.client.HTTPConnection(self.owner.upstream_host, self.owner.upstream_port, timeout=60)
        try:
            conn.putrequest(self.command, self.path, skip_host=True, skip_accept_encoding=True)
            for key, value in self.headers.items():
                conn.putheader(key, value)
            conn.endheaders(body if body else None)
            resp = conn.getresponse()
            payload = resp.read()
            headers = resp.getheaders()
        except OSError:
            # Upstream down: answer like an unreachable S3 front end would.
            self.owner._record(self.command, self.path, 502)
            self.send_response_only(502)
            self.send_header("Content-Length", "0")
            self.end_headers()
            return
        finally:
            conn.close()
        self.owner._record(self.command, self.path, resp.status)
        chunked = any(k.lower() == "transfer-encoding" and "chunked" in v.lower() for k, v in headers)
        out = bytearray(f"HTTP/1.1 {resp.status} {resp.reason}\r\n".encode("latin-1"))
        for key, value in headers:
            out += f"{key}: {value}\r\n".encode("latin-1")
        out += b"\r\n"
        if self.command != "HEAD":
            if chunked:
                out += (f"{len(payload):x}\r\n".encode() + payload + b"\r\n" if payload else b"") + b"0\r\n\r\n"
            else:
                out += payload
        self.wfile.write(bytes(out))
        self.wfile.flush()
        if any(k.lower() == "connection" and v.lower() == "close" for k, v in headers):
            self.close_connection = True

    do_GET = do_PUT = do_POST = do_DELETE = do_HEAD = _handle


# --- plug-in models (cosmicai ``module:factory`` names) ----------------------------------------------------------

class _LinearModel:
    """Deterministic, instant model: z = 0.01 * mean(magnitudes) + 1e-4 * mean(image)."""

    n_params = 0

    def __init__(self, delay_var: str | None = None) -> None:
        self.delay_var = delay_var

    def predict(self, images: np.ndarray, magnitudes: np.ndarray, batch_size: int = 512) -> np.ndarray:
        if self.delay_var:
            time.sleep(float(os.environ.get(self.delay_var, "0.4")))
        return (0.01 * magnitudes.mean(axis=1) + 1e-4 * images.reshape(len(images), -1).mean(axis=1)
                ).astype(np.float32)


def expected_z(images: np.ndarray, magnitudes: np.ndarray) -> np.ndarray:
    """What the plug-in models predict for these rows (to check no prediction landed on the wrong row)."""
    return _LinearModel().predict(images, magnitudes)


def instant_model(weights: str | None = None, device: str = "cpu", mode: str = "exact",
                  threads: int | None = None) -> _LinearModel:
    """Model ``faultproxy:instant_model``: no inference cost (10,000-partition tests)."""
    return _LinearModel()


def slow_model(weights: str | None = None, device: str = "cpu", mode: str = "exact",
               threads: int | None = None) -> _LinearModel:
    """Model ``faultproxy:slow_model``: sleeps ``$CAI_FAULT_DELAY_S`` seconds (read at each call, default 0.4)
    per partition, so a kill or a server stop reliably lands mid-run without burning CPU."""
    return _LinearModel("CAI_FAULT_DELAY_S")


# --- figures for docs/reliability.md -----------------------------------------------------------------------------

def ledger(scenario: str, **figures: Any) -> None:
    """Append one JSON line (``scenario`` + figures such as faults, rows_in, rows_out) to $CAI_RELIABILITY_LOG."""
    path = os.environ.get("CAI_RELIABILITY_LOG")
    if not path:
        return
    with open(path, "a") as fh:
        fh.write(json.dumps({"scenario": scenario, **figures}) + "\n")
