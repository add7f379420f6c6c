"""Saga definitions the integration tests run on real workers.

Step functions count every call in the test database's ``test_calls`` table (their own
connection, outside the engine), so tests can assert how often a function really ran.
"""

from __future__ import annotations

import os
import time
from collections import Counter
from typing import Any

import psycopg

from saga.definition import Saga, StepContext, step
from saga.retry import RetryPolicy
from saga.workflow import WorkflowContext, workflow

_conn: tuple[int, psycopg.Connection[Any]] | None = None


def record(ctx: StepContext) -> None:
    global _conn
    if _conn is None or _conn[0] != os.getpid() or _conn[1].closed:
        _conn = (os.getpid(), psycopg.connect(os.environ["SAGA_DATABASE_URL"], autocommit=True))
    _conn[1].execute(
        "INSERT INTO test_calls (run_id, step, attempt, idempotency_key, pid) "
        "VALUES (%s, %s, %s, %s, %s)",
        (ctx.run_id, ctx.step_key, ctx.attempt, ctx.idempotency_key, os.getpid()),
    )


def calls(db: psycopg.Connection[Any], run_id: str) -> Counter[str]:
    """How often each step of the run ran to its ``record(ctx)``, by step key."""
    rows = db.execute("SELECT step FROM test_calls WHERE run_id = %s", (run_id,)).fetchall()
    return Counter(r[0] for r in rows)


class Flaky(RuntimeError):
    pass


def _numbered(i: int) -> Any:
    def fn(ctx: StepContext, value: dict[str, Any]) -> dict[str, Any]:
        record(ctx)
        if value.get("block_at") == i and ctx.attempt == 1:
            time.sleep(300)  # the test kills this worker here
        if i in value.get("fail_at", ()) and ctx.attempt <= value.get("fail_times", 1):
            raise Flaky(f"step{i} fails on attempt {ctx.attempt} as asked")
        if value.get("sleep"):
            time.sleep(value["sleep"])
        return {**value, "trail": [*value.get("trail", []), i]}

    # Steps are imported by reference ("tests.sagas:step3"), so each is a module attribute.
    fn.__name__ = fn.__qualname__ = f"step{i}"
    globals()[fn.__name__] = fn
    return fn


FAST_RETRY = RetryPolicy(max_attempts=4, initial_backoff_seconds=0.1, max_backoff_seconds=0.3)

ten = Saga("ten", [_numbered(i) for i in range(1, 11)], retry=FAST_RETRY)
two = Saga("two", [_numbered(1), _numbered(2)], retry=FAST_RETRY)

# Step 2 (and its retries) goes to workers of another queue; steps 1 and 3 to the run's.
GPU_QUEUE = "saga-test-gpu"
_step1, _step2, _step3 = (globals()[f"step{i}"] for i in (1, 2, 3))  # made above, not anew
routed = Saga("routed", [_step1, step(_step2, queue=GPU_QUEUE), _step3], retry=FAST_RETRY)


@workflow("routed_code")
def routed_code(ctx: WorkflowContext, value: dict[str, Any]) -> dict[str, Any]:
    value = ctx.step(_step1, value)
    value = ctx.step(_step2, value, queue=GPU_QUEUE, retry=FAST_RETRY)
    return ctx.step(_step3, value)


def returns_object(ctx: StepContext, value: Any) -> Any:
    record(ctx)
    return {"handle": object()}


def returns_text(ctx: StepContext, size: int) -> str:
    record(ctx)
    return "x" * size


def fails_for_good(ctx: StepContext, value: Any) -> Any:
    record(ctx)
    raise ValueError("the input is wrong and will stay wrong")


def always_flaky(ctx: StepContext, value: Any) -> Any:
    record(ctx)
    raise Flaky(f"attempt {ctx.attempt} failed")


not_json = Saga("not_json", [returns_object])
too_big = Saga("too_big", [returns_text])
fatal = Saga(
    "fatal",
    [
        step(
            fails_for_good,
            retry=RetryPolicy(
                max_attempts=5, initial_backoff_seconds=0.1, non_retryable=(ValueError,)
            ),
        )
    ],
)
exhausts = Saga(
    "exhausts",
    [
        step(
            always_flaky,
            retry=RetryPolicy(max_attempts=3, initial_backoff_seconds=0.1, max_backoff_seconds=0.2),
        )
    ],
)
