"""The task messages between the engine and its workers: names, bodies, builders and parsing.

A message only names a step (or a run to advance); everything else is in Postgres. The sender
(the coordinator's outbox rows, the sweeper, operators) builds messages here and the worker
parses them here, so both sides share one format.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Annotated, Any, TypeVar

from pydantic import (
    AfterValidator,
    BaseModel,
    ConfigDict,
    Field,
    PositiveFloat,
    ValidationError,
)

from saga.errors import MalformedMessageError
from saga.outbox.message import OutboxMessage

STEP_TASK = "saga.step"
ADVANCE_TASK = "saga.advance"
START_TASK = "saga.start"  # starts a run; what Celery beat schedules

M = TypeVar("M", bound=BaseModel)


def storable(value: str) -> str:
    """Refuse text Postgres cannot store, so a message carrying it fails at parse time and not
    as a StoreError (which the worker would take for an outage and retry for a whole lease).
    Pydantic itself refuses the other such text, a string with unpaired surrogates."""
    if "\x00" in value:
        raise ValueError("contains a NUL character, which Postgres cannot store")
    return value


RunId = Annotated[str, Field(min_length=1, max_length=200), AfterValidator(storable)]
StepKey = Annotated[str, Field(min_length=1, max_length=500), AfterValidator(storable)]


class StepMessage(BaseModel):
    """Run one attempt of a step: the only keyword arguments a step task accepts."""

    model_config = ConfigDict(extra="forbid", frozen=True)
    run_id: RunId
    step_key: StepKey


class AdvanceMessage(BaseModel):
    """Advance a run after an outside change: the only keyword arguments an advance task
    accepts."""

    model_config = ConfigDict(extra="forbid", frozen=True)
    run_id: RunId


class StartMessage(BaseModel):
    """Start a run (``saga.start``, as Celery beat sends it). ``schedule`` names the beat entry:
    with the time it fired, it makes the run id, so a tick fired twice starts one run."""

    model_config = ConfigDict(extra="forbid", frozen=True)
    saga: Annotated[str, Field(min_length=3, max_length=500), AfterValidator(storable)]
    input: Any = None
    schedule: (
        Annotated[str, Field(min_length=1, max_length=150), AfterValidator(storable)] | None
    ) = None
    fired_at: Annotated[float, Field(ge=0, allow_inf_nan=False)] | None = None
    run_id: RunId | None = None
    timeout: PositiveFloat | None = None


def step_message(
    queue: str, run_id: str, step_key: str, trace_context: Mapping[str, str]
) -> OutboxMessage:
    """The task message that makes a worker run one attempt of a step."""
    # The fields of StepMessage, written out: the sender's values need no validation, and this
    # runs for every step scheduled (tests check the two agree).
    return OutboxMessage(
        STEP_TASK, queue, {"run_id": run_id, "step_key": step_key}, dict(trace_context)
    )


def advance_message(queue: str, run_id: str, trace_context: Mapping[str, str]) -> OutboxMessage:
    """The task message that makes a worker advance a run (after an event, or an operator)."""
    return OutboxMessage(ADVANCE_TASK, queue, {"run_id": run_id}, dict(trace_context))


def parse(model: type[M], args: Sequence[Any], kwargs: Mapping[str, Any]) -> M:
    """A received task's arguments as ``model``; MalformedMessageError if they do not fit."""
    if args:
        raise MalformedMessageError(f"task takes keyword arguments only, got {args!r:.200}")
    try:
        return model.model_validate(kwargs)
    except ValidationError as exc:
        raise MalformedMessageError(f"bad task arguments: {_one_line(exc)}") from None


def _one_line(exc: ValidationError) -> str:
    """Pydantic's report on one line (a log line per refused message), inputs shortened."""
    return "; ".join(
        f"{'.'.join(map(str, e['loc'])) or 'arguments'}: {e['msg']} (got {e['input']!r:.80})"
        for e in exc.errors()
    )
