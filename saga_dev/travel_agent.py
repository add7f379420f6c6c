"""A travel agent written as code: a model completion decides each next action.

Each turn is two kinds of journaled step: ``decide`` (a model completion, through the openai
client) and the tool it chose. Look-ups are read-only; bookings and emails are outside effects
that send the step's idempotency key and have compensations (a booking is cancelled, an email is
followed by a correction) that run if the run fails for good. A completion without a tool call is
the final answer, a JSON object.

Workers need ``SAGA_MODEL_BASE_URL`` (or a real provider's key) and ``TRAVEL_SERVICE_URL``::

    saga start saga_dev.travel_agent:travel_agent --input '{"trip": "t-1"}' --wait

The same turn without the engine, ``take_turn``, is what the benchmark's baselines run.
"""

from __future__ import annotations

import json
import os
import urllib.error
import urllib.request
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

from pydantic import BaseModel, ConfigDict, Field, ValidationError

from saga import RetryPolicy, StepContext, WorkflowContext, workflow
from saga.agent.llm import (
    ChatRequest,
    Completion,
    MalformedCompletion,
    ModelRequestRejected,
    ToolSpec,
    acomplete,
    chat,
    complete,
    tool_message,
)

# -- the outside service ----------------------------------------------------------------------


class ServiceUnavailable(Exception):
    """The travel service failed or its answer was lost: retried (with the same key)."""


class ServiceRejected(Exception):
    """The travel service refused the request itself: the same request fails again."""


def service(op: str, body: dict[str, Any], key: str | None) -> dict[str, Any]:
    """POST to the travel service; ``key`` goes in the Idempotency-Key header."""
    base = os.environ.get("TRAVEL_SERVICE_URL")
    if not base:
        raise ServiceRejected("TRAVEL_SERVICE_URL is not set")
    headers = {"Content-Type": "application/json"}
    if key:
        headers["Idempotency-Key"] = key
    request = urllib.request.Request(
        f"{base.rstrip('/')}/{op}", data=json.dumps(body).encode(), headers=headers, method="POST"
    )
    timeout = float(os.environ.get("TRAVEL_SERVICE_TIMEOUT", "5"))
    try:
        with urllib.request.urlopen(request, timeout=timeout) as response:
            answer: dict[str, Any] = json.loads(response.read())
            return answer
    except urllib.error.HTTPError as exc:
        text = exc.read().decode(errors="replace")[:300]
        if exc.code >= 500 or exc.code == 429:
            raise ServiceUnavailable(f"travel service {op}: HTTP {exc.code}: {text}") from None
        raise ServiceRejected(f"travel service {op}: HTTP {exc.code}: {text}") from None
    except (urllib.error.URLError, TimeoutError, ConnectionError) as exc:
        raise ServiceUnavailable(f"travel service {op}: {exc}") from None


# -- tools: arguments the model gives, and the calls they make --------------------------------


class _Args(BaseModel):
    model_config = ConfigDict(extra="forbid")


class FlightQuery(_Args):
    destination: str
    day: int = 1


class HotelQuery(_Args):
    city: str
    night: int = 1


class FlightChoice(_Args):
    flight_id: str


class HotelChoice(_Args):
    hotel_id: str


class Email(_Args):
    to: str = Field(pattern=r"^[^@\s]+@[^@\s]+$")
    subject: str = Field(max_length=200)
    body: str = Field(max_length=4000)


def _lookup_flights(args: dict[str, Any], trip: str, key: str | None) -> dict[str, Any]:
    q = FlightQuery.model_validate(args)
    body = {"kind": "flights", "destination": q.destination, "day": q.day, "trip": trip}
    return service("lookup", body, key)


def _lookup_hotels(args: dict[str, Any], trip: str, key: str | None) -> dict[str, Any]:
    q = HotelQuery.model_validate(args)
    body = {"kind": "hotels", "city": q.city, "night": q.night, "trip": trip}
    return service("lookup", body, key)


def _book_flight(args: dict[str, Any], trip: str, key: str | None) -> dict[str, Any]:
    item = FlightChoice.model_validate(args).flight_id
    return service("book", {"kind": "flight", "item": item, "trip": trip}, key)


def _book_hotel(args: dict[str, Any], trip: str, key: str | None) -> dict[str, Any]:
    item = HotelChoice.model_validate(args).hotel_id
    return service("book", {"kind": "hotel", "item": item, "trip": trip}, key)


def _send_email(args: dict[str, Any], trip: str, key: str | None) -> dict[str, Any]:
    email = Email.model_validate(args)
    return service("send_email", {**email.model_dump(), "trip": trip}, key)


# Steps: module-level functions the workers import by path. Each passes its step's key.


def _trip(ctx: StepContext) -> str:
    return str(ctx.run_input["trip"])


def lookup_flights(ctx: StepContext, args: dict[str, Any]) -> dict[str, Any]:
    return _lookup_flights(args, _trip(ctx), ctx.idempotency_key)


def lookup_hotels(ctx: StepContext, args: dict[str, Any]) -> dict[str, Any]:
    return _lookup_hotels(args, _trip(ctx), ctx.idempotency_key)


def book_flight(ctx: StepContext, args: dict[str, Any]) -> dict[str, Any]:
    return _book_flight(args, _trip(ctx), ctx.idempotency_key)


def book_hotel(ctx: StepContext, args: dict[str, Any]) -> dict[str, Any]:
    return _book_hotel(args, _trip(ctx), ctx.idempotency_key)


def send_email(ctx: StepContext, args: dict[str, Any]) -> dict[str, Any]:
    return _send_email(args, _trip(ctx), ctx.idempotency_key)


def _undone_key(ctx: StepContext) -> str:
    assert ctx.undo is not None, "a compensation's context says what it undoes"
    return ctx.undo.idempotency_key


def cancel_booking(ctx: StepContext, booking: dict[str, Any] | None) -> dict[str, Any]:
    """Compensates a booking; its own key makes a retried cancellation a single one. A booking
    whose outcome is unknown (None) is cancelled by the key it was asked under, if it exists."""
    target = {"booking_id": booking["booking_id"]} if booking else {"booking_key": _undone_key(ctx)}
    return service("cancel", {**target, "trip": _trip(ctx)}, ctx.idempotency_key)


def send_correction(ctx: StepContext, sent: dict[str, Any] | None) -> dict[str, Any]:
    """Compensates an email: it cannot be unsent, so a correction follows it (for an email whose
    outcome is unknown, only if the service sent one under its key)."""
    about = (
        {"to": sent["to"], "subject": f"Correction to {sent['message_id']}"}
        if sent
        else {"correction_of_key": _undone_key(ctx)}
    )
    body = {
        **about,
        "body": "Please disregard our previous email: the trip could not be arranged.",
        "trip": _trip(ctx),
    }
    return service("send_email", body, ctx.idempotency_key)


@dataclass(frozen=True)
class Tool:
    spec: ToolSpec
    args: type[BaseModel]
    step: Callable[[StepContext, dict[str, Any]], dict[str, Any]]
    call: Callable[[dict[str, Any], str, str | None], dict[str, Any]]  # without the engine
    compensate: Callable[[StepContext, dict[str, Any] | None], dict[str, Any]] | None = None


def _tool(
    name: str, description: str, args: type[BaseModel], step: Any, call: Any, compensate: Any = None
) -> Tool:
    schema = {k: v for k, v in args.model_json_schema().items() if k != "title"}
    return Tool(
        ToolSpec(name=name, description=description, parameters=schema),
        args,
        step,
        call,
        compensate,
    )


TOOLS: dict[str, Tool] = {
    t.spec.name: t
    for t in (
        _tool(
            "lookup_flights",
            "Find flights to a destination on a day of the trip.",
            FlightQuery,
            lookup_flights,
            _lookup_flights,
        ),
        _tool(
            "book_flight",
            "Book a flight found by lookup_flights.",
            FlightChoice,
            book_flight,
            _book_flight,
            cancel_booking,
        ),
        _tool(
            "lookup_hotels",
            "Find hotels in a city for a night of the trip.",
            HotelQuery,
            lookup_hotels,
            _lookup_hotels,
        ),
        _tool(
            "book_hotel",
            "Book a hotel found by lookup_hotels.",
            HotelChoice,
            book_hotel,
            _book_hotel,
            cancel_booking,
        ),
        _tool(
            "send_email", "Email the traveller.", Email, send_email, _send_email, send_correction
        ),
    )
}
SPECS = [t.spec for t in TOOLS.values()]


# -- the model's turn -------------------------------------------------------------------------


class TravelTask(BaseModel):
    trip: str = Field(min_length=1, max_length=100)
    destination: str = "Lisbon"
    traveller: str = "ada@example.org"
    steps: int = Field(default=10, ge=1, le=100, description="model completions at most")
    attempts: int = Field(default=8, ge=1, le=50, description="per step, the first included")
    backoff_seconds: float = Field(default=0.5, gt=0, le=60)
    async_model: bool = Field(
        default=False, description="decide with the async model call (openai.AsyncOpenAI)"
    )


SYSTEM = (
    "You are a travel agent. Arrange the trip below with the tools, one tool call per turn. "
    "You have a budget of {steps} steps. On the last one call no tool: answer with a JSON "
    'object {{"answer": "<one sentence>", "bookings": ["<booking id>", ...]}}.'
)


def first_messages(task: TravelTask) -> list[dict[str, Any]]:
    user = (
        f"Trip: {task.trip}\nDestination: {task.destination}\nTraveller: {task.traveller}\n"
        "Book a flight and a hotel, and email the traveller what was booked."
    )
    return [
        {"role": "system", "content": SYSTEM.format(steps=task.steps)},
        {"role": "user", "content": user},
    ]


def check_tool_calls(completion: Completion) -> Completion:
    """Arguments the tool cannot take make the completion malformed (retried), rather than
    failing the tool step for good."""
    for call in completion.tool_calls:
        try:
            TOOLS[call.name].args.model_validate(call.arguments)
        except ValidationError as exc:
            raise MalformedCompletion(
                f"the model called {call.name!r} with arguments it cannot take: {exc}"
            ) from None
    return completion


def decide(ctx: StepContext, request: ChatRequest) -> Completion:
    """The journaled completion: the prompt is the step's input, the completion its result."""
    return check_tool_calls(complete(ctx, request))


async def decide_async(ctx: StepContext, request: ChatRequest) -> Completion:
    """``decide`` as an async step: the model call is awaited on the worker's event loop."""
    return check_tool_calls(await acomplete(ctx, request))


class BudgetExhausted(Exception):
    """The model did not answer within the task's budget of steps."""


@workflow("travel_agent")
def travel_agent(ctx: WorkflowContext, task: TravelTask) -> dict[str, Any]:
    model_retry = RetryPolicy(
        max_attempts=task.attempts,
        initial_backoff_seconds=task.backoff_seconds,
        max_backoff_seconds=max(30 * task.backoff_seconds, task.backoff_seconds),
        non_retryable=(ModelRequestRejected,),
    )
    tool_retry = RetryPolicy(
        max_attempts=task.attempts,
        initial_backoff_seconds=task.backoff_seconds,
        max_backoff_seconds=max(30 * task.backoff_seconds, task.backoff_seconds),
        non_retryable=(ServiceRejected,),
    )
    messages = first_messages(task)
    request = {"tools": [s.model_dump() for s in SPECS]}
    model_step: Callable[[StepContext, ChatRequest], Any] = (
        decide_async if task.async_model else decide
    )
    for turn in range(1, task.steps + 1):
        # Either way the step is named decide: same step keys, same journal.
        completion: Completion = ctx.step(
            model_step, {**request, "messages": messages}, name="decide", retry=model_retry
        )
        if not completion.tool_calls:
            return {"trip": task.trip, "turns": turn, "answer": completion.answer}
        messages = [*messages, completion.assistant_message()]
        for call in completion.tool_calls:
            tool = TOOLS[call.name]
            result = ctx.step(
                tool.step,
                call.arguments,
                name=call.name,
                compensate=tool.compensate,
                retry=tool_retry,
            )
            messages.append(tool_message(call, result))
    raise BudgetExhausted(f"trip {task.trip!r}: no answer within {task.steps} steps")


# -- the same turn without the engine (the benchmark's baselines) ------------------------------


def take_turn(
    task: TravelTask, messages: list[dict[str, Any]]
) -> tuple[list[dict[str, Any]], dict[str, Any] | None]:
    """One turn as plain code: a completion, then the tool it chose. No journal, no keys: the
    conversation so far, and the answer once there is one."""
    completion = check_tool_calls(chat(ChatRequest(messages=messages, tools=SPECS)))
    if not completion.tool_calls:
        return messages, completion.answer
    messages = [*messages, completion.assistant_message()]
    for call in completion.tool_calls:
        result = TOOLS[call.name].call(call.arguments, task.trip, None)
        messages.append(tool_message(call, result))
    return messages, None
