"""Flow control's gates (migration 0010) under concurrent transactions, against the migrated
schema and the store's real claims: lock order between claims and releases, and a claim retried
by the delivery whose reply was lost."""

from __future__ import annotations

import json
import threading
from collections.abc import Iterator
from typing import Any

import psycopg
import pytest

from saga import coordinator
from saga.definition import Saga, StepContext, step
from saga.limits import RateLimit
from saga.store import PostgresStore, open_pool

Conn = psycopg.Connection[Any]


def _ask(ctx: StepContext, value: Any) -> Any:
    raise AssertionError("never called: the test claims steps itself")


# One model call a minute.
one_a_minute = Saga("gr_llm", [step(_ask, rate_limit=RateLimit("gr_llm", 1, per=60))])


@pytest.fixture
def store(database_url: str) -> Iterator[PostgresStore]:
    s = PostgresStore(open_pool(database_url, size=2, name="gr"), queue="q", dispatch_timeout=30)
    yield s
    s.close()


def _run(db: Conn, run_id: str, state: str, step_state: str) -> None:
    db.execute(
        "INSERT INTO saga_runs (run_id, saga_name, saga_ref, saga_version, state, input, "
        "trace_context, gated) VALUES (%s, 'gr', 'm:s', '1', %s, '{}', '{}', true)",
        (run_id, state),
    )
    db.execute(
        "INSERT INTO saga_steps (run_id, step_key, step_name, seq, state, max_attempts, "
        "idempotency_key) VALUES (%s, 's', 's', 1, %s, 1, %s)",
        (run_id, step_state, f"k-{run_id}"),
    )


TAKE = "SELECT taken FROM saga_gate_take(%s, 'concurrency', 1, NULL, 1, 'r2', 's', %s, 0, '', NULL)"


def test_a_release_takes_gates_in_the_order_claims_do(database_url: str, db: Conn) -> None:
    """A claim takes its run's gate, then its step's; the end of a run gives back both. Taken
    in another order (by name: the step's 'c:a:' before the run's 'c:z:'), the two deadlock."""
    _run(db, "r1", "completed", "completed")  # ended: its slots go back
    _run(db, "r2", "running", "dispatched")  # being claimed
    db.execute(
        "INSERT INTO saga_gates (gate, kind, lim) VALUES ('c:a:', 'concurrency', 1), "
        "('c:z:', 'concurrency', 1)"
    )
    db.execute(
        "INSERT INTO saga_gate_slots (gate, run_id, step_key, state, run_level) VALUES "
        "('c:a:', 'r1', 's', 'held', false), ('c:z:', 'r1', '', 'held', true)"
    )
    with psycopg.connect(database_url) as claim, psycopg.connect(database_url) as release:
        claim.execute("SET deadlock_timeout = '100ms'")
        release.execute("SET deadlock_timeout = '100ms'")
        # The claim of r2's step: its run's gate first (it waits behind r1's slot, not yet
        # given back, but it holds the gate's lock until it commits).
        claim.execute(TAKE, ("c:z:", True))
        errors: list[BaseException] = []

        def give_back() -> None:
            try:
                release.execute("SELECT * FROM saga_gate_release('r1', NULL, 30)").fetchall()
                release.commit()
            except BaseException as exc:  # reported by the test
                errors.append(exc)
                release.rollback()

        t = threading.Thread(target=give_back)
        t.start()
        t.join(0.5)  # the release waits for the run's gate (after its first, by its order)
        try:
            claim.execute(TAKE, ("c:a:", False))  # then the step's gate
            claim.commit()
        except psycopg.errors.DeadlockDetected as exc:
            claim.rollback()
            errors.append(exc)
        t.join(10)
        assert not t.is_alive()
    assert not [e for e in errors if isinstance(e, psycopg.errors.DeadlockDetected)], errors
    assert not errors, errors


def test_a_claim_retried_after_its_reply_was_lost_keeps_what_it_took(
    store: PostgresStore, db: Conn
) -> None:
    """The delivery retries a claim whose commit's reply it lost (same owner): the step is
    already its own, with its gates. It must not take the rate budget again, nor be put in
    line while it runs (its worker would drop it, and it would wait a lease)."""
    store.create_run(
        run_id="r",
        saga_name=one_a_minute.name,
        saga_ref=f"tests:{one_a_minute.name}",
        saga_version=one_a_minute.version_tag,
        input_json=json.dumps({}),
        trace_context={},
        timeout=None,
        start=lambda tx: coordinator.advance(tx, lambda _ref: one_a_minute),
    )
    first = store.claim_gated_step("r", "_ask", owner="o", lease=30.0)
    assert first is not None and first.claim is not None
    again = store.claim_gated_step("r", "_ask", owner="o", lease=30.0)
    assert again is not None and again.claim is not None, again
    assert db.execute("SELECT count(*), sum(units) FROM saga_rate_grants").fetchone() == (1, 1)
    assert db.execute("SELECT gate, state FROM saga_gate_slots").fetchall() == []


def test_a_cancelled_run_leaves_the_line_of_its_runs_gate(db: Conn) -> None:
    """A run waiting in line for its run-level slot is cancelled: its step's place in line goes
    with it (not left to a later hand-over, a phantom waiter meanwhile)."""
    _run(db, "r1", "running", "running")  # holds the slot
    _run(db, "r2", "running", "throttled")  # waits for it
    db.execute("INSERT INTO saga_gates (gate, kind, lim) VALUES ('c:z:', 'concurrency', 1)")
    db.execute(
        "INSERT INTO saga_gate_slots (gate, run_id, step_key, state, run_level) VALUES "
        "('c:z:', 'r1', '', 'held', true), ('c:z:', 'r2', 's', 'waiting', true)"
    )
    # r2 cancelled: its open steps cancelled, then its slots and places given back.
    db.execute("UPDATE saga_runs SET state = 'cancelled' WHERE run_id = 'r2'")
    db.execute("UPDATE saga_steps SET state = 'cancelled' WHERE run_id = 'r2'")
    db.execute("SELECT * FROM saga_gate_release('r2', NULL, 30)").fetchall()
    assert db.execute("SELECT run_id, state FROM saga_gate_slots").fetchall() == [("r1", "held")]
