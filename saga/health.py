"""Readiness: Postgres answers, its schema is this code's, the broker answers.

Used by ``saga health`` (an exec probe) and by the ``/readyz`` endpoint of workers and relays.
Each check opens a connection of its own with a short timeout, so a probe never waits on (or
takes from) the pools the engine works with.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass
from typing import Any

import psycopg

from saga.errors import MigrationError

TIMEOUT_SECONDS = 3.0


@dataclass(frozen=True)
class Check:
    name: str  # "postgres", "schema" or "broker"
    ok: bool
    detail: str


def check_database(database_url: str | None, timeout: float = TIMEOUT_SECONDS) -> list[Check]:
    """Postgres answers, and its schema has every migration of this package, unchanged."""
    from saga.migrate import check_schema

    if not database_url:
        return [Check("postgres", False, "SAGA_DATABASE_URL is not set")]
    try:
        with psycopg.connect(
            database_url,
            autocommit=True,
            connect_timeout=max(1, round(timeout)),
            application_name="saga-health",
            # A server that stops answering mid-check fails it, instead of hanging the probe
            # (a client-side option: poolers such as PgBouncer never see it).
            tcp_user_timeout=int(timeout * 1000),
        ) as conn:
            try:
                check_schema(conn)
            except MigrationError as exc:
                return [Check("postgres", True, "answers"), Check("schema", False, str(exc))]
    except psycopg.Error as exc:
        first_line = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
        return [Check("postgres", False, f"Postgres does not answer: {first_line}")]
    return [Check("postgres", True, "answers"), Check("schema", True, "current")]


def check_broker(app: Any, timeout: float = TIMEOUT_SECONDS) -> Check:
    """The broker accepts a connection (Redis: and answers a PING; AMQP: the handshake)."""
    try:
        with app.connection_for_write(
            connect_timeout=timeout,
            transport_options={"socket_timeout": timeout, "socket_connect_timeout": timeout},
        ) as conn:
            conn.ensure_connection(max_retries=0, timeout=timeout)
    except Exception as exc:  # kombu raises many types, transport by transport
        detail = " ".join(str(exc).split()) or type(exc).__name__
        return Check("broker", False, f"the broker does not answer: {detail}")
    return Check("broker", True, "answers")


def readiness(database_url: str | None, app: Any, timeout: float = TIMEOUT_SECONDS) -> list[Check]:
    """Every readiness check, in order: postgres, schema (when Postgres answers), broker."""
    return [*check_database(database_url, timeout), check_broker(app, timeout)]


def summary(checks: list[Check]) -> str:
    """One line: ``ok`` or the failed checks' details joined by ``; ``."""
    failed = [f"{c.name}: {c.detail}" for c in checks if not c.ok]
    return "; ".join(failed) if failed else "ok"


def as_json(checks: list[Check]) -> dict[str, Any]:
    return {"ok": all(c.ok for c in checks), "checks": [asdict(c) for c in checks]}
