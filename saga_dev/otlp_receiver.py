"""A minimal OTLP/HTTP receiver on loopback, for tests and benchmarks.

It accepts what the OTLP exporters POST to ``/v1/traces``, ``/v1/metrics`` and ``/v1/logs``
(protobuf, optionally gzipped) and answers 200 with an empty response. With ``decode=True`` (which
needs ``opentelemetry-proto``, installed with the OTLP exporter) it keeps every span and metric
data point as plain dictionaries; without, it only counts requests and bytes, as a cheap sink for
measuring the exporters' cost. Not a collector: nothing is forwarded or stored on disk.
"""

from __future__ import annotations

import gzip
import threading
import zlib
from dataclasses import dataclass, field
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Any

SPAN_KINDS = {
    0: "UNSPECIFIED", 1: "INTERNAL", 2: "SERVER", 3: "CLIENT", 4: "PRODUCER", 5: "CONSUMER",
}  # fmt: skip
STATUS_CODES = {0: "UNSET", 1: "OK", 2: "ERROR"}


@dataclass(frozen=True)
class ReceivedSpan:
    trace_id: str
    span_id: str
    parent_span_id: str
    name: str
    kind: str
    start_ns: int
    end_ns: int
    attributes: dict[str, Any]
    resource: dict[str, Any]
    status: str
    status_message: str
    events: list[tuple[str, dict[str, Any]]]
    links: list[tuple[str, str]]


@dataclass(frozen=True)
class ReceivedPoint:
    """One metric data point: its metric, attributes, value (sum/gauge) or count (histogram)."""

    metric: str
    kind: str
    attributes: dict[str, Any]
    resource: dict[str, Any]
    value: float | None = None
    count: int | None = None
    total: float | None = None


@dataclass
class _Store:
    spans: list[ReceivedSpan] = field(default_factory=list)
    points: list[ReceivedPoint] = field(default_factory=list)
    requests: int = 0
    bytes: int = 0
    lock: threading.Lock = field(default_factory=threading.Lock)


def _value(v: Any) -> Any:
    which = v.WhichOneof("value")
    if which is None:
        return None
    if which == "array_value":
        return [_value(x) for x in v.array_value.values]
    if which == "kvlist_value":
        return {kv.key: _value(kv.value) for kv in v.kvlist_value.values}
    return getattr(v, which)


def _attrs(kvs: Any) -> dict[str, Any]:
    return {kv.key: _value(kv.value) for kv in kvs}


def _decode_traces(body: bytes) -> list[ReceivedSpan]:
    from opentelemetry.proto.collector.trace.v1.trace_service_pb2 import (
        ExportTraceServiceRequest,
    )

    request = ExportTraceServiceRequest()
    request.ParseFromString(body)
    spans = []
    for rs in request.resource_spans:
        resource = _attrs(rs.resource.attributes)
        for ss in rs.scope_spans:
            for s in ss.spans:
                spans.append(
                    ReceivedSpan(
                        trace_id=s.trace_id.hex(),
                        span_id=s.span_id.hex(),
                        parent_span_id=s.parent_span_id.hex(),
                        name=s.name,
                        kind=SPAN_KINDS.get(s.kind, str(s.kind)),
                        start_ns=s.start_time_unix_nano,
                        end_ns=s.end_time_unix_nano,
                        attributes=_attrs(s.attributes),
                        resource=resource,
                        status=STATUS_CODES.get(s.status.code, str(s.status.code)),
                        status_message=s.status.message,
                        events=[(e.name, _attrs(e.attributes)) for e in s.events],
                        links=[(link.trace_id.hex(), link.span_id.hex()) for link in s.links],
                    )
                )
    return spans


def _decode_metrics(body: bytes) -> list[ReceivedPoint]:
    from opentelemetry.proto.collector.metrics.v1.metrics_service_pb2 import (
        ExportMetricsServiceRequest,
    )

    request = ExportMetricsServiceRequest()
    request.ParseFromString(body)
    points = []
    for rm in request.resource_metrics:
        resource = _attrs(rm.resource.attributes)
        for sm in rm.scope_metrics:
            for m in sm.metrics:
                kind = m.WhichOneof("data") or ""
                data = getattr(m, kind) if kind else None
                for p in getattr(data, "data_points", ()):
                    if kind == "histogram":
                        attrs = _attrs(p.attributes)
                        points.append(
                            ReceivedPoint(m.name, kind, attrs, resource, count=p.count, total=p.sum)
                        )
                    else:
                        which = p.WhichOneof("value")
                        value = float(getattr(p, which)) if which else None
                        points.append(
                            ReceivedPoint(m.name, kind, _attrs(p.attributes), resource, value)
                        )
    return points


class OTLPReceiver:
    """``with OTLPReceiver() as r:`` point exporters at ``r.endpoint``, then read ``r.spans()``."""

    def __init__(self, *, host: str = "127.0.0.1", port: int = 0, decode: bool = True) -> None:
        store = self._store = _Store()

        class Handler(BaseHTTPRequestHandler):
            def do_POST(self) -> None:
                length = int(self.headers.get("Content-Length") or 0)
                body = self.rfile.read(length)
                encoding = (self.headers.get("Content-Encoding") or "").lower()
                if encoding == "gzip":
                    body = gzip.decompress(body)
                elif encoding == "deflate":
                    body = zlib.decompress(body)
                spans: list[ReceivedSpan] = []
                points: list[ReceivedPoint] = []
                if decode and self.path.endswith("/v1/traces"):
                    spans = _decode_traces(body)
                elif decode and self.path.endswith("/v1/metrics"):
                    points = _decode_metrics(body)
                with store.lock:
                    store.requests += 1
                    store.bytes += len(body)
                    store.spans.extend(spans)
                    store.points.extend(points)
                self.send_response(200)
                self.send_header("Content-Type", "application/x-protobuf")
                self.send_header("Content-Length", "0")
                self.end_headers()

            def log_message(self, format: str, *args: Any) -> None:
                pass

        self._server = ThreadingHTTPServer((host, port), Handler)
        self._server.daemon_threads = True
        self._thread = threading.Thread(
            target=self._server.serve_forever, name="otlp-receiver", daemon=True
        )

    @property
    def endpoint(self) -> str:
        host, port = self._server.server_address[:2]
        return f"http://{host!s}:{port}"

    def start(self) -> OTLPReceiver:
        self._thread.start()
        return self

    def stop(self) -> None:
        self._server.shutdown()
        self._server.server_close()

    def __enter__(self) -> OTLPReceiver:
        return self.start()

    def __exit__(self, *exc: object) -> None:
        self.stop()

    def spans(self) -> list[ReceivedSpan]:
        with self._store.lock:
            return list(self._store.spans)

    def points(self) -> list[ReceivedPoint]:
        with self._store.lock:
            return list(self._store.points)

    @property
    def requests(self) -> int:
        return self._store.requests

    @property
    def bytes_received(self) -> int:
        return self._store.bytes
