"""What the store reads and what it raises: records built from rows by column name (psycopg
``class_row``), so a SELECT's column order cannot silently misplace a field."""

from __future__ import annotations

import datetime as dt
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any

from saga.errors import SagaError
from saga.states import FINAL_RUN_STATES


@dataclass(frozen=True)
class Claim:
    """One attempt of a step, owned by this worker until its lease runs out."""

    run_id: str
    step_key: str
    step_name: str
    kind: str
    attempt: int
    max_attempts: int
    idempotency_key: str
    input: Any
    fn_ref: str | None
    options: Mapping[str, Any]
    run_input: Any
    saga_name: str
    trace_context: dict[str, str]
    scheduled_at: dt.datetime  # when the step's row was made: a timer's or a wait's start
    saga_ref: str
    # The previous attempt's journaled failure, if it failed (a lost attempt has no time).
    previous_failed_at: str | None = None
    previous_error_type: str | None = None


@dataclass(frozen=True)
class GatedClaim:
    """A claim of a step with limits: the claim (None when a gate refused it: ``throttled_by``
    names that gate, and the step waits in line), and the gates it had waited for, with the
    time it joined each line (for its wait spans)."""

    claim: Claim | None
    throttled_by: Mapping[str, Any] | None
    waited: Sequence[tuple[Mapping[str, Any], dt.datetime]]


@dataclass(frozen=True)
class StepSnapshot:
    """A step as a refused claim finds it: enough to explain the refusal and trace it."""

    state: str
    attempt: int
    run_state: str
    step_name: str
    kind: str
    idempotency_key: str
    saga_name: str
    trace_context: dict[str, str]
    gated: bool = False  # it has limits: claimed by claim_gated_step
    fn_ref: str | None = None  # its function, imported before its gates are taken


@dataclass(frozen=True)
class RunRecord:
    run_id: str
    saga_name: str
    saga_ref: str
    saga_version: str
    state: str
    input: Any
    result: Any
    error: Any
    created_at: dt.datetime
    updated_at: dt.datetime
    finished_at: dt.datetime | None

    @property
    def finished(self) -> bool:
        return self.state in FINAL_RUN_STATES


@dataclass(frozen=True)
class StepRecord:
    step_key: str
    step_name: str
    kind: str
    seq: int
    state: str
    attempt: int
    max_attempts: int
    idempotency_key: str
    result: Any
    error: Any
    created_at: dt.datetime
    started_at: dt.datetime | None
    attempt_started_at: dt.datetime | None
    finished_at: dt.datetime | None

    @property
    def duration_seconds(self) -> float | None:
        """Duration of the latest attempt, when it has finished."""
        if self.attempt_started_at and self.finished_at:
            return (self.finished_at - self.attempt_started_at).total_seconds()
        return None


@dataclass(frozen=True)
class RunEventRecord:
    """A row of saga_run_events (0006): a run-level event, with who caused it."""

    event: str
    actor: str | None
    detail: Any


@dataclass(frozen=True)
class KeptAttempt:
    """A row of saga_attempts (0006): an attempt that did not end its step's story."""

    step_key: str
    attempt: int
    worker: str | None
    outcome: str
    error_type: str | None


class Fenced(Exception):
    """The attempt no longer owns its step (lease lost) or the run moved on; nothing written."""


class OperatorError(SagaError):
    """An operator action does not fit the run's state."""


class RunTransitionError(SagaError):
    """A guarded change of a run's state matched no row: the run was not in a state it may
    change from. Nothing of the transaction was written."""
