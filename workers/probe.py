"""Probes for ``saga worker`` and ``saga relay``: what is alive, what is ready, and /metrics.

The worker is alive while its consumer's event loop ticks (a Celery bootstep puts a timer on
it), or, in a solo or threads pool whose loop a long step holds, while the process's heartbeat
thread beats; a consumer reconnecting to a broker that is down is paused, not dead. The relay is
alive while its publish loop turns.
"""

from __future__ import annotations

import atexit
import logging
import shutil
import tempfile
from pathlib import Path
from typing import Any

from celery import bootsteps, signals

from saga import health
from saga.probes import Liveness, ProbeServer
from saga.settings import Settings
from saga.workers import telemetry

log = logging.getLogger("saga.probes")

CONSUMER_TICK_SECONDS = 1.0
CONSUMER_BOUND_SECONDS = 30.0  # the consumer's loop silent this long: the worker is not alive


class ConsumerTicks(bootsteps.StartStopStep):  # type: ignore[misc]
    """A consumer bootstep: ticks liveness from a timer of the consumer's event loop, which
    fires only while that loop turns."""

    def __init__(self, parent: Any, **kwargs: Any) -> None:
        super().__init__(parent, **kwargs)
        self._tref: Any = None

    def start(self, c: Any) -> None:
        liveness: Liveness = c.app.saga_liveness
        liveness.tick("consumer", CONSUMER_BOUND_SECONDS)
        self._tref = c.timer.call_repeatedly(
            CONSUMER_TICK_SECONDS, liveness.tick, ("consumer", CONSUMER_BOUND_SECONDS)
        )

    def stop(self, c: Any) -> None:
        # Celery stops the consumer's steps to reconnect after losing the broker, and to stop.
        if self._tref is not None:
            self._tref.cancel()
            self._tref = None
        c.app.saga_liveness.pause("consumer", "reconnecting to the broker, or stopping")

    shutdown = stop


def _registry(children: bool) -> Any:
    """The prometheus_client registry /metrics serves, or None without the extra installed."""
    try:
        from saga.workers import prometheus
    except ImportError as exc:
        log.warning(
            "no /metrics: install durable-saga[prometheus] (%s); /healthz and /readyz are served",
            exc,
        )
        return None
    if not children:
        registry = prometheus.registry_with([])
        telemetry.serve_prometheus(registry)
        return registry
    try:
        folder = Path(tempfile.mkdtemp(prefix="saga-metrics-"))
    except OSError as exc:  # a read-only file system: the worker runs, unscraped
        log.warning("no /metrics: the pool's children need a writable TMPDIR (%s)", exc)
        return None
    atexit.register(shutil.rmtree, folder, ignore_errors=True)
    telemetry.prometheus_children(folder)
    return prometheus.registry_with([prometheus.ChildFiles(folder)])


def _server(settings: Settings, port: int, app: Any, liveness: Liveness, registry: Any) -> Any:
    metrics = None
    if registry is not None:
        from saga.workers.prometheus import exposition

        def metrics() -> tuple[bytes, str]:
            return exposition(registry)

    server = ProbeServer(
        settings.http_host,
        port,
        liveness,
        readiness=lambda: health.readiness(settings.database_url, app),
        metrics=metrics,
    )
    server.start()
    return server


def serve_worker(app: Any, settings: Settings, port: int, pool: str) -> ProbeServer:
    """Before the worker starts: tick liveness from its consumer and heartbeat, serve the probes
    (and /metrics, from this process or, for prefork, from its children)."""
    liveness = Liveness()
    app.saga_liveness = liveness
    app.steps["consumer"].add(ConsumerTicks)
    registry = _registry(children=pool == "prefork")
    server: ProbeServer = _server(settings, port, app, liveness, registry)
    if pool == "prefork":
        signals.worker_process_init.connect(lambda **_: server.close_in_child(), weak=False)
    return server


def serve_relay(app: Any, settings: Settings, port: int) -> tuple[ProbeServer, Liveness]:
    """Before the relay configures telemetry: serve the probes and /metrics."""
    liveness = Liveness()
    registry = _registry(children=False)
    return _server(settings, port, app, liveness, registry), liveness
