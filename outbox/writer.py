"""Writes outbox rows inside the caller's transaction. The only writer of ``saga_outbox``."""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import psycopg
from psycopg.types.json import Jsonb

from saga.outbox import queries as q
from saga.outbox.message import OutboxMessage


def add_messages(cur: psycopg.Cursor[Any], messages: Sequence[OutboxMessage]) -> None:
    """Insert ``messages`` in the cursor's open transaction, for the relay to publish now.
    Nothing is read back, so in pipeline mode this costs no round trip of its own."""
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
                )
                for m in messages
            ],
        )
