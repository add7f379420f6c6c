"""OpenTelemetry spans and metrics for saga runs, written against ``opentelemetry-api`` only.

One trace per run, however many processes and hours it crosses::

    saga <name>                        root: INTERNAL, run start .. run end (emitted at the end)
    ├── send <queue>                   PRODUCER: a relay (or a worker's fast path) publishing a row
    │   ├── process <queue>            CONSUMER: one delivery that claimed a step attempt
    │   │   ├── step <step>            INTERNAL: the step function (``compensate <step>`` for
    │   │   │                          a compensation); its exceptions are recorded here
    │   │   └── step <step>            ``saga.step.replayed``: a step the workflow replay
    │   │                              after this attempt read back from the journal
    │   │                              (once per process; also under the root after an event)
    │   └── step <step>                ``saga.step.replayed``: a duplicate delivery of a step
    │                                  the journal holds as completed (nothing is called)
    ├── step <step>                    an attempt lost with its worker, recorded by the sweeper
    │                                  (``saga.step.lost``): the worker's own spans died with it
    ├── wait retry_backoff             INTERNAL: failed attempt .. next attempt
    ├── wait sleep / wait event        a durable sleep, an event wait: scheduled .. over
    └── ...

How the root works. A run lives for hours in many processes, so no process can hold its root
span open. ``new_run_carrier()`` (the client, at start) draws the root's trace id and span id and
writes them as a W3C ``traceparent`` into ``saga_runs.trace_context``; every outbox row created
for the run copies that carrier into its headers, so every span of the run descends from that one
span context. When the run reaches a final state, the process that committed it calls
``run_finished()``, which emits the root span with the stored ids, the run's start time (also in
the carrier) as its start, and now as its end. Giving a span a chosen id is not in the tracing
API: ``run_finished()`` states the ids it wants in a context variable, and the SDK setup in
``saga.workers.telemetry`` installs an ``IdGenerator`` that honours it (anyone configuring the
SDK by hand must pass ``saga.workers.telemetry.saga_id_generator()``; without it the root gets
fresh ids and the run's spans show a missing parent). If the finishing process dies before
exporting, the root is lost while its children survive.

Exceptions are redacted. A step that raised with a secret in its message (an API key, a user's
input) must not export it: by default a span records an exception's type and the fixed message
``REDACTED``, with no stack trace and no message in its status (the journal keeps them, see
``saga.failures``). ``SAGA_TRACE_EXCEPTION_DETAILS=true`` exports message and stack trace, still
without the input values pydantic puts in its errors; the process entry points (worker, relay,
operator commands, ``SagaClient``) switch it on from their settings with
``export_exception_details()``.

With no SDK configured the API's no-op tracer and meter make all of this cost microseconds, and
nothing here does any I/O or database work of its own.
"""

from __future__ import annotations

import contextlib
import contextvars
import datetime as dt
import functools
import random
import time
from collections import Counter
from collections.abc import Iterator, Mapping, Sequence
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any
from urllib.parse import urlsplit

from opentelemetry import metrics, trace
from opentelemetry.context import Context
from opentelemetry.trace import Link, Span, SpanKind, Status, StatusCode, TraceFlags

from saga.failures import exception_text, format_traceback
from saga.states import RunState, StepKind

if TYPE_CHECKING:
    from saga.outbox.message import OutboxMessage
    from saga.records import Claim

INSTRUMENTATION = "durable-saga"

TRACEPARENT = "traceparent"
RUN_START = "saga-run-start"  # carrier key: the run's start, integer nanoseconds since the epoch
STARTED_BY = "saga-started-by"  # carrier key: traceparent of the span that started the run
SENT_AT = "saga-sent-at"  # message header: publish time, seconds since the epoch

# Attribute names: OpenTelemetry messaging semantic conventions, then the saga's own.
MESSAGING_SYSTEM = "messaging.system"
MESSAGING_DESTINATION = "messaging.destination.name"
MESSAGING_OPERATION_TYPE = "messaging.operation.type"
MESSAGING_OPERATION_NAME = "messaging.operation.name"
MESSAGING_MESSAGE_ID = "messaging.message.id"
ERROR_TYPE = "error.type"
SAGA_NAME = "saga.name"
SAGA_RUN_ID = "saga.run_id"
SAGA_RUN_STATE = "saga.run.state"
SAGA_STEP = "saga.step"
SAGA_STEP_KEY = "saga.step.key"
SAGA_STEP_ATTEMPT = "saga.step.attempt"
SAGA_STEP_IDEMPOTENCY_KEY = "saga.step.idempotency_key"
SAGA_STEP_REPLAYED = "saga.step.replayed"
SAGA_STEP_LOST = "saga.step.lost"
SAGA_STEP_OUTCOME = "saga.step.outcome"
SAGA_COMPENSATION = "saga.compensation"
SAGA_WAIT_KIND = "saga.wait.kind"

REDACTED = "redacted; see the journal"  # what a span says of an exception's message

# Durations in seconds, from a few milliseconds to the ten minutes an agent step may take.
_SECONDS_BUCKETS = (
    0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0, 60.0, 120.0, 300.0, 600.0,
)  # fmt: skip

_tracer = trace.get_tracer(INSTRUMENTATION)
_meter = metrics.get_meter(INSTRUMENTATION)

STEP_DURATION = _meter.create_histogram(
    "saga.step.duration",
    unit="s",
    description="One step attempt, from its message's delivery to its committed outcome.",
    explicit_bucket_boundaries_advisory=_SECONDS_BUCKETS,
)
STEP_ATTEMPTS = _meter.create_counter(
    "saga.step.attempts", unit="{attempt}", description="Step attempts run, by outcome."
)
COMPENSATIONS = _meter.create_counter(
    "saga.compensations",
    unit="{attempt}",
    description="Compensation attempts run, by outcome.",
)
QUEUE_WAIT = _meter.create_histogram(
    "saga.step.queue_wait",
    unit="s",
    description="Time a step message spent in the broker, from publish to delivery.",
    explicit_bucket_boundaries_advisory=_SECONDS_BUCKETS,
)
RUNS_FINISHED = _meter.create_counter(
    "saga.runs.finished", unit="{run}", description="Runs that reached a final state, by state."
)
MESSAGES_PUBLISHED = _meter.create_counter(
    "saga.outbox.published", unit="{message}", description="Outbox messages sent to the broker."
)

# The ids run_finished() wants for the span it is starting; read by the SDK's IdGenerator.
_FORCED_IDS: contextvars.ContextVar[tuple[int, int] | None] = contextvars.ContextVar(
    "saga_forced_span_ids", default=None
)
_ATTEMPT: contextvars.ContextVar[AttemptTrace | None] = contextvars.ContextVar(
    "saga_attempt", default=None
)


def forced_ids() -> tuple[int, int] | None:
    """(trace id, span id) that the span being started must have, or None. For IdGenerators."""
    return _FORCED_IDS.get()


# -- carriers -------------------------------------------------------------------------------------


def new_run_carrier(start_ns: int | None = None) -> dict[str, str]:
    """The trace context of a new run: a fresh root span context (always sampled), the run's
    start time, and the caller's span if there is one (the root links to it)."""
    trace_id = random.getrandbits(128) or 1
    span_id = random.getrandbits(64) or 1
    carrier = {
        TRACEPARENT: f"00-{trace_id:032x}-{span_id:016x}-01",
        RUN_START: str(start_ns if start_ns is not None else time.time_ns()),
    }
    caller = trace.get_current_span().get_span_context()
    if caller.is_valid:
        carrier[STARTED_BY] = (
            f"00-{caller.trace_id:032x}-{caller.span_id:016x}-{int(caller.trace_flags):02x}"
        )
    return carrier


@functools.lru_cache(maxsize=4096)
def _parse_traceparent(value: str) -> trace.SpanContext | None:
    """A W3C ``traceparent`` (version 00 layout) as a remote span context, or None if invalid.
    Cached: every span of a run parses the same few strings."""
    parts = value.strip().split("-")
    if len(parts) < 4 or len(parts[0]) != 2 or parts[0] == "ff":
        return None
    version, trace_hex, span_hex, flags_hex = parts[:4]
    if len(trace_hex) != 32 or len(span_hex) != 16 or len(flags_hex) != 2:
        return None
    if version == "00" and len(parts) != 4:
        return None
    try:
        ctx = trace.SpanContext(
            int(trace_hex, 16),
            int(span_hex, 16),
            is_remote=True,
            trace_flags=TraceFlags(int(flags_hex, 16) & TraceFlags.SAMPLED),
        )
    except ValueError:
        return None
    return ctx if ctx.is_valid else None


def _span_context(carrier: Mapping[str, Any] | None, key: str) -> trace.SpanContext | None:
    if not carrier:
        return None
    value = carrier.get(key)
    return _parse_traceparent(value) if isinstance(value, str) else None


def root_span_context(carrier: Mapping[str, Any] | None) -> trace.SpanContext | None:
    """The run's root span context stored in a carrier, or None."""
    return _span_context(carrier, TRACEPARENT)


def _context(span: trace.SpanContext | None) -> Context | None:
    return None if span is None else trace.set_span_in_context(trace.NonRecordingSpan(span))


def _parent(carrier: Mapping[str, Any] | None) -> Context | None:
    return _context(root_span_context(carrier))


def _delivery_parent(
    carrier: Mapping[str, Any] | None, headers: Mapping[str, Any] | None
) -> tuple[trace.SpanContext | None, Sequence[Link]]:
    """Where a delivery's spans go: under the span that published the message when it is in
    the run's trace, else under the run's root (linked to a publisher from another trace)."""
    root = root_span_context(carrier)
    sent = _span_context(headers, TRACEPARENT)
    if sent is not None and (root is None or sent.trace_id == root.trace_id):
        return sent, ()
    return root, () if sent is None else (Link(sent),)


def messaging_system(broker_url: str | None) -> str:
    """``messaging.system`` for a Celery broker URL: the broker actually used."""
    scheme = urlsplit(broker_url or "").scheme.lower()
    if scheme.startswith(("amqp", "pyamqp", "librabbitmq")):
        return "rabbitmq"
    if scheme.startswith(("redis", "rediss", "sentinel")):
        return "redis"
    if scheme == "sqs":
        return "aws_sqs"
    return scheme or "unknown"


_details = False  # export exception messages and stack traces (SAGA_TRACE_EXCEPTION_DETAILS)


def export_exception_details(on: bool) -> None:
    """Whether spans of this process carry exception messages and stack traces (off: the type
    and ``REDACTED`` only). Set by the process entry point from its settings."""
    global _details
    _details = on


def _exception_type(exc: BaseException) -> str:
    return f"{type(exc).__module__}.{type(exc).__qualname__}"


def _record_exception(span: Span, exc: BaseException, *, event: bool = True) -> None:
    """Error status, ``error.type`` and (with ``event``) an ``exception`` event: the message and
    stack trace only when exported on purpose."""
    kind = _exception_type(exc)
    _record_error(
        span,
        kind,
        exception_text(exc) if _details else REDACTED,
        format_traceback(exc) if _details and event else None,
        event=event,
    )


def _record_error(
    span: Span, kind: str, message: str, stacktrace: str | None, *, event: bool = True
) -> None:
    if event:
        attributes = {"exception.type": kind, "exception.message": message}
        if stacktrace:
            attributes["exception.stacktrace"] = stacktrace
        span.add_event("exception", attributes)
    span.set_status(Status(StatusCode.ERROR, f"{kind.rpartition('.')[2]}: {message}"[:500]))
    span.set_attribute(ERROR_TYPE, kind)


# -- publishing -----------------------------------------------------------------------------------


@contextlib.contextmanager
def send_span(message: OutboxMessage, system: str) -> Iterator[dict[str, str]]:
    """A PRODUCER span around publishing one outbox message; yields the headers to send: the
    row's, with this span as the ``traceparent`` (when it records) and the publish time."""
    headers = dict(message.headers)
    headers[SENT_AT] = f"{time.time():.6f}"
    if not enabled():
        yield headers
        return
    payload = message.payload
    with _tracer.start_as_current_span(
        f"send {message.destination}",
        context=_parent(headers),
        kind=SpanKind.PRODUCER,
        attributes={
            MESSAGING_SYSTEM: system,
            MESSAGING_DESTINATION: message.destination,
            MESSAGING_OPERATION_TYPE: "send",
            MESSAGING_OPERATION_NAME: "send",
            MESSAGING_MESSAGE_ID: str(message.message_id),
            SAGA_RUN_ID: str(payload.get("run_id", "")),
            SAGA_STEP_KEY: str(payload.get("step_key", "")),
        },
        record_exception=False,  # a broker error may quote its URL: recorded redacted below
        set_status_on_exception=False,
    ) as span:
        ctx = span.get_span_context()
        if span.is_recording() and ctx.is_valid:
            headers[TRACEPARENT] = f"00-{ctx.trace_id:032x}-{ctx.span_id:016x}-01"
        try:
            yield headers
        except BaseException as exc:
            _record_exception(span, exc)
            raise


def published(messages: Sequence[OutboxMessage]) -> None:
    """Count messages sent to the broker, once per batch and queue (cheap on the relay's path)."""
    for destination, count in Counter(m.destination for m in messages).items():
        MESSAGES_PUBLISHED.add(count, {MESSAGING_DESTINATION: destination})


# -- step attempts --------------------------------------------------------------------------------


@dataclass
class AttemptTrace:
    """The delivery being processed in this context: its span and what became of it."""

    span: Span
    claim: Claim
    started_ns: int
    outcome: str = "completed"
    error: str = ""  # "<type>: <message>" of a failed attempt, for Celery's task events
    metric_attrs: dict[str, Any] = field(default_factory=dict)


@contextlib.contextmanager
def attempt(
    claim: Claim,
    headers: Mapping[str, Any] | None,
    *,
    queue: str,
    system: str,
    message_id: str | None,
    received_ns: int,
) -> Iterator[AttemptTrace]:
    """The CONSUMER span of one delivery that claimed a step attempt (from the message's
    delivery on), and the attempt's metrics. The parent is the publishing span carried in the
    message headers when it belongs to the run's trace, else the run's root."""
    compensation = claim.kind == StepKind.COMPENSATION
    metric_attrs = {SAGA_NAME: claim.saga_name, SAGA_STEP: claim.step_name}
    sent_at = (headers or {}).get(SENT_AT)
    if sent_at is not None:
        with contextlib.suppress(TypeError, ValueError):
            wait = max(0.0, received_ns / 1e9 - float(sent_at))
            QUEUE_WAIT.record(wait, {**metric_attrs, MESSAGING_DESTINATION: queue})
    span = (
        _process_span(claim, headers, queue, system, message_id, received_ns)
        if enabled()
        else trace.INVALID_SPAN
    )
    state = AttemptTrace(span, claim, received_ns, metric_attrs=metric_attrs)
    token = _ATTEMPT.set(state)
    try:
        with trace.use_span(
            span, end_on_exit=False, record_exception=False, set_status_on_exception=False
        ):
            yield state
    except BaseException as exc:
        state.outcome = "crashed"
        _record_exception(span, exc)
        raise
    finally:
        _ATTEMPT.reset(token)
        span.set_attribute(SAGA_STEP_OUTCOME, state.outcome)
        span.end()
        labels = {**state.metric_attrs, SAGA_STEP_OUTCOME: state.outcome}
        STEP_DURATION.record((time.time_ns() - received_ns) / 1e9, labels)
        (COMPENSATIONS if compensation else STEP_ATTEMPTS).add(1, labels)


def _process_span(
    claim: Claim,
    headers: Mapping[str, Any] | None,
    queue: str,
    system: str,
    message_id: str | None,
    received_ns: int,
) -> Span:
    parent, links = _delivery_parent(claim.trace_context, headers)
    # The step span below carries the rest (idempotency key, compensation, replayed).
    attrs: dict[str, Any] = {
        MESSAGING_SYSTEM: system,
        MESSAGING_DESTINATION: queue,
        MESSAGING_OPERATION_TYPE: "process",
        MESSAGING_OPERATION_NAME: "process",
        SAGA_NAME: claim.saga_name,
        SAGA_RUN_ID: claim.run_id,
        SAGA_STEP: claim.step_name,
        SAGA_STEP_ATTEMPT: claim.attempt,
    }
    if message_id:
        attrs[MESSAGING_MESSAGE_ID] = message_id
    return _tracer.start_span(
        f"process {queue}",
        context=_context(parent),
        kind=SpanKind.CONSUMER,
        attributes=attrs,
        links=links,
        start_time=received_ns,
    )


def enabled() -> bool:
    """Whether an SDK is installed as the global tracer provider (spans are really made)."""
    return not isinstance(
        trace.get_tracer_provider(), trace.ProxyTracerProvider | trace.NoOpTracerProvider
    )


def recording() -> bool:
    """Whether the current span records: worth extra work (never a query) to enrich it."""
    return trace.get_current_span().is_recording()


@contextlib.contextmanager
def step_span(
    *,
    saga_name: str,
    run_id: str,
    step: str,
    attempt: int,
    idempotency_key: str,
    compensation: bool = False,
    replayed: bool = False,
    carrier: Mapping[str, Any] | None = None,
    headers: Mapping[str, Any] | None = None,
) -> Iterator[Span]:
    """The span of a step (or, with ``compensation``, a compensation) function call. It is a
    child of the current span (the delivery's); when there is none, of the span that published
    ``headers`` if it is in the run's trace, else of the run's root in ``carrier``. An
    exception leaving the block is recorded with error status and re-raised."""
    if not enabled():
        yield trace.INVALID_SPAN
        return
    parent = None
    if not trace.get_current_span().get_span_context().is_valid:
        parent = _context(_delivery_parent(carrier, headers)[0])
    with _tracer.start_as_current_span(
        f"{'compensate' if compensation else 'step'} {step}",
        context=parent,
        kind=SpanKind.INTERNAL,
        attributes={
            SAGA_NAME: saga_name,
            SAGA_RUN_ID: run_id,
            SAGA_STEP: step,
            SAGA_STEP_ATTEMPT: attempt,
            SAGA_STEP_IDEMPOTENCY_KEY: idempotency_key,
            SAGA_STEP_REPLAYED: replayed,
            SAGA_COMPENSATION: compensation,
        },
        record_exception=False,
        set_status_on_exception=False,
    ) as span:
        try:
            yield span
        except BaseException as exc:
            _record_exception(span, exc)
            raise


def replayed_step(
    carrier: Mapping[str, Any] | None,
    *,
    saga_name: str,
    run_id: str,
    step: str,
    attempt: int,
    idempotency_key: str,
    compensation: bool = False,
    headers: Mapping[str, Any] | None = None,
) -> None:
    """Record a step whose result was read back from the journal instead of being run again:
    a span flagged ``saga.step.replayed``, with the attempt that completed the step. It goes
    under the current span (a delivery whose outcome replayed a workflow), else under the span
    that published ``headers`` (a duplicate delivery), else under the run's root."""
    with step_span(
        saga_name=saga_name,
        run_id=run_id,
        step=step,
        attempt=attempt,
        idempotency_key=idempotency_key,
        compensation=compensation,
        replayed=True,
        carrier=carrier,
        headers=headers,
    ):
        pass


def lost_attempt(
    carrier: Mapping[str, Any] | None,
    *,
    saga_name: str,
    run_id: str,
    step: str,
    attempt: int,
    idempotency_key: str,
    started: dt.datetime,
    compensation: bool = False,
) -> None:
    """An attempt whose worker died (its lease expired): its own spans died unexported with the
    process, so the sweeper that notices records one in its place, from the attempt's journaled
    start to now, flagged ``saga.step.lost`` and failed."""
    span = _tracer.start_span(
        f"{'compensate' if compensation else 'step'} {step}",
        context=_parent(carrier),
        attributes={
            SAGA_NAME: saga_name,
            SAGA_RUN_ID: run_id,
            SAGA_STEP: step,
            SAGA_STEP_ATTEMPT: attempt,
            SAGA_STEP_IDEMPOTENCY_KEY: idempotency_key,
            SAGA_STEP_REPLAYED: False,
            SAGA_COMPENSATION: compensation,
            SAGA_STEP_LOST: True,
            ERROR_TYPE: "LeaseExpired",
        },
        start_time=_ns(started),
    )
    message = f"attempt {attempt} of step {step!r} lost its worker (lease expired)"
    span.add_event("exception", {"exception.type": "LeaseExpired", "exception.message": message})
    span.set_status(Status(StatusCode.ERROR, message))
    span.end()


def attempt_completed() -> None:
    state = _ATTEMPT.get()
    if state is not None:
        state.outcome = "completed"


def attempt_fenced() -> None:
    """The attempt's outcome was discarded: it lost its lease or the run moved on."""
    state = _ATTEMPT.get()
    if state is not None:
        state.outcome = "fenced"


def attempt_failed(exc: BaseException, *, will_retry: bool, record: bool = True) -> None:
    """The current attempt failed (``record``: its exception is not on a step span already)."""
    state = _ATTEMPT.get()
    if state is None:
        return
    state.outcome = "retry" if will_retry else "failed"
    # For Celery's task events and log: the message only when exported on purpose.
    state.error = f"{type(exc).__name__}: {exception_text(exc) if _details else REDACTED}"[:500]
    _record_exception(state.span, exc, event=record)


# -- waits ----------------------------------------------------------------------------------------


def record_wait(
    carrier: Mapping[str, Any] | None,
    *,
    kind: str,
    saga_name: str,
    run_id: str,
    start: dt.datetime | int,
    end: dt.datetime | int | None = None,
    step: str | None = None,
    attempt: int | None = None,
    attributes: Mapping[str, Any] | None = None,
) -> None:
    """A finished wait of the run as a span under its root: ``retry_backoff`` (a failed attempt
    until the next one starts), ``sleep`` (a durable sleep), ``event`` (waiting for a signal).
    The span is emitted when the wait is over, by whoever ends it; times are datetimes or
    nanoseconds since the epoch."""
    if not enabled():
        return
    attrs: dict[str, Any] = {SAGA_NAME: saga_name, SAGA_RUN_ID: run_id, SAGA_WAIT_KIND: kind}
    if step is not None:
        attrs[SAGA_STEP] = step
    if attempt is not None:
        attrs[SAGA_STEP_ATTEMPT] = attempt
    attrs.update(attributes or {})
    start_ns = _ns(start)
    end_ns = time.time_ns() if end is None else _ns(end)
    span = _tracer.start_span(
        f"wait {kind}", context=_parent(carrier), attributes=attrs, start_time=start_ns
    )
    span.end(end_time=max(start_ns, end_ns))


_EPOCH = dt.datetime(1970, 1, 1, tzinfo=dt.UTC)


def _ns(value: dt.datetime | int) -> int:
    if isinstance(value, dt.datetime):
        return (value - _EPOCH) // dt.timedelta(microseconds=1) * 1000
    return int(value)


def parse_time(value: Any) -> dt.datetime | None:
    """An ISO 8601 time as journaled (e.g. an error's ``failed_at``), or None."""
    if not isinstance(value, str):
        return None
    try:
        parsed = dt.datetime.fromisoformat(value)
    except ValueError:
        return None
    return parsed if parsed.tzinfo else parsed.replace(tzinfo=dt.UTC)


# -- runs -----------------------------------------------------------------------------------------


def run_finished(
    carrier: Mapping[str, Any] | None,
    *,
    saga_name: str,
    run_id: str,
    state: str,
    error: Mapping[str, Any] | BaseException | None = None,
) -> None:
    """Emit the run's root span, now that ``state`` (final) is committed, and count the run.

    Call this exactly once per run, after the transaction that moved it to a final state."""
    RUNS_FINISHED.add(1, {SAGA_NAME: saga_name, SAGA_RUN_STATE: state})
    if not enabled():
        return
    root = root_span_context(carrier)
    if root is None:
        return
    start_ns: int | None = None
    with contextlib.suppress(TypeError, ValueError):
        start_ns = int((carrier or {}).get(RUN_START, ""))
    started_by = _span_context(carrier, STARTED_BY)
    token = _FORCED_IDS.set((root.trace_id, root.span_id))
    try:
        span = _tracer.start_span(
            f"saga {saga_name}",
            context=Context(),  # a root: no parent, whatever is current here
            kind=SpanKind.INTERNAL,
            attributes={SAGA_NAME: saga_name, SAGA_RUN_ID: run_id, SAGA_RUN_STATE: state},
            links=() if started_by is None else (Link(started_by),),
            start_time=start_ns,
        )
    finally:
        _FORCED_IDS.reset(token)
    if isinstance(error, BaseException):
        _record_exception(span, error)
    elif error:
        # A journaled error record (saga.failures): its text is already free of pydantic inputs.
        kind = str(error.get("type", "Error"))
        if _details:
            _record_error(span, kind, str(error.get("message", "")), error.get("traceback"))
        else:
            _record_error(span, kind, REDACTED, None)
    elif state != RunState.COMPLETED:
        span.set_status(Status(StatusCode.ERROR, f"run ended {state}"))
    span.end()
