"""The OpenTelemetry SDK setup proper. Imported only by ``saga.workers.telemetry``, and only when
the environment asks for telemetry: an ImportError here means the SDK is not installed."""

from __future__ import annotations

import importlib
import logging
import os
import socket
import uuid
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

from opentelemetry import metrics, trace
from opentelemetry.sdk.metrics import MeterProvider
from opentelemetry.sdk.metrics.export import (
    ConsoleMetricExporter,
    MetricExporter,
    MetricReader,
    PeriodicExportingMetricReader,
)
from opentelemetry.sdk.resources import Resource
from opentelemetry.sdk.trace import TracerProvider
from opentelemetry.sdk.trace.export import BatchSpanProcessor, ConsoleSpanExporter, SpanExporter
from opentelemetry.sdk.trace.id_generator import RandomIdGenerator

from saga.tracing import forced_ids

log = logging.getLogger("saga.telemetry")


class SagaIdGenerator(RandomIdGenerator):
    """Random ids, except for a run's root span, whose ids were chosen when the run started
    (``saga.tracing.run_finished`` states them while it starts that span)."""

    def generate_span_id(self) -> int:
        forced = forced_ids()
        return forced[1] if forced is not None else super().generate_span_id()

    def generate_trace_id(self) -> int:
        forced = forced_ids()
        return forced[0] if forced is not None else super().generate_trace_id()


@dataclass
class Providers:
    tracer_provider: TracerProvider | None
    meter_provider: MeterProvider | None

    def shutdown(self) -> None:
        """Flush and stop: export every ended span and a last collection of the metrics."""
        if self.tracer_provider is not None:
            self.tracer_provider.force_flush(timeout_millis=10_000)
            self.tracer_provider.shutdown()
        if self.meter_provider is not None:
            self.meter_provider.shutdown(timeout_millis=10_000)


def _protocol(signal: str, env: Mapping[str, str]) -> str:
    return (
        env.get(f"OTEL_EXPORTER_OTLP_{signal}_PROTOCOL")
        or env.get("OTEL_EXPORTER_OTLP_PROTOCOL")
        or "http/protobuf"
    ).strip()


def _otlp(signal: str, env: Mapping[str, str]) -> Any:
    kind = "trace_exporter" if signal == "TRACES" else "metric_exporter"
    cls = "OTLPSpanExporter" if signal == "TRACES" else "OTLPMetricExporter"
    transport = "grpc" if _protocol(signal, env) == "grpc" else "http"
    module = importlib.import_module(f"opentelemetry.exporter.otlp.proto.{transport}.{kind}")
    return getattr(module, cls)()  # endpoint, headers, timeout, compression: from OTEL_*


def _span_exporters(names: list[str], env: Mapping[str, str]) -> list[SpanExporter]:
    exporters: list[SpanExporter] = []
    for name in names:
        if name == "otlp":
            exporters.append(_otlp("TRACES", env))
        elif name == "console":
            exporters.append(ConsoleSpanExporter())
        else:
            log.warning("OTEL_TRACES_EXPORTER=%s is not supported here (otlp, console)", name)
    return exporters


def _metric_exporters(names: list[str], env: Mapping[str, str]) -> list[MetricExporter]:
    exporters: list[MetricExporter] = []
    for name in names:
        if name == "otlp":
            exporters.append(_otlp("METRICS", env))
        elif name == "console":
            exporters.append(ConsoleMetricExporter())
        else:
            log.warning("OTEL_METRICS_EXPORTER=%s is not supported here (otlp, console)", name)
    return exporters


def _resource(service_name: str, env: Mapping[str, str]) -> Resource:
    attributes: dict[str, Any] = {
        # Every process (each prefork child too) reports its own metric streams.
        "service.instance.id": f"{socket.gethostname()}:{os.getpid()}:{uuid.uuid4().hex[:8]}",
        "process.pid": os.getpid(),
    }
    named = env.get("OTEL_SERVICE_NAME") or "service.name=" in env.get(
        "OTEL_RESOURCE_ATTRIBUTES", ""
    )
    if not named:
        attributes["service.name"] = service_name
    return Resource.create(attributes)


def configure(
    service_name: str,
    traces: list[str],
    metric_names: list[str],
    env: Mapping[str, str],
    prometheus: MetricReader | None = None,
) -> Providers:
    """Build and install the global tracer and meter providers for this process."""
    resource = _resource(service_name, env)
    tracer_provider = None
    span_exporters = _span_exporters(traces, env)
    if span_exporters:
        # The sampler comes from OTEL_TRACES_SAMPLER (default: parent-based, always on).
        tracer_provider = TracerProvider(
            resource=resource, id_generator=SagaIdGenerator(), shutdown_on_exit=False
        )
        for exporter in span_exporters:
            # Batching (OTEL_BSP_*) keeps export off the step's path.
            tracer_provider.add_span_processor(BatchSpanProcessor(exporter))
        trace.set_tracer_provider(tracer_provider)
    meter_provider = None
    metric_exporters = _metric_exporters(metric_names, env)
    if metric_exporters or prometheus is not None:
        readers: list[MetricReader] = [
            PeriodicExportingMetricReader(e) for e in metric_exporters
        ]  # interval: OTEL_METRIC_EXPORT_INTERVAL
        if prometheus is not None:
            readers.append(prometheus)  # pulled at each scrape of /metrics
        meter_provider = MeterProvider(
            resource=resource, metric_readers=readers, shutdown_on_exit=False
        )
        metrics.set_meter_provider(meter_provider)
    return Providers(tracer_provider, meter_provider)
