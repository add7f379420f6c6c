"""Retention on a real Postgres: what is deleted (per state, with its steps and events), what is
never deleted (unfinished runs, runs someone holds), and pruning beside a running worker."""

from __future__ import annotations

import threading
from collections import Counter
from typing import Any

import psycopg
import pytest

from saga.client import SagaClient
from saga.messages import advance_message
from saga.retention import Pruner
from saga.settings import Settings
from saga.states import RunState
from saga.workers.app import create_app
from saga.workers.publish import CeleryPublisher
from tests import sagas
from tests.processes import ProcessGroup, wait_until

Conn = psycopg.Connection[Any]
HOUR = 3600.0


def add_run(db: Conn, run_id: str, state: str, finished_ago: float | None, steps: int = 3) -> None:
    """A run with ``steps`` steps and one event, finished ``finished_ago`` seconds ago."""
    db.execute(
        "INSERT INTO saga_runs (run_id, saga_name, saga_ref, saga_version, state, input, "
        "finished_at) VALUES (%s, 'r', 'tests.sagas:ten', '1', %s, '{}', "
        "now() - %s * interval '1 second')",
        (run_id, state, finished_ago),
    )
    for i in range(1, steps + 1):
        db.execute(
            "INSERT INTO saga_steps (run_id, step_key, step_name, seq, state, max_attempts, "
            "idempotency_key) VALUES (%s, %s, %s, %s, 'completed', 1, %s)",
            (run_id, f"s{i}", f"s{i}", i, f"{run_id}:s{i}"),
        )
    db.execute("INSERT INTO saga_events (run_id, name) VALUES (%s, 'ev')", (run_id,))


def run_ids(db: Conn) -> set[str]:
    return {r[0] for r in db.execute("SELECT run_id FROM saga_runs").fetchall()}


def steps_by_run(db: Conn) -> Counter[str]:
    return Counter(r[0] for r in db.execute("SELECT run_id FROM saga_steps").fetchall())


def events_by_run(db: Conn) -> Counter[str]:
    return Counter(r[0] for r in db.execute("SELECT run_id FROM saga_events").fetchall())


POLICY = {
    RunState.COMPLETED: HOUR,
    RunState.FAILED: 24 * HOUR,
    RunState.CANCELLED: 0.0,
    # compensated and compensation_failed: unset, kept forever
}


@pytest.fixture
def journal(db: Conn) -> dict[str, bool]:
    """Runs of every state and age; True for those POLICY deletes."""
    expected = {
        "completed-old": ("completed", 2 * HOUR, True),
        "completed-young": ("completed", 0.5 * HOUR, False),
        "failed-old": ("failed", 25 * HOUR, True),
        "failed-young": ("failed", 2 * HOUR, False),
        "cancelled-now": ("cancelled", 1.0, True),
        "compensated-ancient": ("compensated", 1000 * HOUR, False),
        "compensation-failed-ancient": ("compensation_failed", 1000 * HOUR, False),
    }
    for run_id, (state, age, _) in expected.items():
        add_run(db, run_id, state, age)
    # Unfinished runs never have finished_at; these have an old one anyway, to show the state
    # alone keeps them.
    add_run(db, "running-old", "running", 1000 * HOUR)
    add_run(db, "compensating-old", "compensating", 1000 * HOUR)
    add_run(db, "running-new", "running", None)
    return {
        **{run_id: doomed for run_id, (_, _, doomed) in expected.items()},
        "running-old": False,
        "compensating-old": False,
        "running-new": False,
    }


def test_prune_deletes_each_state_after_its_own_retention_with_steps_and_events(
    database_url: str, db: Conn, journal: dict[str, bool]
) -> None:
    pruner = Pruner(database_url, POLICY, batch_size=1)  # several batches per state
    try:
        report = pruner.prune()
    finally:
        pruner.close()
    kept = {run_id for run_id, doomed in journal.items() if not doomed}
    assert run_ids(db) == kept
    assert report.runs == {"completed": 1, "failed": 1, "cancelled": 1}
    assert set(steps_by_run(db)) == kept, "steps go with their run, and only then"
    assert all(n == 3 for n in steps_by_run(db).values())
    assert set(events_by_run(db)) == kept


def test_dry_run_counts_without_deleting(
    database_url: str, db: Conn, journal: dict[str, bool]
) -> None:
    pruner = Pruner(database_url, POLICY)
    try:
        report = pruner.count()
    finally:
        pruner.close()
    assert report.dry_run
    assert report.runs == {"completed": 1, "failed": 1, "cancelled": 1}
    assert report.steps == {"completed": 3, "failed": 3, "cancelled": 3}
    assert run_ids(db) == set(journal)
    assert sum(steps_by_run(db).values()) == 3 * len(journal)


def test_unfinished_states_cannot_be_given_a_retention(database_url: str) -> None:
    with pytest.raises(ValueError, match="not finished"):
        Pruner(database_url, {RunState.RUNNING: 0.0})


def test_a_run_someone_holds_is_skipped_not_waited_for_and_kept_once_retried(
    database_url: str, db: Conn
) -> None:
    add_run(db, "held", "failed", 2 * HOUR)
    add_run(db, "free", "failed", 2 * HOUR)
    pruner = Pruner(database_url, {RunState.FAILED: HOUR})
    try:
        # An operator's retry holds the run's lock (LOCK_RUN) while it reopens the run.
        with psycopg.connect(database_url) as operator:
            operator.execute("SELECT 1 FROM saga_runs WHERE run_id = 'held' FOR UPDATE")
            report = pruner.prune()  # returns at once: the held run is skipped
            assert report.runs == {"failed": 1}
            assert run_ids(db) == {"held"}
            operator.execute(
                "UPDATE saga_runs SET state = 'running', finished_at = NULL WHERE run_id = 'held'"
            )
        assert pruner.prune().runs == {}, "a retried run is running again: kept"
        assert run_ids(db) == {"held"}
    finally:
        pruner.close()


AUDIT = """
CREATE TABLE test_pruned (run_id text, state text, finished_at timestamptz);
CREATE FUNCTION test_audit_prune() RETURNS trigger LANGUAGE plpgsql AS $$
BEGIN
    INSERT INTO test_pruned VALUES (OLD.run_id, OLD.state, OLD.finished_at);
    RETURN OLD;
END;
$$;
CREATE TRIGGER test_audit_prune BEFORE DELETE ON saga_runs
    FOR EACH ROW EXECUTE FUNCTION test_audit_prune();
"""


def test_pruning_beside_a_busy_worker_touches_nothing_unfinished(
    settings: Settings, procs: ProcessGroup, db: Conn, database_url: str
) -> None:
    """Retention 0 for completed and failed runs: the relay (and, for failed runs, a second
    pruner here) delete runs as soon as they finish, while a worker runs the others. Every run
    still runs each step to its end, every deleted row was finished, and the worker logs no
    error."""
    db.execute(AUDIT)
    settings = settings.model_copy(
        update={
            "retention_completed_seconds": 0.0,
            "retention_failed_seconds": 0.0,
            "retention_interval_seconds": 0.2,
            "retention_batch_size": 3,
        }
    )
    procs.relay(settings)
    worker = procs.worker(settings, "w1")
    done = threading.Event()
    other = Pruner(database_url, {RunState.FAILED: 0.0}, batch_size=2)

    def prune_beside() -> None:
        while not done.is_set():
            other.prune()
            done.wait(0.05)

    beside = threading.Thread(target=prune_beside)
    beside.start()
    try:
        with SagaClient(settings) as client:
            good = [client.start(sagas.ten, {"n": i}) for i in range(12)]
            bad = [client.start(sagas.ten, {"fail_at": [3], "fail_times": 99}) for _ in range(3)]
        started = set(good) | set(bad)
        wait_until(
            lambda: db.execute("SELECT count(*) FROM test_pruned").fetchone() == (len(started),),
            120,
            "every run to finish and be pruned",
        )
    finally:
        done.set()
        beside.join()
        other.close()
    pruned = db.execute("SELECT run_id, state, finished_at FROM test_pruned").fetchall()
    assert sorted(r[0] for r in pruned) == sorted(started), "each run deleted once"
    assert {r[1] for r in pruned} <= {RunState.COMPLETED.value, RunState.FAILED.value}
    assert all(r[2] is not None for r in pruned)
    for run_id in good:  # no run was cut short: every step ran, once
        assert sagas.calls(db, run_id) == Counter({f"step{k}": 1 for k in range(1, 11)})
    for run_id in bad:
        assert sagas.calls(db, run_id) == Counter({"step1": 1, "step2": 1, "step3": 4})
    assert run_ids(db) == set()
    assert db.execute("SELECT count(*) FROM saga_steps").fetchone() == (0,)
    assert worker.alive()
    log = worker.log()
    assert "Traceback" not in log and " ERROR" not in log, log[-3000:]
    assert "pruned" in procs.processes[0].log(), "completed runs are the relay's to prune"


def test_a_late_advance_for_a_deleted_run_is_dropped(
    settings: Settings, procs: ProcessGroup
) -> None:
    worker = procs.worker(settings, "w1")
    app = create_app(settings)
    CeleryPublisher(app).publish([advance_message(settings.queue, "pruned-run", {})])
    wait_until(lambda: "which does not exist; dropped" in worker.log(), 60, "the drop")
    assert worker.alive()
    assert "Traceback" not in worker.log()
