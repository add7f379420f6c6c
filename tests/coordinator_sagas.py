"""Graph sagas and workflows written as code, for the coordinator's integration tests."""

from __future__ import annotations

import os
import random
import time
from typing import Any

from pydantic import BaseModel

from saga import RetryPolicy, Saga, StepContext, WorkflowContext, step, workflow
from tests.sagas import Flaky, record

QUICK = RetryPolicy(max_attempts=4, initial_backoff_seconds=0.05, max_backoff_seconds=0.2)


def _block_if_asked(ctx: StepContext, value: Any) -> None:
    """Block the first attempt of this step when the run's input names it (to be killed)."""
    blocked = (ctx.run_input or {}).get("block") if isinstance(ctx.run_input, dict) else None
    if blocked == ctx.step_key and ctx.attempt == 1:
        time.sleep(300)


# -- trip booking: a graph with parallel branches, compensations and a pivot -----------------


class TripRequest(BaseModel):
    city: str
    fail_payment: bool = False
    fail_confirm: bool = False
    block: str | None = None


def quote(ctx: StepContext, req: TripRequest) -> dict[str, Any]:
    record(ctx)
    return {"city": req.city, "price": 420}


def _book(kind: str, ctx: StepContext) -> dict[str, Any]:
    _block_if_asked(ctx, None)
    record(ctx)
    return {"kind": kind, "ref": f"{kind}-{ctx.idempotency_key}"}


def flight(ctx: StepContext, q: dict[str, Any]) -> dict[str, Any]:
    return _book("flight", ctx)


def hotel(ctx: StepContext, q: dict[str, Any]) -> dict[str, Any]:
    time.sleep(0.05)
    return _book("hotel", ctx)


def car(ctx: StepContext, q: dict[str, Any]) -> dict[str, Any]:
    time.sleep(0.1)
    return _book("car", ctx)


def _undone_ref(ctx: StepContext, booking: dict[str, Any] | None) -> str:
    """The booking's ref: from its result, or (outcome unknown) from the key it was made under."""
    assert ctx.undo is not None
    return booking["ref"] if booking else f"{ctx.step}-{ctx.undo.idempotency_key}"


def undo(ctx: StepContext, booking: dict[str, Any] | None) -> dict[str, Any]:
    _block_if_asked(ctx, booking)
    record(ctx)  # recorded once the undo is done: a killed attempt leaves no record
    return {"cancelled": _undone_ref(ctx, booking)}


class PaymentDeclined(Exception):
    pass


def payment(ctx: StepContext, bookings: dict[str, Any]) -> dict[str, Any]:
    record(ctx)
    if ctx.run_input.get("fail_payment"):
        raise PaymentDeclined("card declined")
    return {"paid": 420}


def confirm(ctx: StepContext, paid: dict[str, Any]) -> str:
    record(ctx)
    if ctx.run_input.get("fail_confirm"):
        raise PaymentDeclined("the confirmation service refused")
    return "confirmed"


trip = Saga("book_trip", retry=QUICK)
trip.step()(quote)
trip.step(after=quote, compensate=undo)(flight)
trip.step(after=quote, compensate=undo)(hotel)
trip.step(after=quote, compensate=undo)(car)
trip.step(
    after=[flight, hotel, car],
    pivot=True,
    retry=RetryPolicy(
        max_attempts=2, initial_backoff_seconds=0.05, non_retryable=(PaymentDeclined,)
    ),
)(payment)
trip.step(after=payment, retry=RetryPolicy(max_attempts=1))(confirm)


# -- fan-out and fan-in ---------------------------------------------------------------------


def split(ctx: StepContext, n: int) -> list[int]:
    return list(range(n))


def square(ctx: StepContext, x: int) -> int:
    return x * x


def total(ctx: StepContext, squares: list[int]) -> dict[str, Any]:
    record(ctx)
    return {"count": len(squares), "squares": squares}


fan = Saga("fan")
fan.step()(split)
fan.step(map_over=split)(square)
fan.step(after=square)(total)


# -- an agent loop written as code ----------------------------------------------------------


def think(ctx: StepContext, i: int) -> dict[str, Any]:
    _block_if_asked(ctx, i)
    if random.random() < 0.15:
        raise Flaky(f"iteration {i} failed at random")
    record(ctx)  # a success: each iteration must succeed exactly once
    return {"i": i, "done": i >= ctx.run_input["iterations"] - 1}


@workflow("agent_loop")
def agent_loop(ctx: WorkflowContext, spec: dict[str, Any]) -> dict[str, Any]:
    seen = []
    i = 0
    while True:
        out = ctx.step(
            think,
            i,
            retry=RetryPolicy(
                max_attempts=30, initial_backoff_seconds=0.02, max_backoff_seconds=0.1
            ),
        )
        seen.append(out["i"])
        if out["done"]:
            return {"iterations": len(seen), "seen": seen}
        i += 1


# -- parallel steps, sleep and events in code ------------------------------------------------


def echo(ctx: StepContext, value: Any) -> Any:
    record(ctx)
    return value


def reserve(ctx: StepContext, req: dict[str, Any]) -> dict[str, Any]:
    record(ctx)
    return {"reservation": ctx.idempotency_key}


def release(ctx: StepContext, reservation: dict[str, Any] | None) -> None:
    record(ctx)


@workflow("parallel_sleep")
def parallel_sleep(ctx: WorkflowContext, n: int) -> list[Any]:
    handles = [ctx.start(echo, i) for i in range(n)]
    ctx.sleep(0.3)
    doubled = ctx.map(square, ctx.gather(*handles))
    return doubled


@workflow("approval")
def approval(ctx: WorkflowContext, req: dict[str, Any]) -> dict[str, Any]:
    held = ctx.step(reserve, req, compensate=release)
    decision = ctx.wait_event("approval", timeout=req.get("timeout"))
    ctx.step(echo, decision)
    return {"held": held["reservation"], "decision": decision}


# -- divergence and definition changes --------------------------------------------------------


def first(ctx: StepContext, value: Any) -> str:
    record(ctx)
    return "first"


def other_first(ctx: StepContext, value: Any) -> str:
    record(ctx)
    return "other"


def second(ctx: StepContext, value: Any) -> str:
    _block_if_asked(ctx, value)
    record(ctx)
    return "second"


@workflow("diverging", version=os.environ.get("SAGA_TEST_WORKFLOW_VERSION", "1"))
def diverging(ctx: WorkflowContext, spec: dict[str, Any]) -> list[str]:
    # A code change between attempts, as a deploy would make: another step at position 1.
    if os.environ.get("SAGA_TEST_DIVERGE"):
        a = ctx.step(other_first, None)
    else:
        a = ctx.step(first, None)
    b = ctx.step(second, None)
    c = ctx.step(echo, "third")
    return [a, b, c]


# -- a compensation that fails until an operator fixes things -------------------------------


def quote_any(ctx: StepContext, req: dict[str, Any]) -> dict[str, Any]:
    record(ctx)
    return {"city": req["city"]}


def undo_until_fixed(ctx: StepContext, booking: dict[str, Any] | None) -> dict[str, Any]:
    spec = ctx.run_input
    if ctx.step == spec.get("broken_undo") and not os.path.exists(spec["fixed_marker"]):
        raise RuntimeError(f"the {ctx.step} API refuses cancellations right now")
    record(ctx)
    return {"cancelled": _undone_ref(ctx, booking)}


BRIEF = RetryPolicy(max_attempts=2, initial_backoff_seconds=0.05, max_backoff_seconds=0.1)
fragile_trip = Saga("fragile_trip", retry=QUICK)
fragile_trip.step()(quote_any)
fragile_trip.step(after=quote_any, compensate=undo_until_fixed, compensate_retry=BRIEF)(flight)
fragile_trip.step(after=flight, compensate=undo_until_fixed, compensate_retry=BRIEF)(car)
fragile_trip.step(after=car, retry=RetryPolicy(max_attempts=1))(payment)


# -- timeouts ---------------------------------------------------------------------------------


def slow_first_attempt(ctx: StepContext, value: Any) -> str:
    record(ctx)
    if ctx.attempt == 1:
        time.sleep(60)  # the step's timeout interrupts this
    return "done"


timeouts = Saga("timeouts", [step(slow_first_attempt, timeout=0.5, retry=QUICK)])


# -- a workflow that hands pydantic models to its steps --------------------------------------


class Prompt(BaseModel):
    text: str
    turn: int = 1


def answer(ctx: StepContext, prompt: Prompt) -> dict[str, Any]:
    record(ctx)
    return {"text": prompt.text.upper(), "turn": prompt.turn}


@workflow("modelled")
def modelled(ctx: WorkflowContext, text: str) -> dict[str, Any]:
    # Models as step values, first and later: encoded as the step's parameter says.
    first = ctx.step(answer, Prompt(text=text))
    return ctx.step(answer, Prompt(text=first["text"] + "!", turn=2))


# -- a step whose result Postgres cannot store -----------------------------------------------


def returns_nul(ctx: StepContext, value: Any) -> str:
    record(ctx)  # the step did its work: it must not run again for want of a journal row
    return "bad\x00text"


nul_result = Saga("nul_result", [step(returns_nul, retry=RetryPolicy(max_attempts=3))])


def returns_refused(ctx: StepContext, value: Any) -> dict[str, Any]:
    record(ctx)
    return {"note": "refuse-me"}  # the test's trigger makes Postgres refuse this result


refused_result = Saga(
    "refused_result", [step(returns_refused, retry=RetryPolicy(max_attempts=3), compensate=release)]
)
