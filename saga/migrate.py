"""Applies the versioned SQL files in ``saga/migrations`` in order, each exactly once.

Safe when several processes migrate at once: each file runs in its own transaction under a
transaction-level advisory lock, and the version table is read again after the lock is taken.
"""

from __future__ import annotations

import hashlib
import re
from dataclasses import dataclass
from importlib import resources
from typing import Any

import psycopg
from psycopg.rows import dict_row

from saga import queries as q
from saga.errors import MigrationError

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
