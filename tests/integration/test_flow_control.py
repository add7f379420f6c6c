"""Flow control (saga.limits) with real workers, measured from outside: the LimitService the
steps call records how many of its requests were in flight at once, per key, and when each
arrived. Limits are held in Postgres: they hold while workers are killed and the broker is
flushed, and a killed worker's slot comes back after its lease."""

from __future__ import annotations

import math
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import psycopg
import pytest
import redis

from saga import SagaClient, Settings
from saga_dev import limit_sagas
from saga_dev.limit_service import URL_ENV, LimitService
from tests.processes import Process, ProcessGroup, wait_until

Conn = psycopg.Connection[Any]


@pytest.fixture
def service(monkeypatch: pytest.MonkeyPatch) -> Iterator[LimitService]:
    with LimitService() as svc:
        monkeypatch.setenv(URL_ENV, svc.url)
        yield svc


def _workers(
    procs: ProcessGroup, settings: Settings, service: LimitService, n: int, first: int = 0
) -> list[Process]:
    env = {URL_ENV: service.url}
    return [procs.worker(settings, f"w{i}", env=env) for i in range(first, first + n)]


def _finish(client: SagaClient, run_ids: list[str], timeout: float = 120) -> None:
    for run_id in run_ids:
        assert client.wait(run_id, timeout=timeout).state == "completed", run_id


def _count(db: Conn, query: str, params: tuple[Any, ...] = ()) -> int:
    row = db.execute(query, params).fetchone()
    assert row is not None
    return int(row[0])


def _steps_in(db: Conn, state: str, run_ids: list[str]) -> int:
    return _count(
        db,
        "SELECT count(*) FROM saga_steps WHERE state = %s AND run_id = ANY(%s)",
        (state, run_ids),
    )


def _no_slots_left(db: Conn) -> None:
    """Every run ended: no slot is held and no step waits in any line, and the concurrency
    gates, idle, are gone (a gate per key would otherwise stay a row forever)."""
    assert db.execute("SELECT gate, run_id, step_key, state FROM saga_gate_slots").fetchall() == []
    idle = "SELECT gate FROM saga_gates WHERE kind = 'concurrency'"
    assert db.execute(idle).fetchall() == []


def _max_total_in_flight(service: LimitService) -> int:
    """The most requests in flight at once over every key, from the service's own times."""
    events = [(t, 1) for ts in service.arrivals.values() for t in ts]
    events += [(t, -1) for _, t in service.ends]
    best = current = 0
    for _, delta in sorted(events):  # at the same instant an end (-1) sorts first
        current += delta
        best = max(best, current)
    return best


def _open_runs_at_most(order: list[str], runs: set[str]) -> int:
    """From the order of the service's calls, tagged by run: the most of ``runs`` open at once,
    a run being open from its first call to its last."""
    last = {tag: i for i, tag in enumerate(order) if tag in runs}
    seen: set[str] = set()
    best = 0
    for i, tag in enumerate(order):
        if tag not in runs:
            continue
        seen.add(tag)
        best = max(best, sum(1 for r in seen if last[r] >= i))
    return best


def test_a_limit_per_key_is_never_exceeded_and_keys_do_not_wait_for_each_other(
    settings: Settings, procs: ProcessGroup, service: LimitService, db: Conn
) -> None:
    procs.relay(settings)
    _workers(procs, settings, service, 6)
    with SagaClient(settings) as client:
        runs = [client.start(limit_sagas.per_tenant, {"tenant": "a", "ms": 150}) for _ in range(12)]
        runs += [client.start(limit_sagas.per_tenant, {"tenant": "b", "ms": 150}) for _ in range(6)]
        _finish(client, runs)
    assert service.max_in_flight["a"] == 3  # the limit, reached and never passed
    assert service.max_in_flight["b"] == 3
    _no_slots_left(db)


def _kill_a_worker_mid_step(
    db: Conn, service: LimitService, workers: list[Process], tenant: str, run_ids: list[str]
) -> tuple[Process, tuple[str, str]]:
    """Wait until ``tenant`` is at its limit in the service, then kill -9 a worker running one
    of its steps (its call is in flight). Returns the worker and the step it held."""

    def victim() -> tuple[Process, tuple[str, str]] | None:
        if service.in_flight[tenant] < 3:
            return None
        rows = db.execute(
            "SELECT s.run_id, s.step_key, s.lease_owner FROM saga_steps s "
            "WHERE s.state = 'running' AND s.step_name = 'call_service' AND s.run_id = ANY(%s)",
            (run_ids,),
        ).fetchall()
        by_pid = {w.pid: w for w in workers if w.alive()}
        for run_id, step_key, owner in rows:
            worker = by_pid.get(int(owner.split(":")[1]))
            if worker is not None:
                return worker, (run_id, step_key)
        return None

    found = wait_until(victim, 60, f"a worker running a step of tenant {tenant!r} at its limit")
    worker, held = found  # type: ignore[misc]
    # Its slot is held in Postgres by the step it was running.
    slots = "SELECT state FROM saga_gate_slots WHERE run_id = %s AND step_key = %s"
    assert db.execute(slots, held).fetchall() == [("held",)]
    worker.kill()
    return worker, held


def test_a_limit_holds_while_workers_are_killed_and_the_broker_is_flushed(
    settings: Settings,
    procs: ProcessGroup,
    service: LimitService,
    db: Conn,
    redis_client: redis.Redis,
) -> None:
    procs.relay(settings)
    workers = _workers(procs, settings, service, 5)
    with SagaClient(settings) as client:
        a = [client.start(limit_sagas.per_tenant, {"tenant": "a", "ms": 300}) for _ in range(24)]

        # A worker dies with a slot of "a": the other four carry on, and once its lease has
        # expired the slot is handed on (the service sees 3 calls of "a" at once again).
        _, held_a = _kill_a_worker_mid_step(db, service, workers, "a", a)
        redis_client.flushdb()  # the broker loses every queued and unacknowledged message
        wait_until(
            lambda: _count(
                db,
                "SELECT count(*) FROM saga_attempts WHERE run_id = %s AND step_key = %s "
                "AND outcome = 'lost'",
                held_a,
            ),
            30,
            "the killed worker's attempt to be found lost (its lease expired)",
        )
        arrived = len(service.arrivals["a"])
        wait_until(
            lambda: service.in_flight["a"] == 3 and len(service.arrivals["a"]) > arrived + 3,
            30,
            "tenant a to be at its limit of 3 again after its slot came back",
        )

        # And again for "b" (started now: its runs would be over before a's recovery), with a
        # replacement worker; the broker is flushed once more.
        b = [client.start(limit_sagas.per_tenant, {"tenant": "b", "ms": 300}) for _ in range(12)]
        _kill_a_worker_mid_step(db, service, workers, "b", b)
        workers += _workers(procs, settings, service, 1, first=5)
        redis_client.flushdb()
        _finish(client, a + b)

    assert service.max_in_flight["a"] == 3
    assert service.max_in_flight["b"] == 3
    # Each killed step was run again, and every run ran its step to completion.
    assert _count(db, "SELECT count(*) FROM saga_attempts WHERE outcome = 'lost'") >= 2
    _no_slots_left(db)


def test_round_robin_between_keys_a_small_key_does_not_wait_for_a_big_one(
    settings: Settings, procs: ProcessGroup, service: LimitService, db: Conn
) -> None:
    procs.relay(settings)
    _workers(procs, settings, service, 4)
    with SagaClient(settings) as client:
        big = [
            client.start(limit_sagas.shared_fair, {"tenant": "big", "ms": 150}) for _ in range(60)
        ]
        # Every one of big's steps has reached its line (or a slot) before small starts.
        wait_until(
            lambda: _steps_in(db, "throttled", big) + _steps_in(db, "completed", big) >= 57,
            90,
            "the big tenant's steps to wait in line",
        )
        small = [
            client.start(limit_sagas.shared_fair, {"tenant": "small", "ms": 150}) for _ in range(3)
        ]
        _finish(client, small + big)

    assert _max_total_in_flight(service) == 3  # the global limit, shared by both keys
    order = service.order
    assert sorted(order) == sorted(big + small)  # one call per run
    positions = [order.index(run) for run in small]
    # Round-robin: small's calls go in as slots free, between big's; first in, first out would
    # have made them wait for all of big's 60.
    assert max(positions) < 20, positions
    last_small_done = db.execute(
        "SELECT max(finished_at) FROM saga_runs WHERE run_id = ANY(%s)", (small,)
    ).fetchone()[0]  # type: ignore[index]
    big_after = _count(
        db,
        "SELECT count(*) FROM saga_runs WHERE run_id = ANY(%s) AND finished_at > %s",
        (big, last_small_done),
    )
    assert big_after >= 40, f"only {big_after} of big's 60 runs finished after small's 3"
    _no_slots_left(db)


def test_higher_priority_runs_take_a_freed_slot_before_older_lower_ones(
    settings: Settings, procs: ProcessGroup, service: LimitService, db: Conn, tmp_path: Path
) -> None:
    hold = tmp_path / "go"
    procs.relay(settings)
    _workers(procs, settings, service, 3)
    with SagaClient(settings) as client:
        # The one slot, held until the test lets it go.
        blocker = client.start(
            limit_sagas.one_at_a_time, {"tenant": "x", "ms": 50, "hold": str(hold)}
        )
        wait_until(lambda: _steps_in(db, "running", [blocker]), 30, "the blocker to hold the slot")

        def in_line(priority: int) -> str:
            """A run whose step waits in line, after the ones started before it."""
            run = client.start(
                limit_sagas.one_at_a_time, {"tenant": "x", "ms": 50}, priority=priority
            )
            wait_until(lambda: _steps_in(db, "throttled", [run]), 30, "a run to wait in line")
            return run

        low = [in_line(0) for _ in range(5)]
        high = [in_line(10) for _ in range(3)]
        hold.touch()
        _finish(client, [blocker, *low, *high])

    assert service.max_in_flight["x"] == 1
    order = service.order
    # Every later high one before any older low one; among equals, first come first served.
    assert order == [blocker, *high, *low], order
    _no_slots_left(db)


def test_a_rate_limit_holds_in_every_window_and_is_used_while_work_waits(
    settings: Settings, procs: ProcessGroup, service: LimitService, db: Conn
) -> None:
    rate, window = limit_sagas.RATE, limit_sagas.RATE_WINDOW  # 10 per second
    runs_n = 4 * rate
    procs.relay(settings)
    _workers(procs, settings, service, 4)
    with SagaClient(settings) as client:
        runs = [client.start(limit_sagas.rated, {"tenant": "r", "ms": 20}) for _ in range(runs_n)]
        _finish(client, runs)

    assert len(service.arrivals["r"]) == runs_n
    # Never more than the limit in any window, the limit being reached.
    assert service.max_in_window(window) == rate
    # All the work waited from the start: n calls need at least ceil(n / rate) - 1 windows
    # after the first; how much longer they took is how much of the rate went unused.
    times = service.arrivals["r"]
    span = max(times) - min(times)
    fraction = (math.ceil(runs_n / rate) - 1) * window / span
    assert fraction >= 0.7, f"achieved {fraction:.2f} of the allowed rate"
    _no_slots_left(db)


def test_at_most_two_runs_of_a_tenant_at_a_time(
    settings: Settings, procs: ProcessGroup, service: LimitService, db: Conn
) -> None:
    procs.relay(settings)
    _workers(procs, settings, service, 4)
    with SagaClient(settings) as client:
        a = [
            client.start(limit_sagas.two_runs_two_calls, {"tenant": "a", "ms": 100})
            for _ in range(6)
        ]
        b = [
            client.start(limit_sagas.two_runs_two_calls, {"tenant": "b", "ms": 100})
            for _ in range(3)
        ]
        _finish(client, a + b)

    order = service.order
    assert sorted(order) == sorted(2 * (a + b))  # two calls per run
    # A run is open from its first call to its second; no more than 2 of a tenant are.
    assert _open_runs_at_most(order, set(a)) == 2, order
    assert _open_runs_at_most(order, set(b)) == 2, order
    assert service.max_in_flight["a"] == 2
    _no_slots_left(db)


def test_a_429_pauses_the_rate_limit_for_every_step(
    settings: Settings, procs: ProcessGroup, service: LimitService, db: Conn
) -> None:
    retry_after = 2.0
    procs.relay(settings)
    _workers(procs, settings, service, 4)
    with SagaClient(settings) as client:
        # Its call takes half a second, then the provider says 429, Retry-After: 2.
        limited = client.start(
            limit_sagas.rate_429, {"tenant": "p", "ms": 500, "retry_after": retry_after}
        )
        wait_until(lambda: service.in_flight["p"] == 1, 30, "the call that will be refused")
        # Two more take the rest of the window's budget (3 per second) meanwhile ...
        early = [
            client.start(limit_sagas.rate_429_other, {"tenant": "p", "ms": 20}) for _ in range(2)
        ]
        wait_until(lambda: len(service.arrivals["p"]) == 3, 30, "the window's budget to be used")
        # ... and these wait for the next window, which the 429 pauses: a step of either saga.
        late = [
            client.start(saga, {"tenant": "p", "ms": 20})
            for saga in [limit_sagas.rate_429, limit_sagas.rate_429_other] * 3
        ]
        _finish(client, [limited, *early, *late])
        row = db.execute(
            "SELECT extract(epoch FROM paused_until) FROM saga_gates WHERE gate = 'r:svc_429:'"
        ).fetchone()
    assert row is not None and row[0] is not None
    paused_until = float(row[0])
    pause_began = paused_until - retry_after
    # The late ones were in line (waiting for the window's budget) when the pause began.
    scheduled = db.execute(
        "SELECT max(extract(epoch FROM created_at)) FROM saga_steps WHERE run_id = ANY(%s)",
        (late,),
    ).fetchone()
    assert scheduled is not None and float(scheduled[0]) < pause_began
    wall = time.time() - time.monotonic()  # service times are monotonic; Postgres's are not
    calls = list(zip(service.order, (wall + t for t in service.arrivals["p"]), strict=True))
    assert calls[0][0] == limited and {run for run, _ in calls[1:3]} == set(early)
    # Nobody called during the pause: the late ones and the refused step's retry came after.
    during = [(run, at - pause_began) for run, at in calls if pause_began <= at < paused_until]
    assert during == []
    assert all(at >= paused_until for run, at in calls[3:])
    assert [run for run, _ in calls].count(limited) == 2  # refused once, then done
    assert service.max_in_window(1.0) <= 3
    _no_slots_left(db)


def test_cancelling_a_waiting_run_frees_its_place_and_a_holder_gives_its_slot_back(
    settings: Settings, procs: ProcessGroup, service: LimitService, db: Conn, tmp_path: Path
) -> None:
    first_hold, second_hold = tmp_path / "first", tmp_path / "second"
    procs.relay(settings)
    _workers(procs, settings, service, 3)
    with SagaClient(settings) as client:
        blocker = client.start(
            limit_sagas.one_at_a_time, {"tenant": "x", "ms": 20, "hold": str(first_hold)}
        )
        wait_until(lambda: _steps_in(db, "running", [blocker]), 30, "the blocker to hold the slot")
        waiting = [
            client.start(limit_sagas.one_at_a_time, {"tenant": "x", "ms": 20}) for _ in range(3)
        ]
        wait_until(lambda: _steps_in(db, "throttled", waiting) == 3, 30, "the others to wait")

        # A run waiting in line is cancelled: its place goes at once, and it never runs.
        client.cancel(waiting[1])
        assert client.run(waiting[1]).state == "cancelled"
        slots = "SELECT * FROM saga_gate_slots WHERE run_id = %s"
        assert db.execute(slots, (waiting[1],)).fetchall() == []

        # The run holding the slot is cancelled while its step runs: the step keeps the slot
        # until it ends (it is still calling out), then the next ones get it.
        second = client.start(
            limit_sagas.one_at_a_time, {"tenant": "x", "ms": 20, "hold": str(second_hold)}
        )
        wait_until(lambda: _steps_in(db, "throttled", [second]), 30, "the second to wait")
        client.cancel(blocker)
        assert client.run(blocker).state == "cancelled"
        first_hold.touch()
        _finish(client, [waiting[0], waiting[2]])
        # Once more, for the second holder: the run behind it gets the slot after it.
        wait_until(lambda: _steps_in(db, "running", [second]), 30, "the second to hold the slot")
        last = client.start(limit_sagas.one_at_a_time, {"tenant": "x", "ms": 20})
        wait_until(lambda: _steps_in(db, "throttled", [last]), 30, "the last to wait")
        client.cancel(second)
        second_hold.touch()
        _finish(client, [last])
        assert client.run(second).state == "cancelled"

    assert service.max_in_flight["x"] == 1
    assert waiting[1] not in service.order
    assert service.order[0] == blocker
    assert service.order == [blocker, waiting[0], waiting[2], second, last]
    _no_slots_left(db)


def test_a_cancelled_run_keeps_its_run_slot_while_its_step_still_runs(
    settings: Settings, procs: ProcessGroup, service: LimitService, db: Conn, tmp_path: Path
) -> None:
    hold = tmp_path / "go"
    procs.relay(settings)
    _workers(procs, settings, service, 4)
    with SagaClient(settings) as client:
        holding = [
            client.start(
                limit_sagas.two_runs_two_calls, {"tenant": "c", "ms": 1000, "hold": str(hold)}
            )
            for _ in range(2)
        ]
        wait_until(lambda: _steps_in(db, "running", holding) == 2, 30, "two runs to hold slots")
        third = client.start(limit_sagas.two_runs_two_calls, {"tenant": "c", "ms": 1000})
        wait_until(lambda: _steps_in(db, "throttled", [third]), 30, "the third run to wait")
        # Cancelled, the run ends; its step does not: it goes on to call the service.
        client.cancel(holding[0])
        hold.touch()
        _finish(client, [holding[1], third])
        assert client.run(holding[0]).state == "cancelled"
        wait_until(lambda: not _steps_in(db, "running", holding), 30, "the cancelled step's end")

    # The third run started once the cancelled run's step was done, not while it still ran.
    assert service.max_in_flight["c"] == 2
    assert service.order.index(third) > service.order.index(holding[0])
    _no_slots_left(db)


def test_a_rate_limit_and_a_limit_per_key_hold_together_while_workers_die(
    settings: Settings,
    procs: ProcessGroup,
    service: LimitService,
    db: Conn,
    redis_client: redis.Redis,
) -> None:
    rate, window = limit_sagas.RATE, limit_sagas.RATE_WINDOW
    procs.relay(settings)
    workers = _workers(procs, settings, service, 5)
    with SagaClient(settings) as client:
        runs = {
            tenant: [
                client.start(limit_sagas.mixed, {"tenant": tenant, "ms": 300}) for _ in range(10)
            ]
            for tenant in ("a", "b", "c")
        }
        _kill_a_worker_mid_step(db, service, workers, "a", runs["a"])
        redis_client.flushdb()
        workers += _workers(procs, settings, service, 1, first=5)
        _finish(client, [run for tenant_runs in runs.values() for run in tenant_runs])

    assert max(service.max_in_flight.values()) == 3
    assert service.max_in_window(window) <= rate
    _no_slots_left(db)


def test_a_rate_grant_counts_for_its_window_and_a_guard(db: Conn) -> None:
    # Budget is booked at the claim and the request leaves a varying few ms later: a grant
    # counts for its window and a guard (5% of it, at most 250 ms), so that the service, which
    # counts requests, never sees more than the limit in a window of its own.
    spans = db.execute(
        "SELECT extract(epoch FROM saga_rate_span(p)) FROM unnest(%s::float8[]) p",
        ([0.2, 1.0, 3.0, 60.0],),
    ).fetchall()
    assert [round(float(s), 3) for (s,) in spans] == [0.21, 1.05, 3.15, 60.25]
    db.execute(
        "INSERT INTO saga_rate_grants (gate, at, units, run_id, step_key)"
        " VALUES ('r:guard:', clock_timestamp() - interval '1020 milliseconds', 1, 'r', 's')"
    )
    # 1.02 s old: out of a window of a second, still within its guard.
    assert db.execute("SELECT saga_rate_used('r:guard:', 1.0)").fetchone() == (1,)
    free = db.execute(
        "SELECT extract(epoch FROM saga_rate_free_at('r:guard:', 1, 1.0, 1) - at)"
        " FROM saga_rate_grants WHERE gate = 'r:guard:'"
    ).fetchone()
    assert free is not None and round(float(free[0]), 3) == 1.05
