"""Sagas of the security tests: failures carrying a secret, and a compensated booking."""

from __future__ import annotations

from typing import Any

from pydantic import BaseModel

from saga.definition import Saga, StepContext, step
from saga.retry import RetryPolicy

SECRET = "sk-live-9d2e71b0c4a5"
ONCE = RetryPolicy(max_attempts=1)


def leaks(ctx: StepContext, value: Any) -> Any:
    """A step whose exception quotes a secret (what the issue saw export an API key)."""
    raise ValueError(f"bad key {SECRET}")


def gives_key(ctx: StepContext, value: Any) -> dict[str, Any]:
    return {"count": SECRET}


class Counted(BaseModel):
    count: int


def counts(ctx: StepContext, value: Counted) -> int:
    return value.count  # never runs: its input does not fit, and the engine records why


leaky = Saga("leaky", [step(leaks, retry=ONCE)])
mistyped = Saga("mistyped", [gives_key, step(counts, retry=ONCE)])


def reserve(ctx: StepContext, value: Any) -> dict[str, Any]:
    return {"booking": ctx.idempotency_key}


def cancel(ctx: StepContext, value: dict[str, Any] | None) -> dict[str, Any]:
    return {"cancelled": ctx.undo.idempotency_key if ctx.undo else None}


def charge(ctx: StepContext, value: dict[str, Any]) -> Any:
    raise ValueError("card declined")


booking = Saga("booking", [step(reserve, compensate=cancel), step(charge, retry=ONCE)])
