"""Sagas with limits, for the flow-control tests and ``saga bench limits``: each step calls the
LimitService (saga_dev.limit_service), which measures what the engine lets through."""

from __future__ import annotations

import os
from typing import Any

from saga import Concurrency, RateLimit, Saga, StepContext, step, workflow
from saga_dev.limit_service import call


def _tenant(run: Any) -> str:
    return str(run["tenant"])


def call_service(ctx: StepContext, value: Any) -> dict[str, Any]:
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
