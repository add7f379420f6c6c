"""The two sagas ``saga bench chaos`` runs, every effect through the effects server
(``TRAVEL_SERVICE_URL``) under the step's idempotency key, with ``trip`` = the run id so the
service's own record groups effects by run.

* ``chaos_trip`` (a graph): quote -> flight || hotel (each compensable) -> charge (the pivot)
  -> confirm (an email).
* ``chaos_order`` (a workflow written as code): plan -> reserve each seat (``ctx.map``,
  compensable) -> notify (an email, corrected on compensation) -> finalize.

A run fails for good on purpose where its input says (``fail``, drawn by the bench from the run's
seed): ``Refused`` is non-retryable. Where it is raised decides what the contract expects:

* ``hotel`` (after the booking is applied: an unknown outcome, undone by key), ``charge``
  (the pivot, before its effect), ``seat`` (a seat, after its booking), ``finalize``: the run
  ends ``compensated`` with no booking left active;
* ``confirm`` (after the pivot completed): the run ends ``failed``, its bookings kept.
"""

from __future__ import annotations

import os
import time
from typing import Any

from saga import RetryPolicy, Saga, StepContext, WorkflowContext, workflow
from saga_dev.travel_agent import ServiceRejected, service

EMAIL_TO = "traveller@example.org"


class Refused(Exception):
    """A failure for good, on purpose (non-retryable)."""


# Generous attempts: kills, lost leases and service faults must not use them up, so a run's
# final state is decided by its input, not by the chaos.
RETRY = RetryPolicy(
    max_attempts=40,
    initial_backoff_seconds=0.05,
    max_backoff_seconds=1.0,
    non_retryable=(Refused, ServiceRejected),
)
UNDO_RETRY = RetryPolicy(
    max_attempts=40, initial_backoff_seconds=0.05, max_backoff_seconds=1.0, non_retryable=()
)

GRAPH_FAILURES = ("hotel", "charge", "confirm")
WORKFLOW_FAILURES = ("seat", "finalize")


def _fail(ctx: StepContext) -> str:
    return str((ctx.run_input or {}).get("fail", ""))


def _work() -> None:
    """Half the step's own work (a model call, say), before and after its effect: a kill lands
    before the effect or after it, before its outcome is journaled."""
    time.sleep(float(os.environ.get("CHAOS_STEP_SECONDS", "0")) / 2)


def _book(ctx: StepContext, kind: str, item: str) -> dict[str, Any]:
    _work()
    body = {"kind": kind, "item": item, "trip": ctx.run_id}
    booked = service("book", body, ctx.idempotency_key)
    _work()
    return booked


def cancel_booking(ctx: StepContext, booking: dict[str, Any] | None) -> dict[str, Any]:
    """By the result when the step completed, else by the key it booked under (which may hold
    nothing: the service says so)."""
    assert ctx.undo is not None
    target = (
        {"booking_id": booking["booking_id"]}
        if booking
        else {"booking_key": ctx.undo.idempotency_key}
    )
    return service("cancel", {**target, "trip": ctx.run_id}, ctx.idempotency_key)


def _email(ctx: StepContext, subject: str) -> dict[str, Any]:
    _work()
    body = {"to": EMAIL_TO, "subject": subject, "body": "see you there", "trip": ctx.run_id}
    sent = service("send_email", body, ctx.idempotency_key)
    _work()
    return sent


def correct_email(ctx: StepContext, sent: dict[str, Any] | None) -> dict[str, Any]:
    """The same correction either way: by the message's id, or by the key it was sent under."""
    assert ctx.undo is not None
    rest = {"body": "cancelled", "trip": ctx.run_id}
    if sent:
        body = {**rest, "to": sent["to"], "subject": f"Correction to {sent['message_id']}"}
    else:
        body = {**rest, "correction_of_key": ctx.undo.idempotency_key}
    return service("send_email", body, ctx.idempotency_key)


# -- the graph ---------------------------------------------------------------------------------


def quote(ctx: StepContext, order: dict[str, Any]) -> dict[str, Any]:
    found = service("lookup", {"kind": "flights", "destination": "LIS", "trip": ctx.run_id}, None)
    return {"flight": found["options"][0]["id"], "hotel": f"HT-{order['n']}"}


def flight(ctx: StepContext, q: dict[str, Any]) -> dict[str, Any]:
    return _book(ctx, "flight", str(q["flight"]))


def hotel(ctx: StepContext, q: dict[str, Any]) -> dict[str, Any]:
    booked = _book(ctx, "hotel", str(q["hotel"]))
    if _fail(ctx) == "hotel":  # applied, then refused: the compensation undoes it by key
        raise Refused("hotel refused after booking")
    return booked


def charge(ctx: StepContext, bookings: dict[str, Any]) -> dict[str, Any]:
    if _fail(ctx) == "charge":  # the pivot fails before its effect
        raise Refused("card declined")
    return _book(
        ctx, "charge", f"{bookings['flight']['booking_id']}+{bookings['hotel']['booking_id']}"
    )


def confirm(ctx: StepContext, receipt: dict[str, Any]) -> dict[str, Any]:
    if _fail(ctx) == "confirm":  # past the pivot: the run fails, nothing is undone
        raise Refused("confirmation refused")
    return _email(ctx, f"trip {ctx.run_id} confirmed ({receipt['booking_id']})")


chaos_trip = Saga("chaos_trip")
chaos_trip.step(retry=RETRY)(quote)
chaos_trip.step(after=quote, compensate=cancel_booking, retry=RETRY, compensate_retry=UNDO_RETRY)(
    flight
)
chaos_trip.step(after=quote, compensate=cancel_booking, retry=RETRY, compensate_retry=UNDO_RETRY)(
    hotel
)
chaos_trip.step(after=[flight, hotel], pivot=True, retry=RETRY)(charge)
chaos_trip.step(after=charge, retry=RETRY)(confirm)


# -- the workflow ------------------------------------------------------------------------------


def plan(ctx: StepContext, order: dict[str, Any]) -> list[str]:
    found = service("lookup", {"kind": "hotels", "city": "LIS", "trip": ctx.run_id}, None)
    return [f"{found['options'][0]['id']}-seat-{i}" for i in range(int(order["seats"]))]


def reserve(ctx: StepContext, seat: str) -> dict[str, Any]:
    booked = _book(ctx, "seat", seat)
    if _fail(ctx) == "seat" and seat.endswith("-seat-1"):
        raise Refused(f"seat {seat} refused after booking")
    return booked


def notify(ctx: StepContext, seats: list[str]) -> dict[str, Any]:
    return _email(ctx, f"order {ctx.run_id}: {len(seats)} seats")


def finalize(ctx: StepContext, message_id: str) -> str:
    if _fail(ctx) == "finalize":
        raise Refused("order rejected at the end")
    return message_id


@workflow("chaos_order")
def chaos_order(ctx: WorkflowContext, order: dict[str, Any]) -> dict[str, Any]:
    seats = ctx.step(plan, order, retry=RETRY)
    booked = ctx.map(
        reserve, seats, compensate=cancel_booking, retry=RETRY, compensate_retry=UNDO_RETRY
    )
    sent = ctx.step(
        notify,
        [b["booking_id"] for b in booked],
        compensate=correct_email,
        retry=RETRY,
        compensate_retry=UNDO_RETRY,
    )
    done = ctx.step(finalize, sent["message_id"], retry=RETRY)
    return {"seats": [b["booking_id"] for b in booked], "message_id": done}
