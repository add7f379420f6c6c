"""Writes outbox rows inside the caller's transaction. The only writer of ``saga_outbox``."""

from __future__ import annotations

import uuid
from collections.abc import Sequence
from typing import Any

import psycopg
from psycopg.types.json import Jsonb

from saga.outbox import queries as q
from saga.outbox.message import OutboxMessage


def add_messages(
    cur: psycopg.Cursor[Any], messages: Sequence[OutboxMessage], *, delay_seconds: float = 0.0
) -> None:
    """Insert ``messages`` in the cursor's open transaction. Nothing is read back, so in
    pipeline mode this costs no round trip of its own.

    A positive ``delay_seconds`` leaves the rows to the caller's own fast-path publish for that
    long before a relay takes them (relays are woken only for rows ready now).
    """
    if messages:
        cur.executemany(
            q.INSERT_MESSAGE,
            [
                (
                    m.message_id,
                    m.destination,
                    m.task_name,
                    Jsonb(m.payload),
                    Jsonb(m.headers),
                    delay_seconds,
                )
                for m in messages
            ],
        )


def mark_published(conn: psycopg.Connection[Any], message_ids: Sequence[uuid.UUID]) -> None:
    """Record rows published by a fast path. Run on a connection that commits asynchronously:
    losing this mark in a Postgres crash only means one duplicate publish later, which
    consumers already fence."""
    if message_ids:
        conn.execute(q.MARK_PUBLISHED_BY_MESSAGE_ID, (list(message_ids),))
