"""How a failure is journaled: one error record, made by one constructor.

The record is JSON (it is stored in ``saga_steps.error`` and ``saga_runs.error``): ``type`` (an
exception's qualified name, or one of the engine's own ``ErrorType``), ``message``, and when
known the ``attempt`` it ended, whether it will be ``retryable``, a bounded ``traceback`` and
``failed_at`` (ISO 8601, an attempt's failure time, which traces its retry backoff).

What the record keeps, and where it goes. The journal is for operators (``saga show``, the
read-only role): it keeps a step's own exception as the step raised it, message and traceback,
since that is what fixing the step needs; whoever can read the journal can read the step's input
anyway. Input values never reach it through pydantic: a ``ValidationError`` (or a serialisation
error) is recorded as its errors' locations, messages and types, without the
``input_value=...`` pydantic prints, in the message and in every traceback of the chain. Spans
get less still (``saga.tracing``): the exception's type and a fixed message by default.
"""

from __future__ import annotations

import datetime as dt
import re
import traceback as tb
from enum import StrEnum
from typing import NotRequired, TypedDict

from pydantic import ValidationError

from saga.states import AttemptOutcome

MAX_ERROR_TEXT = 4000  # characters of a message or traceback kept in the journal


class ErrorType(StrEnum):
    """Failures the engine names itself (no exception of the step's behind them)."""

    LEASE_EXPIRED = "LeaseExpired"  # an attempt lost its worker
    RUN_TIMEOUT = "RunTimeout"  # the run passed its deadline
    CANCELLED = "Cancelled"  # an operator cancelled the run
    EVENT_TIMEOUT = "EventTimeout"  # an event wait timed out
    TYPE_ERROR = "TypeError"  # a graph's data does not fit (a fan-out over a non-list)


class ErrorRecord(TypedDict):
    type: str
    message: str
    attempt: NotRequired[int]
    retryable: NotRequired[bool]
    traceback: NotRequired[str]
    failed_at: NotRequired[str]


def error_record(
    cause: BaseException | ErrorType | str,
    message: str | None = None,
    *,
    attempt: int | None = None,
    retryable: bool | None = None,
    traceback: bool = False,
) -> ErrorRecord:
    """The record of a failure. ``cause`` is the exception (its qualified type name and message,
    and with ``traceback`` a bounded traceback) or an error type named by the engine, with
    ``message``. An attempt's failure (``attempt`` given) is stamped with ``failed_at``."""
    if isinstance(cause, BaseException):
        kind = f"{type(cause).__module__}.{type(cause).__qualname__}"
        text = exception_text(cause) if message is None else without_inputs(message)
    else:
        kind, text = str(cause), message or str(cause)
    record: ErrorRecord = {"type": kind, "message": _storable(text)[:MAX_ERROR_TEXT]}
    if attempt is not None:
        record["attempt"] = attempt
        record["failed_at"] = dt.datetime.now(dt.UTC).isoformat()
    if retryable is not None:
        record["retryable"] = retryable
    if traceback and isinstance(cause, BaseException):
        record["traceback"] = _storable(format_traceback(cause))[-MAX_ERROR_TEXT:]
    return record


def attempt_outcome(error_type: str) -> AttemptOutcome:
    """How an attempt that ended with an error of this type ended (kept in saga_attempts)."""
    if error_type == ErrorType.LEASE_EXPIRED:
        return AttemptOutcome.LOST
    if error_type.endswith(".StepTimeoutError"):
        return AttemptOutcome.TIMED_OUT
    return AttemptOutcome.FAILED


# pydantic's rendering of a value it refused: ``[type=..., input_value='...', input_type=str]``
# in a ValidationError, ``[input_value=..., input_type=...]`` in a serialisation warning.
_INPUT_VALUE = re.compile(r"input_value=.*?, input_type=", re.DOTALL)


def without_inputs(text: str) -> str:
    """``text`` with every pydantic ``input_value=...`` replaced (a message that quotes one)."""
    return _INPUT_VALUE.sub("input_value=(not shown), input_type=", text)


def exception_text(exc: BaseException) -> str:
    """What an exception says, without the input values pydantic puts in its messages: a
    ``ValidationError`` as one line per error (where, what, the error type)."""
    if isinstance(exc, ValidationError):
        errors = exc.errors(include_url=False, include_context=False, include_input=False)
        lines = [f"{len(errors)} validation error(s) for {exc.title}"]
        lines += [
            f"{'.'.join(map(str, e['loc'])) or '(value)'}: {e['msg']} [type={e['type']}]"
            for e in errors
        ]
        return without_inputs("\n".join(lines))
    return without_inputs(str(exc))


def format_traceback(exc: BaseException) -> str:
    """The traceback as ``traceback.format_exception`` writes it, chained causes included, with
    each exception's line written by ``exception_text``."""
    parts: list[str] = []
    seen: set[int] = set()
    current: BaseException | None = exc
    while current is not None and id(current) not in seen:
        seen.add(id(current))
        block = ["Traceback (most recent call last):\n"] if current.__traceback__ else []
        block += tb.format_tb(current.__traceback__)
        name = type(current).__qualname__
        module = type(current).__module__
        if module not in ("builtins", "__main__"):
            name = f"{module}.{name}"
        block.append(f"{name}: {exception_text(current)}\n")
        parts[:0] = block
        if current.__cause__ is not None:
            link = "\nThe above exception was the direct cause of the following exception:\n\n"
            current = current.__cause__
        elif current.__context__ is not None and not current.__suppress_context__:
            link = "\nDuring handling of the above exception, another exception occurred:\n\n"
            current = current.__context__
        else:
            break
        parts.insert(0, link)
    return "".join(parts)


def _storable(text: str) -> str:
    """Postgres stores no NUL and no lone surrogate in JSON: a message quoting one (a bad value,
    bytes decoded with surrogateescape) shows it escaped instead."""
    return text.encode("utf-8", "backslashreplace").decode("utf-8").replace("\x00", "\\x00")
