"""The HTTP probes of a worker or relay: ``/healthz``, ``/readyz`` and ``/metrics``.

A stdlib HTTP server in daemon threads: a slow or stuck request never holds the worker's loop,
and the server goes down with the process. ``/healthz`` answers from memory (has the process's
loop ticked lately?); ``/readyz`` checks Postgres, the schema and the broker on connections of
its own, one check at a time however many probes arrive (a result is reused for a second).
"""

from __future__ import annotations

import json
import logging
import threading
import time
from collections.abc import Callable
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Any

from saga.errors import ConfigurationError
from saga.health import Check, as_json, summary

log = logging.getLogger("saga.probes")


class Liveness:
    """The loops of a process, each ticking as it makes progress.

    The process is alive while one of its loops ticked within that loop's bound, or while a
    loop is paused for a reason that is not a fault of the process (a consumer reconnecting
    to a broker that is down: readiness reports that, and a restart would not help). Before
    any tick the process is starting, and alive.
    """

    def __init__(self) -> None:
        self._ticks: dict[str, tuple[float, float]] = {}  # name -> (monotonic time, bound)
        self._paused: dict[str, str] = {}

    def tick(self, name: str, bound: float) -> None:
        self._ticks[name] = (time.monotonic(), bound)
        self._paused.pop(name, None)

    def pause(self, name: str, reason: str) -> None:
        self._paused[name] = reason

    def check(self) -> tuple[bool, str]:
        now = time.monotonic()
        ticks = dict(self._ticks)
        for name, (at, bound) in ticks.items():
            if now - at <= bound:
                return True, f"{name} ticked {now - at:.1f} s ago"
        for name, reason in dict(self._paused).items():
            return True, f"{name} paused: {reason}"
        if not ticks:
            return True, "starting"
        stale = ", ".join(
            f"{name} last ticked {now - at:.1f} s ago (bound {bound:g} s)"
            for name, (at, bound) in ticks.items()
        )
        return False, f"no loop is making progress: {stale}"


class _CachedReadiness:
    def __init__(self, checks: Callable[[], list[Check]], reuse_for: float = 1.0) -> None:
        self._checks = checks
        self._reuse_for = reuse_for
        self._lock = threading.Lock()
        self._last: tuple[float, list[Check]] | None = None

    def __call__(self) -> list[Check]:
        with self._lock:
            if self._last is not None and time.monotonic() - self._last[0] < self._reuse_for:
                return self._last[1]
            result = self._checks()
            self._last = (time.monotonic(), result)
            return result


class ProbeServer:
    """Serves the probes on ``host:port`` (port 0 picks a free one: see ``port``)."""

    def __init__(
        self,
        host: str,
        port: int,
        liveness: Liveness,
        readiness: Callable[[], list[Check]],
        metrics: Callable[[], tuple[bytes, str]] | None = None,
    ) -> None:
        routes: dict[str, Callable[[], tuple[int, bytes, str]]] = {
            "/healthz": lambda: _healthz(liveness),
            "/readyz": lambda: _readyz(ready),
        }
        ready = _CachedReadiness(readiness)
        if metrics is not None:
            routes["/metrics"] = lambda: (200, *metrics())

        class Handler(BaseHTTPRequestHandler):
            def do_GET(self) -> None:
                route = routes.get(self.path.split("?", 1)[0])
                try:
                    status, body, content_type = (
                        route() if route else (404, b"not found\n", "text/plain")
                    )
                except Exception as exc:  # a failing probe answers 500, the server goes on
                    log.warning("probe %s failed: %s", self.path, exc)
                    status, body, content_type = 500, f"{exc}\n".encode(), "text/plain"
                self.send_response(status)
                self.send_header("Content-Type", content_type)
                self.send_header("Content-Length", str(len(body)))
                self.end_headers()
                self.wfile.write(body)

            def log_message(self, format: str, *args: Any) -> None:
                log.debug("probe request: " + format, *args)

        if not 0 <= port <= 65535:
            raise ConfigurationError(f"the probe port {port} is not a TCP port (0-65535)")
        try:
            self._server = ThreadingHTTPServer((host, port), Handler)
        except OSError as exc:
            raise ConfigurationError(
                f"cannot serve the probes on {host}:{port} (SAGA_HTTP_HOST, SAGA_HTTP_PORT or "
                f"--http-port): {exc.strerror or exc}. Pick a free port, or another address"
            ) from None
        self._server.daemon_threads = True
        self._thread: threading.Thread | None = None
        self._paths = ", ".join(routes)

    @property
    def port(self) -> int:
        return int(self._server.server_address[1])

    def start(self) -> None:
        self._thread = threading.Thread(
            target=self._server.serve_forever, name="saga-probes", daemon=True
        )
        self._thread.start()
        log.info("probes on http://%s:%d (%s)", *self.address(), self._paths)

    def address(self) -> tuple[str, int]:
        return str(self._server.server_address[0]), self.port

    def close_in_child(self) -> None:
        """In a forked child: close the inherited listening socket (the server is the
        parent's; a child holding it would keep the port after the parent died)."""
        self._server.socket.close()

    def close(self) -> None:
        self._server.shutdown()
        self._server.server_close()


def _healthz(liveness: Liveness) -> tuple[int, bytes, str]:
    alive, detail = liveness.check()
    return (
        (200 if alive else 503),
        f"{'ok' if alive else 'not alive'}: {detail}\n".encode(),
        ("text/plain; charset=utf-8"),
    )


def _readyz(readiness: Callable[[], list[Check]]) -> tuple[int, bytes, str]:
    checks = readiness()
    body = {**as_json(checks), "summary": summary(checks)}
    return (200 if body["ok"] else 503), json.dumps(body).encode(), "application/json"
