"""What the two local servers share: a threaded JSON HTTP server, run in-process or as a real
process that announces its port, and a small client for their /stats, /control and /reset."""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import select
import signal
import socket
import subprocess
import sys
import threading
import time
import urllib.request
from collections.abc import Callable, Mapping, Sequence
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import IO, Any
from urllib.parse import parse_qs, urlsplit

JSON = dict[str, Any]
Reply = tuple[int, JSON, Mapping[str, str]]
READY = "listening on "


class JsonServer(ThreadingHTTPServer):
    """Routes ``(method, path)`` to ``app.handle``; every body in and out is JSON."""

    daemon_threads = True
    allow_reuse_address = True

    def __init__(self, address: tuple[str, int], app: App) -> None:
        self.app = app
        super().__init__(address, _Handler)

    @property
    def url(self) -> str:
        host, port = self.server_address[:2]
        return f"http://{host!s}:{port}"


class Request:
    """One request as an app sees it. ``client_gone`` tells whether the caller hung up."""

    def __init__(
        self,
        method: str,
        path: str,
        query: Mapping[str, list[str]],
        headers: Any,
        body: Any,
        connection: socket.socket,
    ) -> None:
        self.method = method
        self.path = path
        self.query = query
        self.headers = headers
        self.body = body
        self._connection = connection

    @property
    def idempotency_key(self) -> str | None:
        value = self.headers.get("Idempotency-Key")
        return str(value) if value else None

    def client_gone(self) -> bool:
        """True once the caller closed its end (it was killed, or it timed out)."""
        try:
            readable, _, _ = select.select([self._connection], [], [], 0)
            if not readable:
                return False
            return self._connection.recv(1, socket.MSG_PEEK) == b""
        except OSError:
            return True

    def wait(self, seconds: float, until: Callable[[], bool] | None = None) -> bool:
        """Sleep up to ``seconds`` (stopping early if ``until()``); False if the caller hung up."""
        deadline = time.monotonic() + seconds
        while time.monotonic() < deadline:
            if self.client_gone():
                return False
            if until is not None and until():
                return True
            time.sleep(0.02)
        return not self.client_gone()


class App:
    """Subclasses implement ``route``; /stats, /control and /reset are common."""

    def __init__(self) -> None:
        self.lock = threading.Lock()

    def handle(self, request: Request) -> Reply:
        if request.method == "GET" and request.path == "/stats":
            with self.lock:
                return 200, self.stats(request.query), {}
        if request.method == "POST" and request.path == "/control":
            if not isinstance(request.body, dict):
                return 400, {"error": "control takes a JSON object"}, {}
            with self.lock:
                return 200, self.control(request.body), {}
        if request.method == "POST" and request.path == "/reset":
            with self.lock:
                self.reset()
            return 200, {"reset": True}, {}
        return self.route(request)

    def route(self, request: Request) -> Reply:
        raise NotImplementedError

    def stats(self, query: Mapping[str, list[str]]) -> JSON:
        raise NotImplementedError

    def control(self, changes: JSON) -> JSON:
        raise NotImplementedError

    def reset(self) -> None:
        raise NotImplementedError


class _Handler(BaseHTTPRequestHandler):
    server: JsonServer
    protocol_version = "HTTP/1.1"
    # Headers and body go out in two writes: with Nagle on, the body waits for the client's
    # delayed ACK (~40 ms a request).
    disable_nagle_algorithm = True

    def log_message(self, format: str, *args: Any) -> None:
        pass  # the counters are the record; per-request lines would only slow the server

    def do_GET(self) -> None:
        self._serve("GET")

    def do_POST(self) -> None:
        self._serve("POST")

    def _serve(self, method: str) -> None:
        parts = urlsplit(self.path)
        length = int(self.headers.get("Content-Length") or 0)
        raw = self.rfile.read(length) if length else b""
        try:
            body = json.loads(raw) if raw else None
        except json.JSONDecodeError:
            self._reply(400, {"error": {"message": "the request body is not JSON"}}, {})
            return
        request = Request(
            method, parts.path, parse_qs(parts.query), self.headers, body, self.connection
        )
        try:
            status, payload, headers = self.server.app.handle(request)
        except Exception as exc:  # a bug in a test server must show, not hang the client
            status, payload, headers = 500, {"error": {"message": f"server bug: {exc!r}"}}, {}
        if status == 0:  # the app decided the caller is gone: nothing to send
            self.close_connection = True
            return
        self._reply(status, payload, headers)

    def _reply(self, status: int, payload: JSON, headers: Mapping[str, str]) -> None:
        data = json.dumps(payload).encode()
        with contextlib.suppress(OSError):  # the caller may have hung up meanwhile
            self.send_response(status)
            self.send_header("Content-Type", "application/json")
            self.send_header("Content-Length", str(len(data)))
            for name, value in headers.items():
                self.send_header(name, value)
            self.end_headers()
            self.wfile.write(data)


def serve_in_thread(app: App, port: int = 0) -> JsonServer:
    """Start ``app`` on 127.0.0.1 in a daemon thread (unit tests); ``shutdown()`` stops it."""
    server = JsonServer(("127.0.0.1", port), app)
    threading.Thread(target=server.serve_forever, name=type(app).__name__, daemon=True).start()
    return server


def main(
    build: Callable[[argparse.Namespace], App],
    parser: argparse.ArgumentParser,
    argv: Sequence[str] | None,
) -> int:
    """Entry point of ``python -m saga_dev.testing.<server>``: serve until SIGTERM/SIGINT."""
    parser.add_argument("--host", default="127.0.0.1")
    parser.add_argument("--port", type=int, default=0, help="0 picks a free port")
    args = parser.parse_args(argv)
    server = JsonServer((args.host, args.port), build(args))
    signal.signal(signal.SIGTERM, lambda *_: threading.Thread(target=server.shutdown).start())
    print(f"{READY}{server.url}", flush=True)
    with contextlib.suppress(KeyboardInterrupt):
        server.serve_forever()
    server.server_close()
    return 0


# -- client side ------------------------------------------------------------------------------


def call(url: str, method: str = "GET", body: Any = None, timeout: float = 10.0) -> Any:
    data = None if body is None else json.dumps(body).encode()
    request = urllib.request.Request(
        url, data=data, method=method, headers={"Content-Type": "application/json"}
    )
    with urllib.request.urlopen(request, timeout=timeout) as response:
        return json.loads(response.read())


class ServerProcess:
    """A local server started as a real process (``python -m MODULE ...``) on a free port."""

    def __init__(
        self,
        module: str,
        *args: str,
        log: Path | None = None,
        env: Mapping[str, str] | None = None,
        timeout: float = 30.0,
    ) -> None:
        self._log: IO[bytes] | None = log.open("ab") if log else None
        self.popen = subprocess.Popen(
            [sys.executable, "-m", module, *args],
            stdout=subprocess.PIPE,
            stderr=self._log or subprocess.DEVNULL,
            stdin=subprocess.DEVNULL,
            env={**os.environ, **(env or {})},
            start_new_session=True,
        )
        assert self.popen.stdout is not None
        try:
            ready, _, _ = select.select([self.popen.stdout], [], [], timeout)
            line = self.popen.stdout.readline().decode() if ready else ""
        except BaseException:  # interrupted while it starts: no server is left behind
            self.stop()
            raise
        if not line.startswith(READY):
            self.stop()
            raise RuntimeError(f"{module} did not start (said {line!r})")
        self.url = line[len(READY) :].strip()

    def stats(self, **query: str) -> JSON:
        suffix = "?" + "&".join(f"{k}={v}" for k, v in query.items()) if query else ""
        result: JSON = call(f"{self.url}/stats{suffix}")
        return result

    def control(self, **changes: Any) -> JSON:
        result: JSON = call(f"{self.url}/control", "POST", changes)
        return result

    def reset(self) -> None:
        call(f"{self.url}/reset", "POST", {})

    def stop(self) -> None:
        if self.popen.poll() is None:
            os.killpg(self.popen.pid, signal.SIGTERM)
            try:
                self.popen.wait(10)
            except subprocess.TimeoutExpired:
                os.killpg(self.popen.pid, signal.SIGKILL)
                self.popen.wait(10)
        if self.popen.stdout is not None:
            self.popen.stdout.close()
        if self._log is not None:
            self._log.close()

    def __enter__(self) -> ServerProcess:
        return self

    def __exit__(self, *exc: object) -> None:
        self.stop()
