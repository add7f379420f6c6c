"""Writes outbox rows inside the caller's transaction. The only writer of ``saga_outbox``."""

from __future__ import annotations

from collections.abc import Sequence

import psycopg
from psycopg.types.json import Jsonb

from outbox.message import OutboxMessage

_INSERT = """
INSERT INTO saga_outbox (message_id, destination, task_name, payload, headers, available_at)
VALUES (%s, %s, %s, %s, %s, now() + %s * interval '1 second')
RETURNING id
"""


def add_messages(
    cur: psycopg.Cursor[tuple[int]] | psycopg.Cursor[object],
    messages: Sequence[OutboxMessage],
    *,
    delay_seconds: float = 0.0,
) -> list[int]:
    """Insert ``messages`` in the cursor's open transaction; returns their row ids.

    A positive ``delay_seconds`` leaves the rows to the caller's own fast-path publish for that
    long before a relay takes them (relays are woken only for rows ready now).
    """
    ids: list[int] = []
    for m in messages:
        cur.execute(
            _INSERT,
            (
                m.message_id,
                m.destination,
                m.task_name,
                Jsonb(m.payload),
                Jsonb(m.headers),
                delay_seconds,
            ),
        )
        row = cur.fetchone()
        assert row is not None
        ids.append(int(row[0]))  # type: ignore[index]
    return ids


_MARK_PUBLISHED = """
UPDATE saga_outbox SET published_at = now(), attempts = attempts + 1
WHERE id = ANY(%s) AND published_at IS NULL
"""


def mark_published(conn: psycopg.Connection[object], ids: Sequence[int]) -> None:
    """Record rows published by a fast path. Committed asynchronously: losing this mark in a
    Postgres crash only means one duplicate publish later, which consumers already fence."""
    if not ids:
        return
    with conn.transaction():
        conn.execute("SET LOCAL synchronous_commit TO off")
        conn.execute(_MARK_PUBLISHED, (list(ids),))
