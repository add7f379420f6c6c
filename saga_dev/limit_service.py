"""An outside service that measures what calls it: concurrent requests and request times per
key. The flow-control tests and ``saga bench limits`` check the engine's limits from here, the
way a model provider would see them, not from the engine's own books."""

from __future__ import annotations

import json
import threading
import time
import urllib.parse
import urllib.request
from collections import defaultdict
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Any

URL_ENV = "SAGA_LIMIT_SERVICE_URL"


class _Server(ThreadingHTTPServer):
    daemon_threads = True
    # socketserver listens with a backlog of 5: a burst of steps calling at once overflowed it,
    # and each connection dropped was retried by its client a second later (TCP's SYN timeout),
    # arriving a second after the engine let it go.
    request_queue_size = 256


class LimitService:
    """``GET /call?key=K&ms=N&tag=T``: holds the request N ms. Records, per key, the requests in
    flight (and their highest count) and each request's arrival time; per tag, the order of
    arrival. Runs on a thread of the calling process: ``with LimitService() as svc``."""

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self.in_flight: dict[str, int] = defaultdict(int)
        self.max_in_flight: dict[str, int] = defaultdict(int)
        self.arrivals: dict[str, list[float]] = defaultdict(list)
        self.order: list[str] = []  # tags, in order of arrival
        self.ends: list[tuple[str, float]] = []  # (key, time a request ended)
        service = self

        class Handler(BaseHTTPRequestHandler):
            def do_GET(self) -> None:
                query = urllib.parse.parse_qs(urllib.parse.urlparse(self.path).query)
                key = query.get("key", [""])[0]
                ms = float(query.get("ms", ["0"])[0])
                tag = query.get("tag", [""])[0]
                service._enter(key, tag)
                try:
                    time.sleep(ms / 1000)
                finally:
                    service._leave(key)
                body = b'{"ok": true}'
                self.send_response(200)
                self.send_header("Content-Type", "application/json")
                self.send_header("Content-Length", str(len(body)))
                self.end_headers()
                self.wfile.write(body)

            def log_message(self, format: str, *args: Any) -> None:
                pass

        self._server = _Server(("127.0.0.1", 0), Handler)
        self.url = f"http://127.0.0.1:{self._server.server_address[1]}"
        self._thread = threading.Thread(target=self._server.serve_forever, daemon=True)

    def __enter__(self) -> LimitService:
        self._thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self._server.shutdown()
        self._server.server_close()

    def _enter(self, key: str, tag: str) -> None:
        with self._lock:
            self.in_flight[key] += 1
            self.max_in_flight[key] = max(self.max_in_flight[key], self.in_flight[key])
            self.arrivals[key].append(time.monotonic())
            if tag:
                self.order.append(tag)

    def _leave(self, key: str) -> None:
        with self._lock:
            self.in_flight[key] -= 1
            self.ends.append((key, time.monotonic()))

    def max_in_window(self, window: float, keys: list[str] | None = None) -> int:
        """The most requests (of ``keys``, default all) that arrived within any ``window``
        seconds: a sliding window over the arrival times."""
        with self._lock:
            times = [t for k, ts in self.arrivals.items() if keys is None or k in keys for t in ts]
        return most_in_window(times, window)


def most_in_window(times: list[float], window: float) -> int:
    """The most of ``times`` within any ``window`` seconds (a sliding window)."""
    times = sorted(times)
    best, first = 0, 0
    for last, t in enumerate(times):
        while t - times[first] >= window:
            first += 1
        best = max(best, last - first + 1)
    return best


def call(key: str, ms: float, tag: str = "") -> None:
    """What a step calls: the service named by SAGA_LIMIT_SERVICE_URL."""
    import os

    base = os.environ[URL_ENV]
    query = urllib.parse.urlencode({"key": key, "ms": ms, "tag": tag})
    with urllib.request.urlopen(f"{base}/call?{query}", timeout=60) as response:
        json.load(response)
