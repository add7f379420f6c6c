"""Log records that say which run, step and trace they belong to, as text or JSON lines.

The executor binds the run id, step key and attempt (and the run's trace id) around each step
attempt (``bound_step``); a filter on the process's handlers copies them, and the current span's
trace and span ids, onto every record emitted meanwhile, the step function's own logging
included. Records carry only the formatted message and these ids, never a step's input or
result: what a message says is its caller's choice, and the engine's messages name ids, types
and limits, not values.
"""

from __future__ import annotations

import contextlib
import contextvars
import json
import logging
import sys
from collections.abc import Iterator
from dataclasses import dataclass
from datetime import UTC, datetime
from typing import Literal

from opentelemetry import trace


@dataclass(frozen=True)
class StepFields:
    run_id: str
    step_key: str
    attempt: int
    trace_id: str | None = None  # the run's, from its stored trace context; a live span wins


_STEP: contextvars.ContextVar[StepFields | None] = contextvars.ContextVar(
    "saga_log_step", default=None
)

# The fields added to every record (None when outside a step or span).
FIELDS = ("run_id", "step_key", "attempt", "trace_id", "span_id")


@contextlib.contextmanager
def bound_step(
    run_id: str, step_key: str, attempt: int, trace_id: str | None = None
) -> Iterator[None]:
    """Records emitted inside carry this step's ids."""
    token = _STEP.set(StepFields(run_id, step_key, attempt, trace_id))
    try:
        yield
    finally:
        _STEP.reset(token)


def trace_id_of(traceparent: str | None) -> str | None:
    """The trace id of a W3C ``traceparent`` (``00-<trace>-<span>-<flags>``), if well formed."""
    parts = (traceparent or "").split("-")
    if len(parts) == 4 and len(parts[1]) == 32 and parts[1] != "0" * 32:
        return parts[1]
    return None


class StepFieldsFilter(logging.Filter):
    """Adds ``run_id``, ``step_key``, ``attempt``, ``trace_id`` and ``span_id`` to each record."""

    def filter(self, record: logging.LogRecord) -> bool:
        step = _STEP.get()
        record.run_id = step.run_id if step else None
        record.step_key = step.step_key if step else None
        record.attempt = step.attempt if step else None
        span = trace.get_current_span().get_span_context()
        if span.is_valid:
            record.trace_id = trace.format_trace_id(span.trace_id)
            record.span_id = trace.format_span_id(span.span_id)
        else:
            record.trace_id = step.trace_id if step else None
            record.span_id = None
        return True


class TextFormatter(logging.Formatter):
    """``time level logger message [run=… step=… attempt=… trace=… span=…]``."""

    def __init__(self) -> None:
        super().__init__("%(asctime)s %(levelname)s %(name)s %(message)s")

    def format(self, record: logging.LogRecord) -> str:
        line = super().format(record)
        ids = [
            f"{short}={value}"
            for short, value in (
                ("run", getattr(record, "run_id", None)),
                ("step", getattr(record, "step_key", None)),
                ("attempt", getattr(record, "attempt", None)),
                ("trace", getattr(record, "trace_id", None)),
                ("span", getattr(record, "span_id", None)),
            )
            if value is not None
        ]
        if not ids:
            return line
        first, newline, rest = line.partition("\n")  # after the message, before a traceback
        return f"{first} [{' '.join(ids)}]{newline}{rest}"


class JsonFormatter(logging.Formatter):
    """One JSON object per line: time, level, logger, message, the step's ids, and the
    exception's type and traceback when the record has one."""

    def format(self, record: logging.LogRecord) -> str:
        out: dict[str, object] = {
            "time": datetime.fromtimestamp(record.created, UTC).isoformat(timespec="milliseconds"),
            "level": record.levelname,
            "logger": record.name,
            "message": record.getMessage(),
            "process": record.process,
        }
        for name in FIELDS:
            value = getattr(record, name, None)
            if value is not None:
                out[name] = value
        if record.exc_info and record.exc_info[0] is not None:
            out["exception_type"] = record.exc_info[0].__name__
            out["traceback"] = self.formatException(record.exc_info)
        return json.dumps(out, ensure_ascii=False, default=str)


def configure(level: str, fmt: Literal["text", "json"]) -> None:
    """Set up the root logger of a process (the CLI's entry point does, once)."""
    handler = logging.StreamHandler(sys.stderr)
    handler.setFormatter(JsonFormatter() if fmt == "json" else TextFormatter())
    handler.addFilter(StepFieldsFilter())
    root = logging.getLogger()
    for old in list(root.handlers):
        root.removeHandler(old)
    root.addHandler(handler)
    root.setLevel(level.upper())
