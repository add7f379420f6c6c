"""``saga dashboard``: the WSGI app on a threaded stdlib server."""

from __future__ import annotations

import logging
import socketserver
import threading
from typing import Any
from wsgiref.simple_server import WSGIRequestHandler, WSGIServer, make_server

from saga.client import SagaClient
from saga.dashboard.actions import Actions
from saga.dashboard.app import Dashboard
from saga.dashboard.security import Guard, check_bind
from saga.dashboard.source import Source
from saga.errors import ConfigurationError
from saga.runs_view import RunsView
from saga.settings import Settings

log = logging.getLogger("saga.dashboard")


class _Server(socketserver.ThreadingMixIn, WSGIServer):
    daemon_threads = True  # a slow client never holds up shutdown
    allow_reuse_address = True


class _Handler(WSGIRequestHandler):
    def log_message(self, format: str, *args: Any) -> None:
        log.info("%s %s", self.address_string(), format % args)


class DashboardServer:
    """The dashboard listening on ``host:port`` (port 0: any free port, see ``url``)."""

    def __init__(
        self,
        settings: Settings,
        *,
        host: str = "127.0.0.1",
        port: int = 8180,
        read_only: bool = False,
        refresh_seconds: int = 5,
    ) -> None:
        if not settings.database_url:
            raise ConfigurationError("the dashboard needs SAGA_DATABASE_URL")
        token = settings.dashboard_token.get_secret_value() if settings.dashboard_token else None
        check_bind(host, token)
        self.view = RunsView(settings.database_url, pool_size=min(settings.pool_size, 4))
        self.client = None if read_only else SagaClient(settings)
        self.app = Dashboard(
            Source(self.view),
            None if self.client is None else Actions(self.client),
            Guard(token),
            refresh_seconds=refresh_seconds,
            trace_url_template=settings.trace_url_template,
            token_prices=settings.token_prices,
        )
        try:
            self.httpd = make_server(host, port, self.app, _Server, _Handler)
        except OSError as exc:
            self.close()
            raise ConfigurationError(
                f"the dashboard cannot listen on {host}:{port}: {exc}"
            ) from None
        self._thread: threading.Thread | None = None

    @property
    def url(self) -> str:
        host, port = self.httpd.server_address[:2]
        name = host.decode() if isinstance(host, bytes) else str(host)
        shown = f"[{name}]" if ":" in name else name
        return f"http://{shown}:{port}"

    def serve_forever(self) -> None:
        self.httpd.serve_forever(poll_interval=0.2)

    def start(self) -> DashboardServer:
        """Serve in a background thread (tests, benchmarks)."""
        self._thread = threading.Thread(
            target=self.serve_forever, name="saga-dashboard", daemon=True
        )
        self._thread.start()
        return self

    def close(self) -> None:
        httpd = getattr(self, "httpd", None)
        if httpd is not None:
            if self._thread is not None:
                httpd.shutdown()
            httpd.server_close()
        if self.client is not None:
            self.client.close()
        self.view.close()

    def __enter__(self) -> DashboardServer:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()
