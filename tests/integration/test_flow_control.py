"""Flow control (saga.limits) with real workers, measured from outside: the LimitService the
steps call records how many of its requests were in flight at once, per key, and when each
arrived. Limits are held in Postgres: they hold while workers are killed and the broker is
flushed, and a killed worker's slot comes back after its lease."""

from __future__ import annotations

from collections.abc import Iterator
from typing import Any

import psycopg
import pytest

from saga import SagaClient, Settings
from saga_dev import limit_sagas
from saga_dev.limit_service import URL_ENV, LimitService
from tests.processes import ProcessGroup

Conn = psycopg.Connection[Any]


@pytest.fixture
def service(monkeypatch: pytest.MonkeyPatch) -> Iterator[LimitService]:
    with LimitService() as svc:
        monkeypatch.setenv(URL_ENV, svc.url)
        yield svc


def _workers(procs: ProcessGroup, settings: Settings, service: LimitService, n: int) -> list[Any]:
    env = {URL_ENV: service.url}
    return [procs.worker(settings, f"w{i}", env=env) for i in range(n)]


def _finish(client: SagaClient, run_ids: list[str], timeout: float = 120) -> None:
    for run_id in run_ids:
        assert client.wait(run_id, timeout=timeout).state == "completed", run_id


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
    # Steps waited in Postgres (throttled), not in the broker: their wait was journaled.
    assert db.execute("SELECT count(*) FROM saga_gate_slots").fetchone() == (0,)


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
        "INSERT INTO saga_rate_grants (gate, at, units)"
        " VALUES ('r:guard:', clock_timestamp() - interval '1020 milliseconds', 1)"
    )
    # 1.02 s old: out of a window of a second, still within its guard.
    assert db.execute("SELECT saga_rate_used('r:guard:', 1.0)").fetchone() == (1,)
    free = db.execute(
        "SELECT extract(epoch FROM saga_rate_free_at('r:guard:', 1, 1.0, 1) - at)"
        " FROM saga_rate_grants WHERE gate = 'r:guard:'"
    ).fetchone()
    assert free is not None and round(float(free[0]), 3) == 1.05
