"""Schema migrations against a real Postgres: apply once, concurrently safe, expected schema."""

from __future__ import annotations

import json
import os
import re
import subprocess
import sys
import uuid
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import psycopg
import pytest
from psycopg.conninfo import make_conninfo

import saga.migrate
import saga.queries
from saga.errors import MigrationError
from saga.migrate import (
    Migration,
    applied_versions,
    available_migrations,
    check_schema,
    migrate,
)
from saga.run_transaction import TRANSITION_REFUSED
from saga.states import RunState, StepKind, StepState

Conn = psycopg.Connection[Any]

EXPECTED_TABLES = {
    "saga_runs",
    "saga_steps",
    "saga_events",
    "saga_outbox",
    "saga_schema_migrations",
    "saga_attempts",
    "saga_run_events",
}
RUN_STATES = [
    "running",
    "compensating",
    "completed",
    "compensated",
    "failed",
    "compensation_failed",
    "cancelled",
]
STEP_STATES = [
    "pending",
    "dispatched",
    "running",
    "waiting",
    "completed",
    "failed",
    "cancelled",
    "throttled",
]
STEP_KINDS = ["action", "compensation", "timer", "event"]
ROOT = Path(__file__).resolve().parents[2]


def all_versions() -> list[int]:
    return [m.version for m in available_migrations()]


def tables(conn: Conn) -> set[str]:
    rows = conn.execute(
        "SELECT tablename FROM pg_tables WHERE schemaname = current_schema()"
    ).fetchall()
    return {r[0] for r in rows}


def recorded(conn: Conn) -> list[tuple[int, str]]:
    return [
        (r[0], r[1])
        for r in conn.execute(
            "SELECT version, name FROM saga_schema_migrations ORDER BY version"
        ).fetchall()
    ]


def insert_run(conn: Conn, run_id: str, state: str = "running") -> None:
    conn.execute(
        "INSERT INTO saga_runs (run_id, saga_name, saga_ref, saga_version, state, input) "
        "VALUES (%s, 'ten', 'tests.sagas:ten', '1', %s, '{}')",
        (run_id, state),
    )


# --- the shipped files -------------------------------------------------------------------------


def test_available_migrations_are_numbered_from_one() -> None:
    migrations = available_migrations()
    assert migrations, "the package ships no migrations"
    assert [m.version for m in migrations] == list(range(1, len(migrations) + 1))
    assert migrations[0].name == "initial"
    assert "CREATE TABLE saga_runs" in migrations[0].sql


def test_a_gap_in_migration_versions_is_refused(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    (tmp_path / "0001_initial.sql").write_text("SELECT 1;", encoding="utf-8")
    (tmp_path / "0003_later.sql").write_text("SELECT 3;", encoding="utf-8")
    (tmp_path / "README.txt").write_text("ignored", encoding="utf-8")
    monkeypatch.setattr(saga.migrate.resources, "files", lambda package: tmp_path)
    with pytest.raises(MigrationError, match=r"without gaps, found \[1, 3\]"):
        available_migrations()


# --- migrate / check_schema --------------------------------------------------------------------


def test_migrate_an_empty_database_then_nothing_to_do(empty_database_url: str) -> None:
    with psycopg.connect(empty_database_url, autocommit=True) as conn:
        assert applied_versions(conn) == set()
        assert not EXPECTED_TABLES & tables(conn)
        # Before migrating: a clear error that says what to do.
        with pytest.raises(MigrationError) as info:
            check_schema(conn)
        assert "`saga migrate`" in str(info.value)
        assert str(all_versions()) in str(info.value)

    assert migrate(empty_database_url) == all_versions()
    assert all_versions()[0] == 1

    with psycopg.connect(empty_database_url, autocommit=True) as conn:
        assert recorded(conn) == [(m.version, m.name) for m in available_migrations()]
        assert applied_versions(conn) == set(all_versions())
        assert tables(conn) >= EXPECTED_TABLES
        check_schema(conn)

    assert migrate(empty_database_url) == []
    with psycopg.connect(empty_database_url, autocommit=True) as conn:
        assert len(recorded(conn)) == len(all_versions())


def test_check_schema_on_a_partly_migrated_database(database_url: str) -> None:
    with psycopg.connect(database_url, autocommit=True) as conn:
        check_schema(conn)
        conn.execute("DELETE FROM saga_schema_migrations WHERE version = 1")
        with pytest.raises(MigrationError, match=r"lacks migrations \[1\].*`saga migrate`"):
            check_schema(conn)


def test_migrate_of_an_unreachable_database_is_a_migration_error(admin_conn: Conn) -> None:
    missing = make_conninfo(
        admin_conn.info.dsn, dbname=f"saga_missing_{uuid.uuid4().hex[:10]}", connect_timeout=5
    )
    with pytest.raises(MigrationError, match="migrating the database failed") as info:
        migrate(missing)
    assert isinstance(info.value.__cause__, psycopg.Error)


def test_a_failing_migration_rolls_back_and_records_nothing(
    database_url: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    shipped = available_migrations()
    version = len(shipped) + 1
    broken = Migration(
        version, "broken", "CREATE TABLE half_done (id int); SELECT no_such_function();"
    )
    monkeypatch.setattr(saga.migrate, "available_migrations", lambda: [*shipped, broken])
    with pytest.raises(MigrationError, match="no_such_function"):
        migrate(database_url)
    with psycopg.connect(database_url, autocommit=True) as conn:
        assert version not in applied_versions(conn)
        assert "half_done" not in tables(conn)


def test_a_failing_migration_is_named_by_its_version(
    database_url: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    shipped = available_migrations()
    broken = Migration(len(shipped) + 1, "broken", "SELECT no_such_function();")
    monkeypatch.setattr(saga.migrate, "available_migrations", lambda: [*shipped, broken])
    # The database has every shipped version already: the failure is the new one's, and says so.
    with pytest.raises(MigrationError, match=f"at version {len(shipped) + 1}"):
        migrate(database_url)


# --- concurrency -------------------------------------------------------------------------------

# Each child imports first, then waits for the parent's go line on stdin, so all six call
# migrate() at the same moment rather than staggered by interpreter start-up.
CHILD = """
import json, sys
from saga.migrate import migrate
url = sys.argv[1]
sys.stdout.write("ready\\n"); sys.stdout.flush()
sys.stdin.readline()
print(json.dumps(migrate(url)))
"""


def test_six_processes_migrating_at_once(empty_database_url: str) -> None:
    children = [
        subprocess.Popen(
            [sys.executable, "-c", CHILD, empty_database_url],
            stdin=subprocess.PIPE,
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            text=True,
            cwd=ROOT,
        )
        for _ in range(6)
    ]
    try:
        for child in children:
            assert child.stdout is not None
            assert child.stdout.readline().strip() == "ready"
        for child in children:
            assert child.stdin is not None
            child.stdin.write("go\n")
            child.stdin.flush()
        outcomes = [child.communicate(timeout=60) for child in children]
    finally:
        for child in children:
            if child.poll() is None:
                child.kill()
                child.wait()

    for child, (_, err) in zip(children, outcomes, strict=True):
        assert child.returncode == 0, err
    applied = [json.loads(out.strip().splitlines()[-1]) for out, _ in outcomes]
    # Each version applied by exactly one process. Which process applies which is not fixed:
    # the lock is taken per file, so with many files another process may take the next one.
    flat = sorted(v for versions in applied for v in versions)
    assert flat == all_versions()
    for versions in applied:  # each process in order, without skipping one it needed
        assert versions == sorted(versions)

    with psycopg.connect(empty_database_url, autocommit=True) as conn:
        assert recorded(conn) == [(m.version, m.name) for m in available_migrations()]
        counts = conn.execute(
            "SELECT version, count(*) FROM saga_schema_migrations GROUP BY version"
        ).fetchall()
        assert all(c == 1 for _, c in counts)
        assert tables(conn) >= EXPECTED_TABLES
        check_schema(conn)


# --- the resulting schema ----------------------------------------------------------------------


@pytest.fixture(scope="module")
def schema_url(admin_conn: Conn, template_db: str) -> Iterator[str]:
    """One clone of the migrated template for this section's tests (each uses its own rows)."""
    name = f"saga_schema_{uuid.uuid4().hex[:10]}"
    admin_conn.execute(f'CREATE DATABASE "{name}" TEMPLATE "{template_db}"')
    password = admin_conn.info.password  # info.dsn leaves the password out
    yield make_conninfo(
        admin_conn.info.dsn, dbname=name, **({"password": password} if password else {})
    )
    admin_conn.execute(f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)')


@pytest.fixture
def schema(schema_url: str) -> Iterator[Conn]:
    with psycopg.connect(schema_url, autocommit=True) as conn:
        yield conn


def new_id() -> str:
    return f"r-{uuid.uuid4().hex[:12]}"


def test_expected_tables_and_sequence(schema: Conn) -> None:
    assert tables(schema) >= EXPECTED_TABLES
    seq = schema.execute("SELECT to_regclass('saga_completion_seq')").fetchone()
    assert seq is not None and seq[0] is not None
    check_schema(schema)


def test_notify_triggers_exist(schema: Conn) -> None:
    rows = schema.execute(
        "SELECT tgname, tgrelid::regclass::text FROM pg_trigger WHERE NOT tgisinternal"
    ).fetchall()
    triggers = {(name, table) for name, table in rows}
    assert ("saga_outbox_notify", "saga_outbox") in triggers
    assert ("saga_run_finished_notify", "saga_runs") in triggers


def test_run_finished_trigger_notifies_on_final_states_only(schema_url: str, schema: Conn) -> None:
    run_id = new_id()
    with psycopg.connect(schema_url, autocommit=True) as listener:
        listener.execute("LISTEN saga_run_finished")
        insert_run(schema, run_id)
        # Not final: no notification. A marker sent afterwards must arrive first.
        schema.execute("UPDATE saga_runs SET state = 'compensating' WHERE run_id = %s", (run_id,))
        schema.execute("NOTIFY saga_run_finished, 'marker'")
        schema.execute("UPDATE saga_runs SET state = 'compensated' WHERE run_id = %s", (run_id,))
        got = [n.payload for n in listener.notifies(timeout=10, stop_after=2)]
    assert got == ["marker", run_id]


def test_outbox_trigger_notifies_only_rows_ready_now(schema_url: str, schema: Conn) -> None:
    def insert(delay_seconds: float) -> None:
        schema.execute(
            "INSERT INTO saga_outbox (message_id, destination, task_name, payload, available_at) "
            "VALUES (%s, 'saga', 'saga.step', '{}', now() + make_interval(secs => %s))",
            (uuid.uuid4(), delay_seconds),
        )

    with psycopg.connect(schema_url, autocommit=True) as listener:
        listener.execute("LISTEN saga_outbox")
        insert(60)  # left for a worker's fast path: not announced
        schema.execute("NOTIFY saga_outbox, 'marker'")
        insert(0)
        got = [n.payload for n in listener.notifies(timeout=10, stop_after=2)]
    assert got == ["marker", ""]


def test_run_state_check_rejects_an_unknown_state(schema: Conn) -> None:
    with pytest.raises(psycopg.errors.CheckViolation):
        insert_run(schema, new_id(), state="bogus")
    run_id = new_id()
    insert_run(schema, run_id)
    with pytest.raises(psycopg.errors.CheckViolation):
        schema.execute("UPDATE saga_runs SET state = 'bogus' WHERE run_id = %s", (run_id,))


def test_run_state_check_accepts_every_documented_state(schema: Conn) -> None:
    for state in RUN_STATES:
        insert_run(schema, new_id(), state=state)


def insert_step(conn: Conn, run_id: str, **values: object) -> None:
    row: dict[str, object] = {
        "run_id": run_id,
        "step_key": f"s-{uuid.uuid4().hex[:8]}",
        "state": "pending",
        "kind": "action",
        "attempt": 0,
        "max_attempts": 3,
        **values,
    }
    conn.execute(
        "INSERT INTO saga_steps (run_id, step_key, step_name, seq, idempotency_key, "
        "state, kind, attempt, max_attempts) "
        "VALUES (%(run_id)s, %(step_key)s, %(step_key)s, "
        "(SELECT count(*) FROM saga_steps WHERE run_id = %(run_id)s), "
        "%(run_id)s || ':' || %(step_key)s, %(state)s, %(kind)s, %(attempt)s, %(max_attempts)s)",
        row,
    )


def test_step_checks_accept_every_documented_state_and_kind(schema: Conn) -> None:
    run_id = new_id()
    insert_run(schema, run_id)
    for state in STEP_STATES:
        insert_step(schema, run_id, state=state)
    for kind in STEP_KINDS:
        insert_step(schema, run_id, kind=kind)


@pytest.mark.parametrize(
    ("column", "value"),
    [("state", "bogus"), ("kind", "bogus"), ("attempt", -1), ("max_attempts", 0)],
)
def test_step_checks_reject_bad_values(schema: Conn, column: str, value: object) -> None:
    run_id = new_id()
    insert_run(schema, run_id)
    with pytest.raises(psycopg.errors.CheckViolation):
        insert_step(schema, run_id, **{column: value})


def test_an_applied_migration_that_changed_is_refused(empty_database_url: str) -> None:
    migrate(empty_database_url)
    with psycopg.connect(empty_database_url, autocommit=True) as conn:
        conn.execute("UPDATE saga_schema_migrations SET checksum = 'edited' WHERE version = 1")
        with pytest.raises(MigrationError, match="changed after it was applied"):
            check_schema(conn)
    with pytest.raises(MigrationError, match="0001_initial changed after it was applied"):
        migrate(empty_database_url)


@pytest.mark.parametrize("command", ["worker", "relay"])
def test_worker_and_relay_refuse_a_database_behind_the_code(
    empty_database_url: str, command: str
) -> None:
    migrate(empty_database_url)
    with psycopg.connect(empty_database_url, autocommit=True) as conn:
        last = max(applied_versions(conn))
        conn.execute("DELETE FROM saga_schema_migrations WHERE version = %s", (last,))
    env = {
        **{k: v for k, v in os.environ.items() if not k.startswith("SAGA_")},
        "SAGA_DATABASE_URL": empty_database_url,
        "SAGA_BROKER_URL": "redis://127.0.0.1:1/0",  # never reached: the check comes first
    }
    done = subprocess.run(
        [sys.executable, "-m", "saga", command],
        env=env,
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert done.returncode == 2, done.stderr
    assert f"lacks migrations [{last}]: run `saga migrate` first" in done.stderr


def check_values(conn: Conn, table: str, column: str) -> set[str]:
    """The values a CHECK (column IN (...)) constraint allows, as Postgres holds it."""
    rows = conn.execute(
        "SELECT pg_get_constraintdef(oid) FROM pg_constraint "
        "WHERE conrelid = %s::regclass AND contype = 'c'",
        (table,),
    ).fetchall()
    defs = [d for (d,) in rows if f"({column} = ANY" in d or f"(({column} = ANY" in d]
    assert len(defs) == 1, f"one CHECK on {table}.{column}, found {defs}"
    return set(re.findall(r"'([a-z_]+)'::text", defs[0]))


def test_check_constraints_are_the_state_enums(schema: Conn) -> None:
    assert check_values(schema, "saga_runs", "state") == set(RunState)
    assert check_values(schema, "saga_steps", "state") == set(StepState)
    assert check_values(schema, "saga_steps", "kind") == set(StepKind)
    assert set(RUN_STATES) == set(RunState) and set(STEP_STATES) == set(StepState)
    assert set(STEP_KINDS) == set(StepKind)


def test_a_refused_run_transition_raises_its_own_sqlstate(schema: Conn) -> None:
    run_id = new_id()
    insert_run(schema, run_id, state="completed")
    with pytest.raises(psycopg.Error) as info:
        schema.execute(
            saga.queries.FINISH_RUN,
            {"run_id": run_id, "state": "failed", "result": None, "error": None},
        )
    assert info.value.sqlstate == TRANSITION_REFUSED
    assert (
        info.value.diag.message_primary == f"run '{run_id}' is completed; it cannot become failed"
    )
    missing = new_id()
    with pytest.raises(psycopg.Error, match=f"run '{missing}' is missing"):
        schema.execute(saga.queries.BEGIN_COMPENSATION, {"run_id": missing, "error": None})
