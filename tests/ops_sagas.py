"""Sagas for the operations tests (probes, /metrics, logs): one of each thing the dashboard and
the logs must show."""

from __future__ import annotations

import logging
from typing import Any

from saga.definition import Saga, StepContext, step
from saga.retry import RetryPolicy
from saga.workflow import WorkflowContext, workflow

log = logging.getLogger("tests.ops_sagas")
ONCE = RetryPolicy(max_attempts=1)


def book(ctx: StepContext, value: Any) -> dict[str, str]:
    return {"booking": ctx.idempotency_key}


def unbook(ctx: StepContext, booking: dict[str, str] | None) -> None:
    return None


def unbook_fails(ctx: StepContext, booking: dict[str, str] | None) -> None:
    raise RuntimeError("the compensation fails for good")


def explode(ctx: StepContext, value: Any) -> None:
    raise ValueError("the step fails for good")


def speak(ctx: StepContext, value: Any) -> str:
    log.warning("inside the step %s", ctx.step_key)
    return "spoken"


# A step completes, the next fails for good, the first is compensated.
undone = Saga("undone", [step(book, compensate=unbook), step(explode, retry=ONCE)])
# The same, but the compensation fails for good: the run ends compensation_failed.
stuck = Saga(
    "stuck",
    [step(book, compensate=unbook_fails, compensate_retry=ONCE), step(explode, retry=ONCE)],
)
# One step that logs from inside.
speaks = Saga("speaks", [speak])


@workflow("waits")
def waits(ctx: WorkflowContext, value: Any) -> Any:
    """Stays running until its event comes (an active run for saga.runs.active)."""
    return ctx.wait_event("go", timeout=3600)
