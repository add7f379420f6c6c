"""Log records carry the step's ids and the current span's, as text and as JSON."""

from __future__ import annotations

import json
import logging

from opentelemetry import trace
from opentelemetry.sdk.trace import TracerProvider

from saga import logs


def record(message: str = "hello %s", *args: object) -> logging.LogRecord:
    rec = logging.LogRecord("tests", logging.WARNING, __file__, 1, message, args or ("x",), None)
    logs.StepFieldsFilter().filter(rec)
    return rec


def test_json_records_inside_a_step_and_span_carry_every_id() -> None:
    tracer = TracerProvider().get_tracer("tests")  # not installed globally
    with (
        logs.bound_step("run-7", "decide#3", 2, "ab" * 16),
        tracer.start_as_current_span("step decide") as span,
    ):
        out = json.loads(logs.JsonFormatter().format(record()))
    ids = span.get_span_context()
    assert out["message"] == "hello x"
    assert (out["run_id"], out["step_key"], out["attempt"]) == ("run-7", "decide#3", 2)
    assert out["trace_id"] == trace.format_trace_id(ids.trace_id)
    assert out["span_id"] == trace.format_span_id(ids.span_id)


def test_without_a_span_the_runs_stored_trace_id_is_used() -> None:
    with logs.bound_step(
        "run-7", "book", 1, logs.trace_id_of("00-" + "cd" * 16 + "-" + "ef" * 8 + "-01")
    ):
        out = json.loads(logs.JsonFormatter().format(record()))
    assert out["trace_id"] == "cd" * 16
    assert "span_id" not in out


def test_records_outside_a_step_have_no_ids() -> None:
    out = json.loads(logs.JsonFormatter().format(record()))
    assert not set(logs.FIELDS) & set(out)
    assert logs.TextFormatter().format(record()).endswith("hello x")


def test_text_records_show_the_ids_before_a_traceback() -> None:
    with logs.bound_step("run-7", "book", 3):
        try:
            raise ValueError("boom")
        except ValueError:
            import sys

            rec = record()
            rec.exc_info = sys.exc_info()
            line = logs.TextFormatter().format(rec)
    first, _, rest = line.partition("\n")
    assert first.endswith("hello x [run=run-7 step=book attempt=3]")
    assert "ValueError: boom" in rest


def test_a_malformed_traceparent_gives_no_trace_id() -> None:
    assert logs.trace_id_of(None) is None
    assert logs.trace_id_of("garbage") is None
    assert logs.trace_id_of("00-" + "0" * 32 + "-" + "1" * 16 + "-01") is None
