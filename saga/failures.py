"""How a failure is journaled: one error record, made by one constructor.

The record is JSON (it is stored in ``saga_steps.error`` and ``saga_runs.error``): ``type`` (an
exception's qualified name, or one of the engine's own ``ErrorType``), ``message``, and when
known the ``attempt`` it ended, whether it will be ``retryable``, a bounded ``traceback`` and
``failed_at`` (ISO 8601, an attempt's failure time, which traces its retry backoff).
"""

from __future__ import annotations

import datetime as dt
import traceback as tb
from enum import StrEnum
from typing import NotRequired, TypedDict

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
        text = str(cause) if message is None else message
    else:
        kind, text = str(cause), message or str(cause)
    record: ErrorRecord = {"type": kind, "message": _storable(text)[:MAX_ERROR_TEXT]}
    if attempt is not None:
        record["attempt"] = attempt
        record["failed_at"] = dt.datetime.now(dt.UTC).isoformat()
    if retryable is not None:
        record["retryable"] = retryable
    if traceback and isinstance(cause, BaseException):
        record["traceback"] = _storable("".join(tb.format_exception(cause)))[-MAX_ERROR_TEXT:]
    return record


def attempt_outcome(error_type: str) -> AttemptOutcome:
    """How an attempt that ended with an error of this type ended (kept in saga_attempts)."""
    if error_type == ErrorType.LEASE_EXPIRED:
        return AttemptOutcome.LOST
    if error_type.endswith(".StepTimeoutError"):
        return AttemptOutcome.TIMED_OUT
    return AttemptOutcome.FAILED


def _storable(text: str) -> str:
    """Postgres stores no NUL and no lone surrogate in JSON: a message quoting one (a bad value,
    bytes decoded with surrogateescape) shows it escaped instead."""
    return text.encode("utf-8", "backslashreplace").decode("utf-8").replace("\x00", "\\x00")
