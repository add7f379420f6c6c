"""Migration 0007's roles: who owns and may do what, now and for tables later migrations make."""

from __future__ import annotations

from typing import Any

import psycopg
import pytest
from psycopg.conninfo import make_conninfo

from saga import migrate as migrate_module
from saga.errors import MigrationError
from saga.migrate import Migration, available_migrations, migrate
from saga.queries import ACT_AS_MIGRATOR

Conn = psycopg.Connection[Any]

ENGINE_WRITES = "SELECT,INSERT,UPDATE,DELETE"


def saga_relations(conn: Conn, kinds: str) -> list[tuple[str, str]]:
    """(name, owner) of the saga_* relations of the given pg_class kinds."""
    rows = conn.execute(
        "SELECT c.relname, pg_get_userbyid(c.relowner) FROM pg_class c "
        "WHERE c.relnamespace = current_schema()::regnamespace AND c.relname LIKE 'saga\\_%%' "
        "AND c.relkind = ANY(%s) ORDER BY 1",
        (list(kinds),),
    ).fetchall()
    return [(str(r[0]), str(r[1])) for r in rows]


def test_every_table_sequence_and_function_is_the_migrators_and_granted(db: Conn) -> None:
    tables = saga_relations(db, "rp")
    assert len(tables) >= 6
    for name, owner in tables:
        assert owner == "saga_migrator", name
        engine = db.execute(
            "SELECT has_table_privilege('saga_engine', %s, %s)",
            (name, "SELECT" if name == "saga_schema_migrations" else ENGINE_WRITES),
        ).fetchone()
        assert engine == (True,), name
        assert db.execute(
            "SELECT has_table_privilege('saga_readonly', %s, 'SELECT'), "
            "has_table_privilege('saga_readonly', %s, 'INSERT,UPDATE,DELETE,TRUNCATE')",
            (name, name),
        ).fetchone() == (True, False), name
        # Never more than the engine needs: no TRUNCATE, no DDL through ownership.
        assert db.execute(
            "SELECT has_table_privilege('saga_engine', %s, 'TRUNCATE,REFERENCES,TRIGGER')",
            (name,),
        ).fetchone() == (False,), name
    assert db.execute(
        "SELECT has_table_privilege('saga_engine', 'saga_schema_migrations', "
        "'INSERT,UPDATE,DELETE')"
    ).fetchone() == (False,)
    for name, owner in saga_relations(db, "S"):
        assert owner == "saga_migrator"
        assert db.execute(
            "SELECT has_sequence_privilege('saga_engine', %s, 'USAGE')", (name,)
        ).fetchone() == (True,)
    functions = db.execute(
        "SELECT p.oid::regprocedure::text, pg_get_userbyid(p.proowner), "
        "has_function_privilege('saga_engine', p.oid, 'EXECUTE') FROM pg_proc p "
        "WHERE p.pronamespace = current_schema()::regnamespace AND p.proname LIKE 'saga\\_%%'"
    ).fetchall()
    assert functions and all(owner == "saga_migrator" and ok for _, owner, ok in functions)
    # Only the engine's objects: a table of the test suite's own shares the schema, no grant.
    assert db.execute(
        "SELECT has_table_privilege('saga_engine', 'test_calls', 'SELECT')"
    ).fetchone() == (False,)


def test_a_table_a_later_migration_creates_is_granted_by_default(db: Conn) -> None:
    """The rule for migration authors, as saga.migrate applies migrations after 0007."""
    with db.transaction():
        assert db.execute(ACT_AS_MIGRATOR).fetchone() == ("saga_migrator",)
        db.execute("CREATE TABLE saga_future (id bigserial PRIMARY KEY, note text)")
    assert ("saga_future", "saga_migrator") in saga_relations(db, "r")
    assert db.execute(
        "SELECT has_table_privilege('saga_engine', 'saga_future', %s), "
        "has_table_privilege('saga_readonly', 'saga_future', 'SELECT'), "
        "has_table_privilege('saga_readonly', 'saga_future', 'INSERT'), "
        "has_sequence_privilege('saga_engine', 'saga_future_id_seq', 'USAGE')",
        (ENGINE_WRITES,),
    ).fetchone() == (True, True, False, True)


def test_a_later_migration_runs_as_the_migrator_for_a_member_of_it(
    admin_conn: Conn, empty_database_url: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A login user that is only a member of saga_migrator (no superuser, no CREATEROLE)
    applies a migration after 0007 to a database a superuser migrated; what it creates is the
    migrator's and granted to the engine. A member of saga_engine cannot migrate."""
    assert migrate(empty_database_url)
    shipped = available_migrations()
    future = Migration(len(shipped) + 1, "future", "CREATE TABLE saga_later (id int);")
    monkeypatch.setattr(migrate_module, "available_migrations", lambda: [*shipped, future])
    for name, role in (
        ("saga_test_migrator", "saga_migrator"),
        ("saga_test_engine", "saga_engine"),
    ):
        admin_conn.execute(
            f"DO $$ BEGIN CREATE ROLE {name} LOGIN; "
            f"EXCEPTION WHEN duplicate_object OR unique_violation THEN NULL; END $$"
        )
        admin_conn.execute(f"GRANT {role} TO {name}")
    with pytest.raises(MigrationError, match="permission denied"):
        migrate(make_conninfo(empty_database_url, user="saga_test_engine"))
    assert migrate(make_conninfo(empty_database_url, user="saga_test_migrator")) == [future.version]
    with psycopg.connect(empty_database_url, autocommit=True) as conn:
        assert ("saga_later", "saga_migrator") in saga_relations(conn, "r")
        assert conn.execute(
            "SELECT has_table_privilege('saga_engine', 'saga_later', %s)", (ENGINE_WRITES,)
        ).fetchone() == (True,)
