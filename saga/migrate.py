"""Applies the versioned SQL files in ``saga/migrations`` in order, each exactly once.

Safe when several processes migrate at once: each file runs in its own transaction under a
transaction-level advisory lock, and the version table is read again after the lock is taken.
"""

from __future__ import annotations

import hashlib
import logging
import re
import time
from dataclasses import dataclass
from importlib import resources
from typing import Any

import psycopg
from psycopg.rows import dict_row

from saga import queries as q
from saga.errors import MigrationError

ROLES_MIGRATION = 7  # creates saga_migrator, which runs every later migration (see 0007)
_FILE_NAME = re.compile(r"^(\d{4})_([a-z0-9_]+)\.sql$")


@dataclass(frozen=True)
class Migration:
    version: int
    name: str
    sql: str

    @property
    def checksum(self) -> str:
        return hashlib.sha256(self.sql.encode()).hexdigest()


def available_migrations() -> list[Migration]:
    """Every migration shipped with the package, in version order."""
    found = []
    for entry in resources.files("saga.migrations").iterdir():
        match = _FILE_NAME.match(entry.name)
        if match:
            found.append(Migration(int(match[1]), match[2], entry.read_text(encoding="utf-8")))
    found.sort(key=lambda m: m.version)
    versions = [m.version for m in found]
    if versions != list(range(1, len(found) + 1)):
        raise MigrationError(f"migration versions must run 1..n without gaps, found {versions}")
    return found


def applied_checksums(conn: psycopg.Connection[Any]) -> dict[int, str]:
    with conn.cursor(row_factory=dict_row) as cur:
        row = cur.execute(q.VERSION_TABLE_EXISTS).fetchone()
        if not row or not row["present"]:
            return {}
        rows = cur.execute(q.SELECT_APPLIED_MIGRATIONS).fetchall()
        return {int(r["version"]): str(r["checksum"]) for r in rows}


def applied_versions(conn: psycopg.Connection[Any]) -> set[int]:
    return set(applied_checksums(conn))


def _check_unchanged(migration: Migration, applied: dict[int, str]) -> None:
    recorded = applied.get(migration.version)
    if recorded is not None and recorded != migration.checksum:
        raise MigrationError(
            f"migration {migration.version:04d}_{migration.name} changed after it was applied to "
            f"this database; applied migrations are immutable: put the change in a new "
            f"migration (or, for a throwaway database, recreate it)"
        )


def migrate(database_url: str) -> list[int]:
    """Bring the schema up to date; returns the versions this call applied."""
    applied: list[int] = []
    current = 0
    try:
        with psycopg.connect(database_url, autocommit=True) as conn:
            conn.execute(q.LOCK_MIGRATING_SESSION, (q.MIGRATION_LOCK_KEY,))  # released on close
            for migration in available_migrations():
                current = migration.version
                with conn.transaction():
                    conn.execute(q.LOCK_MIGRATIONS, (q.MIGRATION_LOCK_KEY,))
                    conn.execute(q.CREATE_VERSION_TABLE)
                    done = applied_checksums(conn)
                    _check_unchanged(migration, done)
                    if migration.version in done:
                        continue
                    if migration.version > ROLES_MIGRATION:
                        conn.execute(q.ACT_AS_MIGRATOR)
                    conn.execute(migration.sql.encode())
                    conn.execute(
                        q.RECORD_MIGRATION,
                        (migration.version, migration.name, migration.checksum),
                    )
                    applied.append(migration.version)
    except psycopg.Error as exc:
        raise MigrationError(f"migrating the database failed at version {current}: {exc}") from exc
    return applied


def check_schema(conn: psycopg.Connection[Any]) -> None:
    """Raise a clear error when the database is behind this package's migrations."""
    done = applied_checksums(conn)
    for migration in available_migrations():
        _check_unchanged(migration, done)
    missing = {m.version for m in available_migrations()} - set(done)
    if missing:
        raise MigrationError(
            f"the database schema lacks migrations {sorted(missing)}: run `saga migrate` first"
        )


def require_schema(database_url: str | None) -> None:
    """Refuse to start on a database behind this code's migrations: every outcome would fail
    after its step had run."""
    assert database_url, "resolve() fills it"
    # Postgres restarting or not up yet is waited for, as a broker that is down is; anything
    # else (a refused login, a missing database, a schema behind) stops the process at once.
    delay, deadline = 0.5, time.monotonic() + WAIT_FOR_POSTGRES
    while True:
        try:
            with psycopg.connect(database_url, autocommit=True, connect_timeout=5) as conn:
                check_schema(conn)
            return
        except psycopg.OperationalError as exc:
            if not still_starting(exc) or time.monotonic() + delay > deadline:
                raise MigrationError(f"cannot check the database schema: {exc}") from exc
            logging.getLogger("saga").warning("Postgres does not answer yet (%s); waiting", exc)
            time.sleep(delay)
            delay = min(delay * 2, 5.0)
        except psycopg.Error as exc:
            raise MigrationError(f"cannot check the database schema: {exc}") from exc


WAIT_FOR_POSTGRES = 120.0  # seconds a starting worker or relay waits for Postgres to answer


def still_starting(exc: Exception) -> bool:
    """A connection refused, or a server starting up or shutting down: it may answer soon."""
    if getattr(exc, "sqlstate", None) == "57P03":  # cannot_connect_now
        return True
    text = str(exc)
    return any(
        hint in text
        for hint in (
            "Connection refused",
            "No such file or directory",  # its Unix socket is not there yet
            "the database system is starting up",
            "the database system is shutting down",
            "the database system is in recovery mode",
            "server closed the connection unexpectedly",
            "timeout expired",
        )
    )
