"""Async steps, compensations and workflows the integration tests run on real workers.

Like ``tests.sagas``, each step counts its calls in ``test_calls`` (``record``), so tests can
assert how often a function really ran. A value's ``block_at`` names the function whose first
attempt waits (on the event loop) until the test kills its worker.
"""

from __future__ import annotations

import asyncio
import os
import threading
import time
from typing import Any

import psycopg

from saga import RetryPolicy, Saga, StepContext, step
from saga.workflow import AsyncWorkflowContext, workflow
from tests.sagas import FAST_RETRY, record


class Refused(Exception):
    pass


async def _maybe_block(ctx: StepContext, value: dict[str, Any] | None, name: str) -> None:
    if value and value.get("block_at") == name and ctx.attempt == 1:
        await asyncio.sleep(300)  # the test kills this worker here


async def first(ctx: StepContext, value: dict[str, Any]) -> dict[str, Any]:
    record(ctx)
    await _maybe_block(ctx, value, "first")
    return {**value, "trail": [*value.get("trail", []), "first"]}


async def book(ctx: StepContext, value: dict[str, Any]) -> dict[str, Any]:
    record(ctx)
    await _maybe_block(ctx, value, "book")
    return {**value, "trail": [*value.get("trail", []), "book"], "booking": ctx.idempotency_key}


async def unbook(ctx: StepContext, booking: dict[str, Any] | None) -> dict[str, Any]:
    record(ctx)
    await _maybe_block(ctx, booking, "unbook")
    assert ctx.undo is not None
    return {"cancelled": booking["booking"] if booking else ctx.undo.idempotency_key}


async def finish(ctx: StepContext, value: dict[str, Any]) -> dict[str, Any]:
    record(ctx)
    await _maybe_block(ctx, value, "finish")
    if value.get("refuse"):
        raise Refused("refused as asked")
    return {**value, "trail": [*value.get("trail", []), "finish"]}


_FINISH_RETRY = RetryPolicy(max_attempts=3, initial_backoff_seconds=0.1, non_retryable=(Refused,))

async_graph = Saga(
    "async_graph",
    [first, step(book, compensate=unbook), step(finish, retry=_FINISH_RETRY)],
    retry=FAST_RETRY,
)


@workflow("async_flow")
async def async_flow(ctx: AsyncWorkflowContext, value: dict[str, Any]) -> dict[str, Any]:
    value = await ctx.step(first, value, retry=FAST_RETRY)
    value = await ctx.step(book, value, compensate=unbook, retry=FAST_RETRY)
    result: dict[str, Any] = await ctx.step(finish, value, retry=_FINISH_RETRY)
    return result


async def loop_probe(ctx: StepContext, value: Any) -> dict[str, Any]:
    """Which loop ran this step, and how many steps that loop has run (a mark on the loop)."""
    loop = asyncio.get_running_loop()
    uses = getattr(loop, "saga_test_uses", 0) + 1
    loop.saga_test_uses = uses  # type: ignore[attr-defined]
    record(ctx)
    return {"pid": os.getpid(), "thread": threading.get_ident(), "loop": id(loop), "uses": uses}


probe = Saga("loop_probe", [loop_probe])


# -- timeouts ---------------------------------------------------------------------------------


def _late(ctx: StepContext) -> None:
    """Counted as step ``<key>:late``: the step ran past its sleep."""
    with psycopg.connect(os.environ["SAGA_DATABASE_URL"], autocommit=True) as conn:
        conn.execute(
            "INSERT INTO test_calls (run_id, step, attempt, idempotency_key, pid) "
            "VALUES (%s, %s, %s, %s, %s)",
            (ctx.run_id, f"{ctx.step_key}:late", ctx.attempt, ctx.idempotency_key, os.getpid()),
        )


def sleepy(ctx: StepContext, seconds: float) -> str:
    record(ctx)
    time.sleep(seconds)
    _late(ctx)
    return "slept"


async def async_sleepy(ctx: StepContext, seconds: float) -> str:
    record(ctx)
    await asyncio.sleep(seconds)
    _late(ctx)
    return "slept"


_ONCE = RetryPolicy(max_attempts=1)
timed = Saga("timed", [step(sleepy, timeout=1.0, retry=_ONCE)])
async_timed = Saga("async_timed", [step(async_sleepy, timeout=1.0, retry=_ONCE)])
