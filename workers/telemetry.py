"""OpenTelemetry for worker and relay processes: the SDK, configured from ``OTEL_*`` variables.

Library code (``saga.tracing``) uses the API only. A process entry point calls
``configure_sdk()``: the worker in each pool process (every prefork child, after fork, through
Celery's ``worker_process_init``; the solo pool's process at start), the relay at start. Spans and
metrics are flushed when the process ends (``worker_process_shutdown`` for a prefork child,
recycled by ``--max-tasks-per-child`` or not; ``worker_shutdown``, or exit, otherwise).

Telemetry is on when the standard variables ask for it: ``OTEL_TRACES_EXPORTER`` /
``OTEL_METRICS_EXPORTER`` (``otlp``, ``console``, ``none``), or an OTLP endpoint
(``OTEL_EXPORTER_OTLP_ENDPOINT``, or the ``..._TRACES_ENDPOINT`` / ``..._METRICS_ENDPOINT``
ones). ``OTEL_SDK_DISABLED=true`` turns it all off. Protocol ``http/protobuf`` is the default;
``grpc`` needs ``opentelemetry-exporter-otlp-proto-grpc``. Without any of these, or without the
SDK installed (``pip install 'durable-saga[otel]'``), nothing is configured and the API's no-op
tracer and meter remain.

If you configure the SDK yourself instead, pass ``id_generator=saga_id_generator()`` to your
``TracerProvider``, or each run's root span will not get the id its other spans point to.
"""

from __future__ import annotations

import atexit
import logging
import os
import threading
from collections.abc import Mapping
from pathlib import Path
from typing import Any

log = logging.getLogger("saga.telemetry")

_lock = threading.Lock()
_configured_pid: int | None = None
_providers: Any = None  # saga.workers._otel_sdk.Providers, for the process that configured it
_warned_missing_sdk = False
# Where this process's metrics go for /metrics, if served (saga.workers.prometheus): a
# prometheus_client registry for this process, or the folder of a prefork worker's children.
_prometheus_registry: Any = None
_prometheus_children: Path | None = None
_child_writer: Any = None


def _exporters(signal: str, env: Mapping[str, str]) -> list[str]:
    """The exporters asked for a signal (``TRACES`` or ``METRICS``); empty means off."""
    if env.get("OTEL_SDK_DISABLED", "").strip().lower() == "true":
        return []
    names = env.get(f"OTEL_{signal}_EXPORTER")
    if names is not None:
        # `prometheus` is /metrics, served when SAGA_HTTP_PORT (or --http-port) is set.
        return [
            n.strip().lower()
            for n in names.split(",")
            if n.strip().lower() not in ("", "none", "prometheus")
        ]
    if env.get("OTEL_EXPORTER_OTLP_ENDPOINT") or env.get(f"OTEL_EXPORTER_OTLP_{signal}_ENDPOINT"):
        return ["otlp"]
    return []


def requested(env: Mapping[str, str] | None = None) -> bool:
    """Whether the environment asks for traces or metrics."""
    env = os.environ if env is None else env
    return bool(_exporters("TRACES", env) or _exporters("METRICS", env))


def configure_sdk(service_name: str) -> tuple[bool, bool]:
    """Set up tracing and metrics export for this process, once per process id.

    Returns (tracing on, metrics on). Never raises: a missing SDK or a bad exporter setting is
    logged and leaves the no-op API in place.
    """
    global _configured_pid, _providers, _warned_missing_sdk
    with _lock:
        pid = os.getpid()
        if _configured_pid == pid:
            return _enabled()
        _configured_pid, _providers = pid, None
        env = dict(os.environ)
        traces, metric_names = _exporters("TRACES", env), _exporters("METRICS", env)
        prometheus = _prometheus_reader()
        if not traces and not metric_names and prometheus is None:
            _warn_prometheus_unserved(env)
            return False, False
        try:
            from saga.workers import _otel_sdk
        except ImportError as exc:
            if not _warned_missing_sdk:
                log.warning(
                    "OTEL_* settings ask for telemetry but the OpenTelemetry SDK or exporter is "
                    "not installed (%s); running without it. Install durable-saga[otel].",
                    exc,
                )
                _warned_missing_sdk = True
            return False, False
        try:
            _providers = _otel_sdk.configure(service_name, traces, metric_names, env, prometheus)
        except Exception as exc:  # a bad setting must not stop a worker
            log.warning("could not configure OpenTelemetry, running without it: %s", exc)
            return False, False
        atexit.register(shutdown_sdk)
        log.info(
            "OpenTelemetry on for %s (pid %d): traces %s, metrics %s",
            service_name,
            pid,
            ",".join(traces) or "off",
            ",".join([*metric_names, *(["prometheus"] if prometheus is not None else [])]) or "off",
        )
        return _enabled()


def _warn_prometheus_unserved(env: Mapping[str, str]) -> None:
    if "prometheus" in env.get("OTEL_METRICS_EXPORTER", "").lower():
        log.warning(
            "OTEL_METRICS_EXPORTER asks for prometheus: set SAGA_HTTP_PORT (or --http-port) to "
            "serve /metrics"
        )


def serve_prometheus(registry: Any) -> None:
    """Metrics recorded in this process go to ``registry`` (a prometheus_client
    ``CollectorRegistry`` served at /metrics). Call before ``configure_sdk``."""
    global _prometheus_registry
    _prometheus_registry = registry


def prometheus_children(folder: Path) -> None:
    """In a prefork worker's parent, before its pool forks: each child writes its metrics to a
    file in ``folder``, which the parent serves (``saga.workers.prometheus.ChildFiles``)."""
    global _prometheus_children
    _prometheus_children = folder


def _prometheus_reader() -> Any:
    """The Prometheus reader for this process's SDK, or None when /metrics is not served."""
    global _child_writer
    if _prometheus_registry is None and _prometheus_children is None:
        return None
    try:
        from saga.workers import prometheus
    except ImportError as exc:
        log.warning(
            "/metrics needs prometheus_client and opentelemetry-exporter-prometheus (%s): "
            "install durable-saga[prometheus]",
            exc,
        )
        return None
    if _prometheus_children is None:
        return prometheus.reader(_prometheus_registry)
    registry = prometheus.registry_with([])  # this child's own
    _child_writer = prometheus.ChildWriter(_prometheus_children, registry)
    reader = prometheus.reader(registry)
    _child_writer.start()
    return reader


def _enabled() -> tuple[bool, bool]:
    if _providers is None:
        return False, False
    return _providers.tracer_provider is not None, _providers.meter_provider is not None


def shutdown_sdk() -> None:
    """Flush spans and metrics and stop exporting; safe to call more than once."""
    global _providers, _child_writer
    with _lock:
        writer, _child_writer = _child_writer, None
        if writer is not None and _configured_pid == os.getpid():
            writer.stop()  # the child's last counts, for the parent's /metrics
        providers, _providers = _providers, None
        if providers is None or _configured_pid != os.getpid():
            return
    try:
        providers.shutdown()
    except Exception as exc:
        log.warning("flushing OpenTelemetry failed: %s", exc)


def saga_id_generator() -> Any:
    """The ``IdGenerator`` a hand-made ``TracerProvider`` needs for runs' root spans."""
    from saga.workers._otel_sdk import SagaIdGenerator

    return SagaIdGenerator()


# -- Celery worker hooks -------------------------------------------------------------------------


def _on_process_init(**_: Any) -> None:
    configure_sdk("saga-worker")


def _on_process_shutdown(**_: Any) -> None:
    shutdown_sdk()


def install_worker_hooks() -> None:
    """Configure telemetry in every pool process of a Celery worker and flush it as each ends.

    Call before the worker starts (``saga worker`` does). Prefork children and the solo pool
    send ``worker_process_init``; the threads pool does not, so ``saga worker --pool threads``
    configures the main process itself."""
    from celery import signals

    if not requested() and _prometheus_registry is None and _prometheus_children is None:
        return
    signals.worker_process_init.connect(_on_process_init, weak=False)
    signals.worker_process_shutdown.connect(_on_process_shutdown, weak=False)
    signals.worker_shutdown.connect(_on_process_shutdown, weak=False)
