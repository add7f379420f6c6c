"""Advances a run: what to schedule when it starts and after each step completes.

Pure functions over a definition; the store commits what they decide in the step's outcome
transaction.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

from outbox.message import OutboxMessage
from saga.definition import Saga, Step
from saga.store import NewStep

STEP_TASK = "saga.step"


def idempotency_key(run_id: str, step_key: str) -> str:
    """Stable for every attempt of one step of one run; unique across runs."""
    return f"{run_id}:{step_key}"


def new_step(run_id: str, step: Step, input_json: str) -> NewStep:
    # A linear or graph step runs once per run, so its name is its key.
    return NewStep(
        step_key=step.name,
        step_name=step.name,
        max_attempts=step.retry.max_attempts,
        idempotency_key=idempotency_key(run_id, step.name),
        input_json=input_json,
    )


def step_message(
    queue: str, run_id: str, step_key: str, trace_context: Mapping[str, str]
) -> OutboxMessage:
    """The task message that makes a worker run one attempt of a step."""
    return OutboxMessage(
        task_name=STEP_TASK,
        destination=queue,
        payload={"run_id": run_id, "step_key": step_key},
        headers=dict(trace_context),
    )


@dataclass(frozen=True)
class Advance:
    """What a completed step causes: steps to schedule, or the run's result."""

    next_steps: tuple[NewStep, ...]
    run_result_json: str | None


def after_step(saga: Saga, run_id: str, step_name: str, result_json: str) -> Advance:
    following = saga.next_after(step_name)
    if following is None:
        return Advance(next_steps=(), run_result_json=result_json)
    return Advance(next_steps=(new_step(run_id, following, result_json),), run_result_json=None)


def encode_input(saga: Saga, value: Any) -> str:
    """Validate the run's input against the first step's parameter type; JSON text."""
    step = saga.first
    return step.input_adapter.dump_json(step.validate_input(value)).decode()
