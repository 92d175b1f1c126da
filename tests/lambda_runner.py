"""A local AWS stand-in for the end-to-end tests: moto's server (Step Functions, S3, CloudWatch Logs, IAM)
behind a small HTTP front door that runs Lambda ``Invoke`` calls on OUR handlers in worker processes.

Why a front door: moto's Step Functions interpreter (``execute_state_machine``) calls every service,
Lambda included, through boto3 at ``http://localhost:$MOTO_PORT``; moto's own Lambda needs Docker. So the
moto server is started with ``MOTO_PORT`` pointing at the front door, which

* answers ``POST /2015-03-31/functions/<name>/invocations`` for the functions it was given by running the
  handler in a warm worker process (one process = one Lambda execution environment: the handler module is
  imported once at INIT and reused by later invocations; a new process is a cold start), and
* forwards every other request (Step Functions, S3 ``GetObject`` for the ItemReader, Logs ...) unchanged
  to moto.

Each invocation ends with a Lambda-style ``REPORT`` line written to moto's CloudWatch Logs group
``/aws/lambda/<function>``, so ``cai aws logs`` can be run against it. When every worker is busy and
``max_workers`` are running, Invoke answers 429 ``TooManyRequestsException`` like a throttled Lambda.

The worker protocol (``python tests/lambda_runner.py --worker``): one JSON request per stdin line
``{"handler": "module.func", "event": ..., "context": {...}}``; one JSON reply per line on the original
stdout; the handler's own prints go to stderr.
"""

from __future__ import annotations

import http.client
import http.server
import importlib
import json
import os
import re
import resource
import subprocess
import sys
import threading
import time
import traceback
import uuid
from typing import Any
from urllib.parse import unquote

# Imported under pytest, tests/ is on sys.path (pythonpath in pyproject.toml); run as the worker script
# (``python tests/lambda_runner.py --worker``), Python puts the script's folder, tests/, first itself.
from s3server import free_port, wait_for_port

REGION = "us-east-1"
ACCOUNT = "123456789012"
INVOKE_RE = re.compile(r"^/2015-03-31/functions/([^/]+)/invocations")


def function_arn(name: str) -> str:
    """The Lambda ARN moto's account and region give a function name."""
    return f"arn:aws:lambda:{REGION}:{ACCOUNT}:function:{name}"


class _Worker:
    """One warm execution environment: a Python process that imported the handler modules once."""

    def __init__(self, env: dict[str, str], preload: list[str]) -> None:
        self.busy = False
        self.cold = True
        wenv = dict(env, CAI_LAMBDA_PRELOAD=",".join(preload))
        self.proc = subprocess.Popen([sys.executable, os.path.abspath(__file__), "--worker"], env=wenv,
                                     stdin=subprocess.PIPE, stdout=subprocess.PIPE, stderr=None,
                                     text=True, bufsize=1)
        ready = json.loads(self._readline())
        if not ready.get("ready"):
            raise RuntimeError(f"lambda worker failed to initialise: {ready}")
        self.init_ms = float(ready["init_ms"])

    def _readline(self) -> str:
        line = self.proc.stdout.readline()
        if not line:
            raise RuntimeError(f"lambda worker exited (code {self.proc.poll()})")
        return line

    def invoke(self, handler: str, event: Any, context: dict[str, Any]) -> dict[str, Any]:
        self.proc.stdin.write(json.dumps({"handler": handler, "event": event, "context": context}) + "\n")
        self.proc.stdin.flush()
        return json.loads(self._readline())

    def close(self) -> None:
        if self.proc.poll() is None:
            self.proc.stdin.close()
            try:
                self.proc.wait(timeout=10)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()


class LambdaEmulator:
    """moto server + Lambda front door. ``endpoint`` is the URL every client should use.

    ``functions`` maps a function name to its handler (``"cosmicai.backends.aws.handlers.infer"``);
    ``env`` is the environment of the worker processes (S3 endpoint, credentials, CAI_MODEL, ...).
    ``invocations`` records every Invoke: function, event, ok, error type, duration, cold start.
    """

    def __init__(self, functions: dict[str, str], env: dict[str, str] | None = None, max_workers: int = 2,
                 memory_mb: int = 3008) -> None:
        self.functions = dict(functions)
        self.worker_env = dict(env or {})
        self.max_workers = max_workers
        self.memory_mb = memory_mb
        self.moto_port = free_port()
        self.port = free_port()
        self.invocations: list[dict[str, Any]] = []
        self._workers: list[_Worker] = []
        self._lock = threading.Lock()
        self._moto: subprocess.Popen | None = None
        self._httpd: http.server.ThreadingHTTPServer | None = None
        self._log_streams: set[str] = set()

    @property
    def endpoint(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    @property
    def moto_endpoint(self) -> str:
        return f"http://127.0.0.1:{self.moto_port}"

    def client_env(self) -> dict[str, str]:
        """Environment for boto3/s3fs clients (tests, the CLI, the handlers) to talk to this stand-in."""
        return {"AWS_ENDPOINT_URL": self.endpoint, "CAI_S3_ENDPOINT": self.endpoint,
                "AWS_ACCESS_KEY_ID": "testing", "AWS_SECRET_ACCESS_KEY": "testing",
                "AWS_DEFAULT_REGION": REGION, "AWS_REGION": REGION, "AWS_EC2_METADATA_DISABLED": "true"}

    def start(self) -> "LambdaEmulator":
        env = dict(os.environ, MOTO_PORT=str(self.port))
        self._moto_log = open(os.path.join(os.environ.get("TMPDIR", "/tmp"), f"cai-moto-{self.moto_port}.log"), "ab")
        self._moto = subprocess.Popen([sys.executable, "-m", "moto.server", "-H", "127.0.0.1", "-p",
                                       str(self.moto_port)], env=env, stdout=self._moto_log,
                                      stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL, start_new_session=True)
        wait_for_port(self.moto_port, self._moto)
        handler_cls = type("Handler", (_FrontDoor,), {"emulator": self})
        self._httpd = http.server.ThreadingHTTPServer(("127.0.0.1", self.port), handler_cls)
        self._httpd.daemon_threads = True
        threading.Thread(target=self._httpd.serve_forever, daemon=True).start()
        self.configure_moto({"stepfunctions": {"execute_state_machine": True}})
        return self

    def configure_moto(self, config: dict[str, Any]) -> None:
        """POST a moto config (e.g. enable Step Functions execution) to ``/moto-api/config``."""
        conn = http.client.HTTPConnection("127.0.0.1", self.moto_port, timeout=10)
        conn.request("POST", "/moto-api/config", body=json.dumps(config),
                     headers={"Content-Type": "application/json"})
        resp = conn.getresponse()
        resp.read()
        if resp.status >= 300:
            raise RuntimeError(f"moto config rejected: HTTP {resp.status}")

    def client(self, service: str) -> Any:
        import boto3

        env = self.client_env()
        return boto3.client(service, endpoint_url=self.endpoint, region_name=REGION,
                            aws_access_key_id=env["AWS_ACCESS_KEY_ID"],
                            aws_secret_access_key=env["AWS_SECRET_ACCESS_KEY"])

    # --- Lambda ---------------------------------------------------------------------------------------
    def _acquire(self) -> _Worker | None:
        with self._lock:
            for worker in self._workers:
                if not worker.busy:
                    worker.busy = True
                    return worker
            if len(self._workers) >= self.max_workers:
                return None
        env = dict(os.environ, **self.worker_env)
        preload = sorted({h.rsplit(".", 1)[0] for h in self.functions.values()})
        worker = _Worker(env, preload)
        worker.busy = True
        with self._lock:
            if len(self._workers) >= self.max_workers:
                worker.close()
                return None
            self._workers.append(worker)
        return worker

    def invoke(self, name: str, payload: bytes) -> tuple[int, dict[str, str], bytes]:
        """Run one invocation; returns HTTP status, headers and body as Lambda's Invoke API would."""
        event = json.loads(payload or b"{}")
        worker = self._acquire()
        if worker is None:
            body = json.dumps({"Type": "User", "message": "Rate Exceeded.", "Reason": "ReservedFunctionConcurrentInvocationLimitExceeded"})
            self.invocations.append({"function": name, "event": event, "ok": False,
                                     "error": "TooManyRequestsException", "throttled": True})
            return 429, {"x-amzn-ErrorType": "TooManyRequestsException"}, body.encode()
        request_id = str(uuid.uuid4())
        cold, worker.cold = worker.cold, False
        context = {"function_name": name, "aws_request_id": request_id, "memory_limit_in_mb": self.memory_mb,
                   "invoked_function_arn": function_arn(name)}
        try:
            reply = worker.invoke(self.functions[name], event, context)
        finally:
            worker.busy = False
        body = json.dumps(reply["payload"]).encode()
        self.invocations.append({"function": name, "event": event, "ok": reply["ok"], "error": reply.get("errorType"),
                                 "duration_ms": reply["duration_ms"], "cold": cold, "request_id": request_id,
                                 "response_bytes": len(body)})
        self._log_report(name, request_id, reply, worker.init_ms if cold else None)
        headers = {"X-Amz-Executed-Version": "$LATEST"}
        if not reply["ok"]:
            headers["X-Amz-Function-Error"] = "Unhandled"
        return 200, headers, body

    def _log_report(self, name: str, request_id: str, reply: dict[str, Any], init_ms: float | None) -> None:
        duration = reply["duration_ms"]
        line = (f"REPORT RequestId: {request_id}\tDuration: {duration:.2f} ms\tBilled Duration: "
                f"{int(-(-duration // 1))} ms\tMemory Size: {self.memory_mb} MB\tMax Memory Used: "
                f"{reply['max_rss_mb']} MB\t")
        if init_ms is not None:
            line += f"Init Duration: {init_ms:.2f} ms\t"
        logs = self.client("logs")
        group, stream = f"/aws/lambda/{name}", "2025/01/01/[$LATEST]emulator"
        with self._lock:
            if group not in self._log_streams:
                try:
                    logs.create_log_group(logGroupName=group)
                except logs.exceptions.ResourceAlreadyExistsException:
                    pass
                logs.create_log_stream(logGroupName=group, logStreamName=stream)
                self._log_streams.add(group)
            now = int(time.time() * 1000)
            logs.put_log_events(logGroupName=group, logStreamName=stream, logEvents=[
                {"timestamp": now, "message": f"START RequestId: {request_id} Version: $LATEST"},
                {"timestamp": now, "message": f"END RequestId: {request_id}"},
                {"timestamp": now, "message": line}])

    def close(self) -> None:
        if self._httpd is not None:
            self._httpd.shutdown()
            self._httpd.server_close()
        for worker in self._workers:
            worker.close()
        if self._moto is not None and self._moto.poll() is None:
            self._moto.terminate()
            try:
                self._moto.wait(timeout=5)
            except subprocess.TimeoutExpired:
                self._moto.kill()
                self._moto.wait()
        if getattr(self, "_moto_log", None):
            self._moto_log.close()

    def __enter__(self) -> "LambdaEmulator":
        return self.start()

    def __exit__(self, *exc: object) -> None:
        self.close()


class _FrontDoor(http.server.BaseHTTPRequestHandler):
    emulator: LambdaEmulator
    protocol_version = "HTTP/1.1"

    def log_message(self, format: str, *args: Any) -> None:  # noqa: A002 - quiet
        pass

    def _body(self) -> bytes:
        length = int(self.headers.get("Content-Length") or 0)
        return self.rfile.read(length) if length else b""

    def _handle(self) -> None:
        body = self._body()
        match = INVOKE_RE.match(self.path)
        name = unquote(match.group(1)).rsplit(":function:", 1)[-1].split(":")[0] if match else None
        if self.command == "POST" and name in self.emulator.functions:
            status, headers, out = self.emulator.invoke(name, body)
        else:
            status, headers, out = self._forward(body)
        self.send_response(status)
        for key, value in headers.items():
            self.send_header(key, value)
        if self.command != "HEAD":  # a HEAD answer keeps the object's own Content-Length
            self.send_header("Content-Length", str(len(out)))
        self.end_headers()
        if self.command != "HEAD":
            self.wfile.write(out)

    def _forward(self, body: bytes) -> tuple[int, dict[str, str], bytes]:
        conn = http.client.HTTPConnection("127.0.0.1", self.emulator.moto_port, timeout=300)
        headers = {k: v for k, v in self.headers.items() if k.lower() not in ("connection", "content-length")}
        headers["Content-Length"] = str(len(body))
        conn.request(self.command, self.path, body=body, headers=headers)
        resp = conn.getresponse()
        out = resp.read()
        skip = ("connection", "transfer-encoding") + (() if self.command == "HEAD" else ("content-length",))
        resp_headers = {k: v for k, v in resp.getheaders() if k.lower() not in skip}
        conn.close()
        return resp.status, resp_headers, out

    do_GET = do_POST = do_PUT = do_DELETE = do_HEAD = _handle


# --- worker process --------------------------------------------------------------------------------------
class _Context:
    """The parts of the Lambda context object the handlers may use."""

    def __init__(self, info: dict[str, Any], timeout_s: float = 900.0) -> None:
        self.function_name = info.get("function_name", "")
        self.aws_request_id = info.get("aws_request_id", "")
        self.memory_limit_in_mb = int(info.get("memory_limit_in_mb", 3008))
        self.invoked_function_arn = info.get("invoked_function_arn", "")
        self._deadline = time.monotonic() + timeout_s

    def get_remaining_time_in_millis(self) -> int:
        return max(0, int((self._deadline - time.monotonic()) * 1000))


def _worker_main() -> int:
    proto = os.fdopen(os.dup(1), "w", buffering=1)
    os.dup2(2, 1)
    sys.stdout = sys.stderr
    t0 = time.perf_counter()
    try:
        for module in filter(None, os.environ.get("CAI_LAMBDA_PRELOAD", "").split(",")):
            importlib.import_module(module)
    except Exception as exc:  # noqa: BLE001 - reported to the parent
        proto.write(json.dumps({"ready": False, "error": f"{type(exc).__name__}: {exc}"}) + "\n")
        return 1
    proto.write(json.dumps({"ready": True, "init_ms": (time.perf_counter() - t0) * 1000}) + "\n")
    for line in sys.stdin:
        req = json.loads(line)
        module, func = req["handler"].rsplit(".", 1)
        start = time.perf_counter()
        try:
            payload = getattr(importlib.import_module(module), func)(req["event"], _Context(req["context"]))
            reply = {"ok": True, "payload": payload}
        except Exception as exc:  # noqa: BLE001 - a Lambda function error
            payload = {"errorMessage": str(exc), "errorType": type(exc).__name__,
                       "stackTrace": traceback.format_exception(exc)[-6:]}
            reply = {"ok": False, "payload": payload, "errorType": type(exc).__name__}
        reply["duration_ms"] = (time.perf_counter() - start) * 1000
        reply["max_rss_mb"] = int(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss // 1024)
        proto.write(json.dumps(reply, default=str) + "\n")
    return 0


if __name__ == "__main__":
    if "--worker" in sys.argv:
        sys.exit(_worker_main())
    print(__doc__)
