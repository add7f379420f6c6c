"""``saga bench limits``: flow control (saga.limits) under load, measured by the service called.

``--runs`` one-step runs (``saga_dev.limit_sagas:bench_limits``) over ``--tenants`` tenants, all
started at once. The step calls the LimitService (``saga_dev.limit_service``) in this process and
holds it ``--step-ms`` (drawn per run between the two bounds). It declares a concurrency limit per
tenant (``--concurrency``) and one rate limit for all (``--rate`` per ``--rate-window`` seconds),
sized so that the rate limit is the bottleneck. The engine runs as a relay and ``--workers``
threads-pool workers (``--threads`` each: enough that a window's worth of grants never waits for
a worker; the steps mostly wait on the service, not the CPU).

Everything is measured by the service, as a provider would see it, not from the engine's books:

* ``max_concurrency_observed``: the most requests of one tenant in flight at once.
* ``max_rate_observed``: the most requests that arrived within any ``rate_window_seconds``
  (a sliding window over the arrival times), against ``rate_limit``.
* ``rate_fraction``: the achieved rate while work was waiting, over the allowed rate. From the
  arrival that fills the first window (the ``rate_limit``-th) to the last arrival (the last run's
  step starting), all runs were waiting to be let through: requests that arrived after the
  first over the time between them, divided by ``rate_limit / rate_window_seconds``. A limiter
  that re-grants each unit the moment it leaves the window scores 1.0 (in bursts or evenly).
* ``slot_to_next_start_ms``: for each request end of a tenant that still had runs to go (all
  runs started by then, and one of the tenant's requests came later), the time until the
  tenant's next request arrived (p50, p99). While the rate limit is the bottleneck, this
  includes the next step's wait for rate budget, not only the slot's hand-over.
* ``budget_to_next_start_ms``: for the n-th request (n > ``rate_limit``), how long after the
  earliest time the window allowed it (the (n - ``rate_limit``)-th request's arrival plus the
  window) it arrived (p50, p99): the rate limit's wake-up delay, as the service sees it. It
  includes ``rate_guard_ms``, the time the engine counts a grant past its window (0010).

Then ``handover``: ``--handover-runs`` runs of one tenant whose steps hold the service long
enough that its slots allow at most half the rate: the slots are the bottleneck, every slot is
in use, and ``slot_to_next_start_ms`` there is the hand-over of a freed slot to the tenant's next
step (its outcome's commit dispatches the next in line, which claims, takes the rate budget left
over and calls). Its concurrency counts in ``max_concurrency_observed``.

``engine`` has the same from the engine's books (``saga_rate_grants``, polled as the run goes):
its grants, the most in any window, and the delay from budget freeing to the next grant.
"""

from __future__ import annotations

import argparse
import contextlib
import os
import random
import statistics
import sys
import threading
import time
import uuid
from collections import defaultdict
from collections.abc import Sequence
from typing import IO, Any

import psycopg

from saga.errors import ConfigurationError, SagaError
from saga.settings import Settings
from saga_dev.bench import _cpu_busy, _sigterm_interrupts, bench_harness, prepare, run_and_print
from saga_dev.bench_chaos import p99
from saga_dev.limit_service import URL_ENV, LimitService, most_in_window

SAGA_REF = "saga_dev.limit_sagas:bench_limits"
# How limit_sagas sizes bench_limits (read when it is imported, here and in the workers).
LIMIT_ENV = {
    "concurrency": "SAGA_LIMIT_BENCH_CONCURRENCY",
    "rate": "SAGA_LIMIT_BENCH_RATE",
    "rate_window": "SAGA_LIMIT_BENCH_RATE_WINDOW",
}
FRACTION_TARGET = 0.9
WARMUP_TENANT = "warmup"  # the service's key for the warm-up runs, left out of every figure
WARMUP_RUNS_PER_WORKER = 2
HANDOVER_TENANT = "handover"  # the hand-over phase's one tenant


def _limits(concurrency: int, rate: int, rate_window: float) -> None:
    """Size limit_sagas.bench_limits: through the environment, before it is imported here (the
    runs' gates are computed in this process when they start) and in the workers."""
    os.environ.update(
        {
            LIMIT_ENV["concurrency"]: str(concurrency),
            LIMIT_ENV["rate"]: str(rate),
            LIMIT_ENV["rate_window"]: repr(rate_window),
        }
    )
    from saga_dev import limit_sagas

    got = (limit_sagas.BENCH_CONCURRENCY, limit_sagas.BENCH_RATE, limit_sagas.BENCH_RATE_WINDOW)
    if got != (concurrency, rate, rate_window):
        raise ConfigurationError(
            f"saga_dev.limit_sagas was imported with other limits {got} before the bench set "
            f"them; run the bench in a process of its own"
        )


def _percentiles(values: list[float]) -> dict[str, Any]:
    return {
        "p50": round(statistics.median(values), 1) if values else None,
        "p99": p99(values) if values else None,
        "count": len(values),
    }


def rate_fraction(arrivals: list[float], limit: int, window: float) -> float | None:
    """Requests per second from the arrival filling the first window to the last arrival, over
    ``limit / window``; None with too few requests to tell."""
    times = sorted(arrivals)
    if len(times) <= limit or times[-1] <= times[limit - 1]:
        return None
    achieved = (len(times) - limit) / (times[-1] - times[limit - 1])
    return achieved / (limit / window)


def budget_delays_ms(arrivals: list[float], limit: int, window: float) -> list[float]:
    """Per request after the first ``limit``: how late it came after the window let it."""
    times = sorted(arrivals)
    return [(times[j] - times[j - limit] - window) * 1000 for j in range(limit, len(times))]


def slot_delays_ms(
    arrivals: dict[str, list[float]], ends: list[tuple[str, float]], since: float
) -> list[float]:
    """Per request end (at or after ``since``, when every run had started) of a key with a later
    request: the time until that key's next request arrived."""
    ends_by_key: dict[str, list[float]] = defaultdict(list)
    for key, t in ends:
        ends_by_key[key].append(t)
    delays = []
    for key, key_ends in ends_by_key.items():
        times = sorted(arrivals.get(key, []))
        i = 0
        for end in sorted(key_ends):
            while i < len(times) and times[i] < end:
                i += 1
            if i == len(times):
                break  # the key's last request: nothing waited
            if end >= since:
                delays.append((times[i] - end) * 1000)
    return delays


def _cleanup_gates(database_url: str, bench_id: str) -> None:
    """Drop the bench's gates and rate grants (its slots went with its runs)."""
    like = [f"c:bench_limits:{bench_id}%", f"r:bench_limits_rate:{bench_id}%"]
    with (
        contextlib.suppress(psycopg.Error),
        psycopg.connect(database_url, autocommit=True) as conn,
    ):
        conn.execute("DELETE FROM saga_rate_grants WHERE gate LIKE ANY(%s)", (like,))
        conn.execute("DELETE FROM saga_gates WHERE gate LIKE ANY(%s)", (like,))


class GrantLog:
    """The rate gate's grants as the engine books them (``saga_rate_grants``, wall-clock
    seconds), read every quarter window: a grant's row stays at least a window, so none is
    missed."""

    def __init__(self, database_url: str, gate: str, window: float) -> None:
        self._url, self._gate, self._every = database_url, gate, min(0.25, window / 4)
        self._seen: dict[tuple[str, float], int] = {}
        self._stop = threading.Event()
        self._errors: list[BaseException] = []
        self._thread = threading.Thread(target=self._run, daemon=True)

    def __enter__(self) -> GrantLog:
        self._thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self._stop.set()
        self._thread.join()

    def _run(self) -> None:
        try:
            with psycopg.connect(self._url, autocommit=True) as conn:
                while True:
                    stopping = self._stop.wait(self._every)
                    for ctid, at, units in conn.execute(
                        "SELECT ctid::text, extract(epoch FROM at)::float8, units"
                        " FROM saga_rate_grants WHERE gate = %s",
                        (self._gate,),
                    ):
                        self._seen[(ctid, at)] = units
                    if stopping:
                        return
        except BaseException as exc:
            self._errors.append(exc)

    def times(self) -> list[float]:
        if self._errors:
            raise SagaError(f"reading the rate limit's grants failed: {self._errors[0]}")
        return sorted(at for (_, at), units in self._seen.items() for _ in range(units))


def _rate_guard_ms(database_url: str, window: float) -> float:
    """How long past its window the engine counts a grant (migration 0010's saga_rate_span)."""
    with psycopg.connect(database_url, autocommit=True) as conn:
        row = conn.execute(
            "SELECT extract(epoch FROM saga_rate_span(%s))::float8 - %s", (window, window)
        ).fetchone()
    assert row is not None
    return round(float(row[0]) * 1000, 1)


def _run_input(bench_id: str, tenant: str, ms: float) -> dict[str, Any]:
    return {"bench": bench_id, "tenant": tenant, "ms": ms}


def handover_ms(concurrency: int, rate: int, rate_window: float, step_ms: float) -> float:
    """How long the hand-over phase's steps hold the service: long enough that one tenant's
    slots allow at most half the rate limit, so the slots, not the budget, are what it waits
    for."""
    return max(step_ms, round(2 * concurrency * rate_window / rate * 1000))


def bench_limits(
    settings: Settings,
    *,
    runs: int,
    tenants: int,
    concurrency: int,
    rate: int,
    rate_window: float,
    step_ms: tuple[float, float],
    workers: int,
    threads: int,
    seed: int,
    handover_runs: int,
) -> dict[str, Any]:
    assert settings.database_url and settings.broker_url, "cli.resolve() fills both"
    began = time.monotonic()
    busy_before = _cpu_busy()
    _limits(concurrency, rate, rate_window)
    # A threads-pool worker wants a connection per thread.
    durable = prepare(settings, f"{settings.queue}-bench-limits").model_copy(
        update={"pool_size": max(settings.pool_size, threads)}
    )
    bench_id = uuid.uuid4().hex[:12]
    draw = random.Random(seed)
    hold = [round(draw.uniform(*step_ms), 1) for _ in range(runs)]
    handover_hold = handover_ms(concurrency, rate, rate_window, step_ms[1])
    started: dict[str, float] = {}
    expected = runs / (rate / rate_window)
    with LimitService() as service:
        env = durable.child_env()
        env[URL_ENV] = service.url
        pool = ("--pool", "threads", "--concurrency", str(threads))
        try:
            with bench_harness(durable, env=env, workers=workers, pool=pool) as bench:
                try:
                    bench.wait_saga_ready()
                    # Each worker imports the step's module at its first step: not measured
                    # (gates and tenant of their own).
                    bench.saga_runs_seconds(
                        WARMUP_RUNS_PER_WORKER * workers,
                        1,
                        ref=SAGA_REF,
                        value=lambda i: _run_input(f"{bench_id}w", WARMUP_TENANT, 1),
                    )
                    cpu_before = bench.children.cpu_seconds()
                    gate = f"r:bench_limits_rate:{bench_id}"
                    with GrantLog(durable.database_url or "", gate, rate_window) as grants:
                        elapsed = bench.saga_runs_seconds(
                            runs,
                            1,
                            ref=SAGA_REF,
                            value=lambda i: _run_input(bench_id, f"t{i % tenants:02d}", hold[i]),
                            timeout=60 + 3 * expected,
                            started=lambda: started.setdefault("main", time.monotonic()),
                        )
                    cpu_after = bench.children.cpu_seconds()
                    if handover_runs:  # one tenant, its slots the bottleneck (own gates)
                        bench.saga_runs_seconds(
                            handover_runs,
                            1,
                            ref=SAGA_REF,
                            value=lambda i: _run_input(
                                f"{bench_id}h", HANDOVER_TENANT, handover_hold
                            ),
                            timeout=60 + 3 * handover_runs * handover_hold / 1000 / concurrency,
                            started=lambda: started.setdefault("handover", time.monotonic()),
                        )
                except SagaError as exc:
                    raise SagaError(f"{exc}\n{bench.children.logs()}") from exc
        finally:
            _cleanup_gates(durable.database_url or "", bench_id)
    # The workers have stopped: nothing calls the service any more.
    main_keys = {f"t{i:02d}" for i in range(tenants)}
    arrivals = {k: list(v) for k, v in service.arrivals.items() if k in main_keys}
    ends = [(k, t) for k, t in service.ends if k in main_keys]
    max_in_flight = {k: n for k, n in service.max_in_flight.items() if k in main_keys}
    every = [t for ts in arrivals.values() for t in ts]
    if len(every) != runs:
        raise SagaError(f"the service saw {len(every)} requests for {runs} runs")
    granted = grants.times()
    guard_ms = _rate_guard_ms(durable.database_url or "", rate_window)
    fraction = rate_fraction(every, rate, rate_window)
    max_concurrency = max(max_in_flight.values())
    max_rate = most_in_window(every, rate_window)
    handover: dict[str, Any] | None = None
    if handover_runs:
        key = HANDOVER_TENANT
        handover = {
            "runs": handover_runs,
            "step_ms": handover_hold,
            "max_concurrency_observed": service.max_in_flight[key],
            "slot_to_next_start_ms": _percentiles(
                slot_delays_ms(
                    {key: list(service.arrivals[key])},
                    [(k, t) for k, t in service.ends if k == key],
                    started.get("handover", float("inf")),
                )
            ),
        }
        max_concurrency = max(max_concurrency, handover["max_concurrency_observed"])
    cpu = {
        role: round((cpu_after[role] - cpu_before.get(role, 0.0)) * 1000 / runs, 2)
        for role in cpu_after
    }
    mean_hold = statistics.mean(hold) / 1000
    return {
        "suite": "limits",
        "runs": runs,
        "tenants": tenants,
        "step_ms": list(step_ms),
        "workers": workers,
        "threads_per_worker": threads,
        "concurrency_limit": concurrency,
        # The most in flight for one tenant, in either phase.
        "max_concurrency_observed": max_concurrency,
        "max_concurrency_by_phase": {
            "main": max(max_in_flight.values()),
            "handover": None if handover is None else handover["max_concurrency_observed"],
        },
        "tenants_reaching_concurrency_limit": sum(
            1 for n in max_in_flight.values() if n >= concurrency
        ),
        "rate_limit": rate,
        "rate_window_seconds": rate_window,
        "max_rate_observed": max_rate,
        "rate_fraction": None if fraction is None else round(fraction, 3),
        # A grant counts for its window and this guard (the claim-to-request delay varies): the
        # most the engine lets through is rate_limit per window + guard.
        "rate_guard_ms": guard_ms,
        "rate_fraction_definition": (
            "requests after the rate_limit-th over the seconds from its arrival to the last "
            "arrival (every run waiting meanwhile), divided by rate_limit / rate_window_seconds"
        ),
        # What the per-tenant slots alone would allow, if the rate limit did not bind.
        "concurrency_capacity_per_s": round(tenants * concurrency / mean_hold, 1),
        "slot_to_next_start_ms": _percentiles(
            slot_delays_ms(arrivals, ends, started.get("main", float("inf")))
        ),
        "handover": handover,
        "budget_to_next_start_ms": _percentiles(budget_delays_ms(every, rate, rate_window)),
        # The engine's own books: when it granted the budget (a step's claim), which the
        # service sees a little later, when the step's request arrives.
        "engine": {
            "grants": len(granted),
            "max_rate_granted": most_in_window(granted, rate_window),
            "budget_to_next_grant_ms": _percentiles(budget_delays_ms(granted, rate, rate_window)),
        },
        "elapsed_s": round(elapsed, 1),
        "expected_s_at_rate_limit": round(expected, 1),
        "worker_cpu_ms_per_run": cpu.get("saga-worker"),
        "relay_cpu_ms_per_run": cpu.get("relay"),
        "targets": {
            "rate_fraction": {
                "min": FRACTION_TARGET,
                "pass": fraction is not None and fraction >= FRACTION_TARGET,
            },
            "max_concurrency_observed": {
                "max": concurrency,
                "pass": max_concurrency <= concurrency,
            },
            "max_rate_observed": {"max": rate, "pass": max_rate <= rate},
        },
        "cpus": os.cpu_count(),
        "cpu_busy_before": None if busy_before is None else round(busy_before, 3),
        "total_s": round(time.monotonic() - began, 1),
    }


def print_table(report: dict[str, Any], out: IO[str]) -> None:
    t = report["targets"]
    verdict = {True: "pass", False: "FAIL"}
    busy = report["cpu_busy_before"]
    slot, budget = report["slot_to_next_start_ms"], report["budget_to_next_start_ms"]
    engine = report["engine"]
    by_phase = report["max_concurrency_by_phase"]
    grant = engine["budget_to_next_grant_ms"]
    lines = [
        f"saga bench limits: {report['runs']} runs over {report['tenants']} tenants, steps "
        f"holding the service {report['step_ms'][0]:g}-{report['step_ms'][1]:g} ms; "
        f"{report['workers']} workers x {report['threads_per_worker']} threads and a relay, "
        f"{report['cpus']} CPUs ({'?' if busy is None else f'{busy:.0%}'} busy before)",
        f"limits: {report['concurrency_limit']} at a time per tenant; {report['rate_limit']} "
        f"per {report['rate_window_seconds']:g} s for all (the tenants' slots alone would "
        f"allow {report['concurrency_capacity_per_s']:g}/s)",
        "",
        "measured by the service:",
        f"  most in flight for one tenant   {report['max_concurrency_observed']:>8}   <= "
        f"{t['max_concurrency_observed']['max']} {verdict[t['max_concurrency_observed']['pass']]}"
        f" (main phase {by_phase['main']}, reached by "
        f"{report['tenants_reaching_concurrency_limit']} tenants; hand-over phase "
        f"{by_phase['handover']})",
        f"  most arrivals in any {report['rate_window_seconds']:g} s window "
        f"{report['max_rate_observed']:>6}   <= {t['max_rate_observed']['max']} "
        f"{verdict[t['max_rate_observed']['pass']]}",
        f"  rate_fraction                   {report['rate_fraction']!s:>8}   >= "
        f"{t['rate_fraction']['min']} {verdict[t['rate_fraction']['pass']]}",
        f"    ({report['rate_fraction_definition']})",
        f"  slot freed -> tenant's next request, ms      p50 {slot['p50']}  p99 {slot['p99']}"
        f"  ({slot['count']} request ends; includes the wait for rate budget)",
        f"  budget freed -> next request, ms             p50 {budget['p50']}  p99 {budget['p99']}"
        f"  (the rate limit's wake-up delay, with its guard of {report['rate_guard_ms']:g} ms)",
        f"engine's books: {engine['grants']} grants, most in any window "
        f"{engine['max_rate_granted']}; budget freed -> next grant, ms p50 "
        f"{grant['p50']}  p99 {grant['p99']}",
    ]
    handover = report["handover"]
    if handover is not None:
        h = handover["slot_to_next_start_ms"]
        lines.append(
            f"hand-over: {handover['runs']} runs of one tenant holding the service "
            f"{handover['step_ms']:g} ms (its slots the bottleneck): most in flight "
            f"{handover['max_concurrency_observed']}; slot freed -> its next request, ms "
            f"p50 {h['p50']}  p99 {h['p99']}"
        )
    lines += [
        "",
        f"elapsed {report['elapsed_s']} s (at exactly the rate limit: "
        f"{report['expected_s_at_rate_limit']} s); CPU ms per run: workers "
        f"{report['worker_cpu_ms_per_run']}, relay {report['relay_cpu_ms_per_run']}",
    ]
    print("\n".join(lines), file=out)


def parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="saga bench limits",
        description="Per-tenant concurrency and a global rate limit under load, measured by "
        "the service the steps call: the highest concurrency per tenant and rate per window "
        "(at most the limits), the achieved share of the rate limit, and wake-up delays.",
        epilog="Postgres: SAGA_DATABASE_URL; broker: SAGA_BROKER_URL (choose the Redis "
        "database there, e.g. redis://127.0.0.1:6379/6); the bench's queue is SAGA_QUEUE "
        "followed by -bench-limits.",
    )
    p.add_argument("--json", action="store_true")
    p.add_argument("--runs", type=int, default=1000, help="one-step runs (1000)")
    p.add_argument("--tenants", type=int, default=20, help="concurrency keys (20)")
    p.add_argument("--concurrency", type=int, default=3, help="per tenant (3)")
    p.add_argument("--rate", type=int, default=20, help="requests per window, for all (20)")
    p.add_argument("--rate-window", type=float, default=1.0, help="seconds (1.0)")
    p.add_argument(
        "--step-ms",
        default="50-100",
        help="how long a step holds the service, ms: MIN-MAX, drawn per run (50-100)",
    )
    p.add_argument("--workers", type=int, default=2, help="worker processes (2)")
    p.add_argument("--threads", type=int, default=12, help="threads per worker (12)")
    p.add_argument("--seed", type=int, default=1, help="draws the steps' durations")
    p.add_argument(
        "--handover-runs",
        type=int,
        default=60,
        help="then runs of one tenant whose slots, not the rate, are the bottleneck, to time "
        "the hand-over of a freed slot (60; 0: none)",
    )
    return p


def _step_ms(text: str) -> tuple[float, float]:
    try:
        low, _, high = text.partition("-")
        bounds = (float(low), float(high or low))
    except ValueError:
        raise ConfigurationError(f"--step-ms takes MIN-MAX milliseconds, got {text!r}") from None
    if not 0 <= bounds[0] <= bounds[1] <= 60_000:
        raise ConfigurationError(f"--step-ms takes 0 <= MIN <= MAX <= 60000, got {text!r}")
    return bounds


def main(argv: Sequence[str], settings: Settings) -> int:
    import redis
    from kombu.exceptions import KombuError

    args = parser().parse_args(argv)
    if min(args.runs, args.tenants, args.concurrency, args.rate, args.workers, args.threads) < 1:
        raise ConfigurationError(
            "--runs, --tenants, --concurrency, --rate, --workers and --threads must be at least 1"
        )
    if args.handover_runs < 0:
        raise ConfigurationError("--handover-runs must be at least 0")
    if not 0 < args.rate_window <= 3600:
        raise ConfigurationError("--rate-window takes seconds, more than 0 and at most 3600")
    step_ms = _step_ms(args.step_ms)

    def make_report() -> dict[str, Any]:
        with _sigterm_interrupts():
            return bench_limits(
                settings,
                runs=args.runs,
                tenants=args.tenants,
                concurrency=args.concurrency,
                rate=args.rate,
                rate_window=args.rate_window,
                step_ms=step_ms,
                workers=args.workers,
                threads=args.threads,
                seed=args.seed,
                handover_runs=args.handover_runs,
            )

    errors = (redis.RedisError, psycopg.Error, KombuError, OSError)
    code = run_and_print(make_report, print_table, args.json, errors)
    sys.stdout.flush()
    return code
