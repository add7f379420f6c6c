"""The task messages between the engine and its workers: names, bodies, builders and parsing.

A message only names a step (or a run to advance); everything else is in Postgres. The sender
(the coordinator's outbox rows, the sweeper, operators) builds messages here and the worker
parses them here, so both sides share one format.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Any, TypeVar

from pydantic import BaseModel, ConfigDict, Field, ValidationError

from saga.errors import MalformedMessageError
from saga.outbox.message import OutboxMessage

STEP_TASK = "saga.step"
ADVANCE_TASK = "saga.advance"

M = TypeVar("M", bound=BaseModel)


class StepMessage(BaseModel):
    """Run one attempt of a step: the only keyword arguments a step task accepts."""

    model_config = ConfigDict(extra="forbid", frozen=True)
    run_id: str = Field(min_length=1, max_length=200)
    step_key: str = Field(min_length=1, max_length=500)


class AdvanceMessage(BaseModel):
    """Advance a run after an outside change: the only keyword arguments an advance task
    accepts."""

    model_config = ConfigDict(extra="forbid", frozen=True)
    run_id: str = Field(min_length=1, max_length=200)


def step_message(
    queue: str, run_id: str, step_key: str, trace_context: Mapping[str, str]
) -> OutboxMessage:
    """The task message that makes a worker run one attempt of a step."""
    body = StepMessage(run_id=run_id, step_key=step_key)
    return OutboxMessage(STEP_TASK, queue, body.model_dump(), dict(trace_context))


def advance_message(queue: str, run_id: str, trace_context: Mapping[str, str]) -> OutboxMessage:
    """The task message that makes a worker advance a run (after an event, or an operator)."""
    body = AdvanceMessage(run_id=run_id)
    return OutboxMessage(ADVANCE_TASK, queue, body.model_dump(), dict(trace_context))


def parse(model: type[M], args: Sequence[Any], kwargs: Mapping[str, Any]) -> M:
    """A received task's arguments as ``model``; MalformedMessageError if they do not fit."""
    if args:
        raise MalformedMessageError(f"task takes keyword arguments only, got {args!r:.200}")
    try:
        return model.model_validate(kwargs)
    except ValidationError as exc:
        raise MalformedMessageError(f"bad task arguments: {exc}") from None
