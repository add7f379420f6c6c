"""saga.tracing in process: the root span's ids, compensation/replay/wait spans, the no-op path."""

from __future__ import annotations

import time
from collections.abc import Iterator
from typing import Any

import pytest
from pydantic import BaseModel, ValidationError

from saga import tracing
from saga.workers import telemetry

sdk_trace = pytest.importorskip("opentelemetry.sdk.trace")
in_memory = pytest.importorskip("opentelemetry.sdk.trace.export.in_memory_span_exporter")
sdk_export = pytest.importorskip("opentelemetry.sdk.trace.export")


@pytest.fixture
def exported(monkeypatch: pytest.MonkeyPatch) -> Iterator[Any]:
    """Spans of saga.tracing go to memory, through an SDK set up as saga.workers.telemetry does."""
    from saga.workers._otel_sdk import SagaIdGenerator

    exporter = in_memory.InMemorySpanExporter()
    provider = sdk_trace.TracerProvider(id_generator=SagaIdGenerator(), shutdown_on_exit=False)
    provider.add_span_processor(sdk_export.SimpleSpanProcessor(exporter))
    monkeypatch.setattr(tracing, "_tracer", provider.get_tracer("test"))
    monkeypatch.setattr(tracing, "enabled", lambda: True)
    yield exporter
    provider.shutdown()


def test_root_span_has_the_ids_stored_at_start_and_everything_descends_from_it(
    exported: Any,
) -> None:
    # The caller's own span, e.g. the web request that starts the run: the root links to it.
    with tracing._tracer.start_as_current_span("POST /orders") as request:
        carrier = tracing.new_run_carrier(start_ns=1_700_000_000_000_000_000)
    root_ctx = tracing.root_span_context(carrier)
    assert root_ctx is not None and root_ctx.trace_id != request.get_span_context().trace_id

    tracing.replayed_step(
        carrier, saga_name="trip", run_id="r1", step="book", attempt=1, idempotency_key="r1:book"
    )
    with (
        pytest.raises(RuntimeError),
        tracing.step_span(
            saga_name="trip",
            run_id="r1",
            step="refund",
            attempt=2,
            idempotency_key="r1:compensate:refund",
            compensation=True,
            carrier=carrier,
        ),
    ):
        raise RuntimeError("the refund API is down")
    tracing.record_wait(
        carrier,
        kind="sleep",
        saga_name="trip",
        run_id="r1",
        start=1_700_000_000_500_000_000,
        end=1_700_000_001_500_000_000,
    )
    tracing.run_finished(
        carrier,
        saga_name="trip",
        run_id="r1",
        state="compensation_failed",
        error={"type": "RuntimeError", "message": "the refund API is down", "traceback": "..."},
    )

    spans = {s.name: s for s in exported.get_finished_spans()}
    root = spans["saga trip"]
    assert (root.context.trace_id, root.context.span_id) == (root_ctx.trace_id, root_ctx.span_id)
    assert root.parent is None
    assert root.start_time == 1_700_000_000_000_000_000
    assert root.status.status_code.name == "ERROR"
    assert root.events[0].name == "exception"
    assert root.attributes["saga.run.state"] == "compensation_failed"
    assert [link.context.span_id for link in root.links] == [request.get_span_context().span_id]

    replayed, compensation, wait = (
        spans["step book"],
        spans["compensate refund"],
        spans["wait sleep"],
    )
    for span in (replayed, compensation, wait):
        assert span.context.trace_id == root_ctx.trace_id
        assert span.parent is not None and span.parent.span_id == root_ctx.span_id
    assert replayed.attributes["saga.step.replayed"] is True
    assert compensation.attributes["saga.compensation"] is True
    assert compensation.attributes["saga.step.replayed"] is False
    assert compensation.status.status_code.name == "ERROR"
    assert [e.name for e in compensation.events] == ["exception"]
    assert (wait.start_time, wait.end_time) == (
        1_700_000_000_500_000_000,
        1_700_000_001_500_000_000,
    )
    assert wait.attributes["saga.wait.kind"] == "sleep"
    # Only the root took the forced ids.
    assert len({s.context.span_id for s in spans.values()}) == len(spans)


def test_a_duplicate_delivery_is_replayed_under_its_publisher_when_that_is_in_the_run(
    exported: Any,
) -> None:
    carrier = tracing.new_run_carrier()
    root = tracing.root_span_context(carrier)
    assert root is not None
    sent = {tracing.TRACEPARENT: f"00-{root.trace_id:032x}-{0xABC:016x}-01"}
    elsewhere = {tracing.TRACEPARENT: f"00-{1:032x}-{0xDEF:016x}-01"}  # another trace
    step: dict[str, Any] = {"saga_name": "trip", "run_id": "r1", "step": "book", "attempt": 3}
    for headers in (sent, elsewhere, None):
        tracing.replayed_step(carrier, **step, idempotency_key="r1:book", headers=headers)
    spans = exported.get_finished_spans()
    assert [s.parent.span_id for s in spans] == [0xABC, root.span_id, root.span_id]
    assert {s.context.trace_id for s in spans} == {root.trace_id}
    assert all(s.attributes["saga.step.replayed"] is True for s in spans)
    assert all(s.attributes["saga.step.attempt"] == 3 for s in spans)


def test_without_an_sdk_the_api_is_a_cheap_no_op() -> None:
    carrier = tracing.new_run_carrier()
    assert set(carrier) == {tracing.TRACEPARENT, tracing.RUN_START}
    started = time.perf_counter()
    n = 2000
    for _ in range(n):
        with tracing.step_span(
            saga_name="s", run_id="r", step="a", attempt=1, idempotency_key="r:a", carrier=carrier
        ):
            pass
        tracing.attempt_completed()
    per_step = (time.perf_counter() - started) / n
    assert per_step < 200e-6, f"{per_step * 1e6:.1f} us per step span with no SDK"
    tracing.run_finished(carrier, saga_name="s", run_id="r", state="completed")


def test_configuration_follows_the_standard_variables() -> None:
    assert not telemetry.requested({})
    assert telemetry.requested({"OTEL_EXPORTER_OTLP_ENDPOINT": "http://127.0.0.1:4318"})
    assert telemetry._exporters("TRACES", {"OTEL_TRACES_EXPORTER": "otlp,console"}) == [
        "otlp",
        "console",
    ]
    assert not telemetry.requested(
        {"OTEL_EXPORTER_OTLP_ENDPOINT": "http://x", "OTEL_SDK_DISABLED": "true"}
    )
    assert not telemetry.requested(
        {"OTEL_TRACES_EXPORTER": "none", "OTEL_METRICS_EXPORTER": "none"}
    )
    assert tracing.messaging_system("redis://localhost:6379/0") == "redis"
    assert tracing.messaging_system("amqp://guest@rabbit//") == "rabbitmq"
    assert tracing.messaging_system("sqs://") == "aws_sqs"


# -- redaction ------------------------------------------------------------------------------------

SECRET = "sk-live-4f9a7c1e"


class Secretive(BaseModel):
    count: int


def _validation_error() -> ValidationError:
    try:
        Secretive(count=SECRET)  # type: ignore[arg-type]
    except ValidationError as exc:
        return exc
    raise AssertionError("pydantic accepted a str for an int")


def _everything(span: Any) -> str:
    """Every text of a finished span that an exporter would send."""
    parts = [span.name, span.status.description or "", repr(dict(span.attributes))]
    parts += [f"{e.name} {dict(e.attributes)!r}" for e in span.events]
    return "\n".join(parts)


def _fail_in_step(error: BaseException) -> None:
    with (
        pytest.raises(type(error)),
        tracing.step_span(
            saga_name="s", run_id="r1", step="charge", attempt=1, idempotency_key="r1:charge"
        ),
    ):
        raise error


def test_exceptions_are_exported_as_their_type_and_a_fixed_message(exported: Any) -> None:
    _fail_in_step(ValueError(f"bad key {SECRET}"))
    tracing.run_finished(
        tracing.new_run_carrier(),
        saga_name="s",
        run_id="r1",
        state="failed",
        error={"type": "builtins.ValueError", "message": f"bad key {SECRET}", "traceback": SECRET},
    )
    step, root = sorted(exported.get_finished_spans(), key=lambda s: s.name, reverse=True)
    for span in (step, root):
        assert SECRET not in _everything(span)
        (event,) = span.events
        assert dict(event.attributes) == {
            "exception.type": "builtins.ValueError",
            "exception.message": tracing.REDACTED,
        }
        assert span.status.status_code.name == "ERROR"
        assert span.status.description == f"ValueError: {tracing.REDACTED}"
        assert span.attributes["error.type"] == "builtins.ValueError"


def test_exception_details_are_exported_when_asked_without_pydantic_inputs(
    exported: Any, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(tracing, "_details", False)  # restored after the test
    tracing.export_exception_details(True)
    _fail_in_step(ValueError("the card was declined"))
    _fail_in_step(_validation_error())
    plain, validation = sorted(exported.get_finished_spans(), key=lambda s: s.start_time)
    event = dict(plain.events[0].attributes)
    assert event["exception.message"] == "the card was declined"
    assert "Traceback" in event["exception.stacktrace"]
    assert SECRET not in _everything(validation)
    event = dict(validation.events[0].attributes)
    assert "count: Input should be a valid integer" in event["exception.message"]
    assert "ValidationError" in event["exception.stacktrace"]
