"""A claim and a lease renewal rewrite no index entry (HOT, migration 0011), and the sweeper
still finds expired leases, now through the index of open steps' due times."""

from __future__ import annotations

import time
from collections.abc import Iterator
from typing import Any

import psycopg
import pytest
from psycopg_pool import ConnectionPool

from saga import coordinator
from saga import queries as q
from saga.coordinator import NewStep
from saga.definition import Saga, StepContext, step
from saga.store import PostgresStore, open_pool


def noop(ctx: StepContext, value: Any) -> Any:
    raise AssertionError("never called: the test decides each outcome")


chain = Saga("hot_claims", [step(noop, name="a", compensate=noop), step(noop, name="b")])


def advance(tx: Any) -> None:
    coordinator.advance(tx, lambda _ref: chain)


@pytest.fixture
def store(database_url: str) -> Iterator[PostgresStore]:
    pool: ConnectionPool = open_pool(database_url, size=2, name="saga-hot-claims")
    try:
        yield PostgresStore(pool, queue="hot", dispatch_timeout=60.0)
    finally:
        pool.close()


def start(store: PostgresStore, run_id: str) -> None:
    store.create_run(
        run_id=run_id,
        saga_name=chain.name,
        saga_ref="tests:hot_claims",
        saga_version=chain.version_tag,
        input_json="1",
        trace_context={},
        timeout=None,
        start=advance,
    )


def updates_in(conn: psycopg.Connection[Any], sql: Any, params: dict[str, Any]) -> tuple[int, int]:
    """(rows updated, of which HOT) by ``sql`` in a transaction of its own, from this backend's
    own statistics not yet reported (pg_stat_xact_user_tables: no wait for the collector)."""

    def counts() -> tuple[int, int]:
        row = conn.execute(
            "SELECT n_tup_upd, n_tup_hot_upd FROM pg_stat_xact_user_tables"
            " WHERE relname = 'saga_steps'"
        ).fetchone()
        assert row is not None
        return row[0], row[1]

    with conn.transaction():
        before = counts()
        assert conn.execute(sql, params).rowcount == 1
        after = counts()
    return after[0] - before[0], after[1] - before[1]


def test_a_claim_and_a_renewal_are_hot_updates(
    store: PostgresStore, db: psycopg.Connection[Any]
) -> None:
    start(store, "r1")
    claim = {"run_id": "r1", "step_key": "a", "owner": "w", "lease": 30.0}
    assert updates_in(db, q.CLAIM_STEP, claim) == (1, 1)
    renewal = {"run_id": "r1", "step_key": "a", "attempt": 1, "lease": 30.0}
    assert updates_in(db, q.RENEW_LEASE, renewal) == (1, 1)
    # The outcome takes the step out of the index of open steps: a new index entry, not HOT.
    outcome = {"run_id": "r1", "step_key": "a", "attempt": 1, "result": '"x"'}
    assert updates_in(db, q.COMPLETE_STEP, outcome) == (1, 0)


def test_an_expired_lease_is_found_though_its_step_is_not_due(
    store: PostgresStore, db: psycopg.Connection[Any]
) -> None:
    start(store, "r2")
    claim = store.claim_step("r2", "a", owner="w", lease=0.05)
    assert claim is not None
    db.execute("SELECT pg_sleep(0.1)")
    # Dispatched a moment ago with a 60 s dispatch timeout: due in a minute, its lease over now.
    due_in = db.execute(
        "SELECT extract(epoch FROM due_at - now()) FROM saga_steps WHERE run_id = 'r2'"
        " AND step_key = 'a'"
    ).fetchone()
    assert due_in is not None and due_in[0] > 50
    assert store.expire_leases() == [("r2", "a", "pending")]


def test_a_lease_of_a_step_dispatched_with_a_longer_timeout_is_found_by_a_wide_look(
    store: PostgresStore, database_url: str
) -> None:
    # Dispatched by a process whose dispatch timeout is 10 minutes: due beyond this sweeper's
    # horizon (its own 60 s), so only the sweeper's periodic wide look finds its lease.
    pool: ConnectionPool = open_pool(database_url, size=1, name="saga-hot-claims-slow")
    try:
        start(PostgresStore(pool, queue="hot", dispatch_timeout=600.0), "r5")
    finally:
        pool.close()
    assert store.claim_step("r5", "a", owner="w", lease=0.05) is not None
    time.sleep(0.1)
    assert store.expire_leases() == []
    assert store.expire_leases(all_open=True) == [("r5", "a", "pending")]


def test_no_finished_step_is_left_among_the_open_ones(
    store: PostgresStore, db: psycopg.Connection[Any]
) -> None:
    start(store, "r3")
    a = store.claim_step("r3", "a", owner="w", lease=30.0)
    assert a is not None
    store.complete_step(a, '"x"', advance, fast_path=True)
    b = store.claim_step("r3", "b", owner="w", lease=30.0)
    assert b is not None
    store.fail_attempt(b, {"type": "E"}, retry_in=None, advance=advance)
    undo = store.claim_step("r3", "compensate:a", owner="w", lease=30.0)
    assert undo is not None
    store.complete_step(undo, "null", advance, fast_path=True)
    assert store.get_run("r3").state == "compensated"
    open_steps = db.execute(
        "SELECT step_key, state FROM saga_steps WHERE run_id = 'r3' AND finished_at IS NULL"
    ).fetchall()
    assert open_steps == []


def test_scheduling_a_step_the_run_has_is_a_no_op(
    store: PostgresStore, db: psycopg.Connection[Any]
) -> None:
    """INSERT_STEP skips a step already journaled (NOT EXISTS under the run's lock, in place of
    ON CONFLICT DO NOTHING): the row, its seq and its state stay as they were."""
    start(store, "r4")
    before = db.execute("SELECT seq, state, due_at FROM saga_steps WHERE run_id = 'r4'").fetchall()
    again = NewStep(
        step_key="a",
        step_name="a",
        kind="action",
        fn_ref="elsewhere:other",
        input_json='"other"',
        options={},
        max_attempts=1,
        idempotency_key="r4:a",
        state="pending",
        delay_seconds=60.0,
    )
    store.advance_run("r4", lambda tx: tx.schedule([again]))
    after = db.execute("SELECT seq, state, due_at FROM saga_steps WHERE run_id = 'r4'").fetchall()
    assert after == before and len(after) == 1
