"""A saga whose effect lands with an unknown outcome while a sibling fails for good.

``book`` books through the outside service (``saga_dev.testing.effects_server``, at
``TRAVEL_SERVICE_URL``) under its idempotency key; on its first attempt it then loses the answer
(a retryable error), after waiting for the test where the spec says so. ``refuse`` fails for
good once the test lets it. The service's own record says whether the booking was undone.
"""

from __future__ import annotations

import os
import time
from typing import Any

from saga import RetryPolicy, Saga, StepContext
from saga_dev.travel_agent import service


class AnswerLost(Exception):
    """The booking was applied, but its answer never came back (retryable)."""


class Refused(Exception):
    pass


def _wait_for(path: str | None) -> None:
    """Block until the test creates ``path`` ("forever": until the worker is killed)."""
    while path and not os.path.exists(path):
        time.sleep(0.02)


def begin(ctx: StepContext, spec: dict[str, Any]) -> dict[str, Any]:
    return spec


def book(ctx: StepContext, spec: dict[str, Any]) -> dict[str, Any]:
    body = {"kind": "hotel", "item": "HT-1", "trip": ctx.run_id}
    answer = service("book", body, ctx.idempotency_key)
    if ctx.attempt == 1:
        _wait_for(spec.get("book_waits_for"))
        raise AnswerLost("travel service book: applied, but the answer was lost")
    return answer


def unbook(ctx: StepContext, booking: dict[str, Any] | None) -> dict[str, Any]:
    assert ctx.undo is not None
    target = (
        {"booking_id": booking["booking_id"]}
        if booking
        else {"booking_key": ctx.undo.idempotency_key}
    )
    return service("cancel", {**target, "trip": ctx.run_id}, ctx.idempotency_key)


def refuse(ctx: StepContext, spec: dict[str, Any]) -> None:
    _wait_for(spec.get("refuse_waits_for"))
    raise Refused("the request was refused")


uncertain = Saga("uncertain")
uncertain.step()(begin)
uncertain.step(
    after=begin,
    compensate=unbook,
    retry=RetryPolicy(max_attempts=5, initial_backoff_seconds=30.0, max_backoff_seconds=60.0),
)(book)
uncertain.step(after=begin, retry=RetryPolicy(max_attempts=3, non_retryable=(Refused,)))(refuse)
