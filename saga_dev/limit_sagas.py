"""Sagas with limits, for the flow-control tests and ``saga bench limits``: each step calls the
LimitService (saga_dev.limit_service), which measures what the engine lets through."""

from __future__ import annotations

import os
import time
from typing import Any

from saga import Concurrency, RateLimit, RateLimited, Saga, StepContext, step, workflow
from saga_dev.limit_service import call


def _tenant(run: Any) -> str:
    return str(run["tenant"])


def _hold(ctx: StepContext) -> None:
    """With ``"hold": path`` in the run's input, the step (holding its slots) waits until the
    file exists before it calls the service: a test decides when it goes on."""
    path = ctx.run_input.get("hold")
    deadline = time.monotonic() + 120
    while path and not os.path.exists(path) and time.monotonic() < deadline:
        time.sleep(0.02)


def call_service(ctx: StepContext, value: Any) -> dict[str, Any]:
    _hold(ctx)
    call(str(ctx.run_input["tenant"]), float(ctx.run_input.get("ms", 100)), ctx.run_id)
    return {"tenant": ctx.run_input["tenant"]}


def done(ctx: StepContext, value: Any) -> Any:
    return value


# At most 3 calls at a time per tenant.
per_tenant = Saga(
    "per_tenant",
    [step(call_service, concurrency=Concurrency(3, key=_tenant, name="svc")), done],
)

# One call at a time in all, whoever calls: priorities decide who goes next.
one_at_a_time = Saga(
    "one_at_a_time", [step(call_service, concurrency=Concurrency(1, name="single"))]
)

# RATE calls per RATE_WINDOW seconds in all, shared by every worker.
RATE = int(os.environ.get("SAGA_LIMIT_RATE", "10"))
RATE_WINDOW = float(os.environ.get("SAGA_LIMIT_RATE_WINDOW", "1.0"))
rated = Saga(
    "rated",
    [step(call_service, rate_limit=RateLimit("svc_rate", RATE, per=RATE_WINDOW))],
)

# Both: the bench's mix. At most 3 at a time per tenant, RATE per RATE_WINDOW in all.
mixed = Saga(
    "mixed",
    [
        step(
            call_service,
            concurrency=Concurrency(3, key=_tenant, name="svc_mixed"),
            rate_limit=RateLimit("svc_mixed_rate", RATE, per=RATE_WINDOW),
        )
    ],
)


# At most 2 runs of a tenant at a time, whatever their steps do.
@workflow("two_runs_per_tenant", concurrency=Concurrency(2, key=_tenant))
def two_runs_per_tenant(ctx: Any, value: Any) -> Any:
    first = ctx.step(call_service, value)
    return ctx.step(done, first)


def used_tokens(ctx: StepContext, value: Any) -> int:
    """Takes an estimate of 10 tokens from the window; reports what it says it used."""
    ctx.used_tokens(int(value))
    return int(value)


# 100 tokens per minute, estimated at 10 a call and corrected by what each call reports.
tokens = Saga(
    "tokens",
    [step(used_tokens, rate_limit=RateLimit("tokens", 100, per=60.0, units=10, tokens=True))],
)


# One run per tenant at a time: a second is refused while the first runs.
@workflow("one_run_refuse", concurrency=Concurrency(1, key=_tenant, on_limit="refuse"))
def one_run_refuse(ctx: Any, value: Any) -> Any:
    return ctx.step(call_service, value)


# One run per tenant: a new one cancels the one running (the newest wins).
@workflow("newest_wins", concurrency=Concurrency(1, key=_tenant, on_limit="cancel_oldest"))
def newest_wins(ctx: Any, value: Any) -> Any:
    return ctx.step(call_service, value)


# At most 3 calls at a time in all, shared round-robin between tenants (the fairness key).
shared_fair = Saga(
    "shared_fair",
    [step(call_service, concurrency=Concurrency(3, name="shared", fair=_tenant))],
)


def call_or_429(ctx: StepContext, value: Any) -> dict[str, Any]:
    """Calls the service; with ``"retry_after": N`` in the run's input its first attempt then
    fails as a provider's 429 would: RateLimited(retry_after_seconds=N)."""
    result = call_service(ctx, value)
    retry_after = ctx.run_input.get("retry_after")
    if retry_after and ctx.attempt == 1:
        raise RateLimited("429 Too Many Requests", retry_after_seconds=float(retry_after))
    return result


def call_service_too(ctx: StepContext, value: Any) -> dict[str, Any]:
    return call_service(ctx, value)


# Two different steps sharing one rate limit: a 429 in one pauses it for both.
RATE_429 = RateLimit("svc_429", 3, per=1.0)
rate_429 = Saga("rate_429", [step(call_or_429, rate_limit=RATE_429)])
rate_429_other = Saga("rate_429_other", [step(call_service_too, rate_limit=RATE_429)])


# At most 2 runs of a tenant at a time, each calling the service twice: from the service's
# side, a run is open from its first call to its second.
@workflow("two_runs_two_calls", concurrency=Concurrency(2, key=_tenant))
def two_runs_two_calls(ctx: Any, value: Any) -> Any:
    first = ctx.step(call_service, value)
    ctx.step(done, first)
    return ctx.step(call_service_too, first)


# ``saga bench limits``: per-tenant concurrency and one rate limit shared by all, sized from the
# environment (the bench sets these for itself and its workers before importing this module).
# The gates are keyed by the bench's id too, so each invocation has slots and budget of its own.
BENCH_CONCURRENCY = int(os.environ.get("SAGA_LIMIT_BENCH_CONCURRENCY", "3"))
BENCH_RATE = int(os.environ.get("SAGA_LIMIT_BENCH_RATE", "20"))
BENCH_RATE_WINDOW = float(os.environ.get("SAGA_LIMIT_BENCH_RATE_WINDOW", "1.0"))


def _bench_tenant(run: Any) -> str:
    return f"{run['bench']}:{run['tenant']}"


def _bench(run: Any) -> str:
    return str(run["bench"])


bench_limits = Saga(
    "bench_limits",
    [
        step(
            call_service,
            concurrency=Concurrency(BENCH_CONCURRENCY, key=_bench_tenant, name="bench_limits"),
            rate_limit=RateLimit(
                "bench_limits_rate", BENCH_RATE, per=BENCH_RATE_WINDOW, key=_bench
            ),
        )
    ],
)
