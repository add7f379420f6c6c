"""Sagas the dashboard's browser tests run on real workers."""

from __future__ import annotations

import os
import time
from typing import Any

from saga import RetryPolicy, Saga, StepContext, WorkflowContext, step, workflow
from tests.sagas import record

BRIEF = RetryPolicy(max_attempts=2, initial_backoff_seconds=0.05, max_backoff_seconds=0.1)


class ServiceDown(RuntimeError):
    pass


def until_fixed(ctx: StepContext, spec: dict[str, Any]) -> dict[str, Any]:
    """Fails until the file the input names exists (the operator's "fix")."""
    record(ctx)
    if not os.path.exists(spec["marker"]):
        raise ServiceDown(f"the booking service is down (attempt {ctx.attempt})")
    return {"booked": ctx.idempotency_key}


fixable = Saga("dash_fixable", [step(until_fixed, retry=BRIEF)])


def hostile(ctx: StepContext, value: Any) -> dict[str, Any]:
    """A result a careless page would run as script."""
    return {"html": '<script>window.__pwned = 1</script><img src=x onerror="window.__pwned=2">'}


def big_answer(ctx: StepContext, value: Any) -> str:
    """A result too big to show whole."""
    return "".join(f"line {i:04d} of a long answer\n" for i in range(300))


hostile_result = Saga("dash_hostile", [hostile, big_answer])


def fetch(ctx: StepContext, spec: dict[str, Any]) -> dict[str, Any]:
    record(ctx)
    return {"fetched": spec.get("url", "https://example.org")}


def slow_once(ctx: StepContext, page: dict[str, Any]) -> dict[str, Any]:
    """Its first attempt hangs (the test kills its worker); the next one finishes."""
    record(ctx)
    if ctx.attempt == 1:
        time.sleep(300)
    return {"summary": f"summary of {page['fetched']}"}


def finish(ctx: StepContext, summary: dict[str, Any]) -> str:
    record(ctx)
    return summary["summary"]


@workflow("dash_pipeline")
def pipeline(ctx: WorkflowContext, spec: dict[str, Any]) -> str:
    page = ctx.step(fetch, spec)
    summary = ctx.step(slow_once, page, retry=RetryPolicy(max_attempts=3))
    return ctx.step(finish, summary)
