"""Every SQL statement on the outbox table, by name: the writer's (in the caller's transaction)
and the relay's. This package depends on nothing else of ours, so its statements live here and
not in ``saga.queries``."""

from typing import LiteralString

# -- the writer (saga.outbox.writer) -------------------------------------------------------------

INSERT_MESSAGE: LiteralString = """
INSERT INTO saga_outbox (message_id, destination, task_name, payload, headers)
VALUES (%s, %s, %s, %s, %s)
"""

# -- the relay (saga.outbox.relay) ---------------------------------------------------------------

# Relays wake on saga_outbox_notify (migration 0001) for rows ready now.
LISTEN_OUTBOX: LiteralString = "LISTEN saga_outbox"

FETCH_BATCH: LiteralString = """
SELECT id, message_id, destination, task_name, payload, headers, attempts FROM saga_outbox
WHERE published_at IS NULL AND available_at <= now()
ORDER BY id
LIMIT %s
FOR UPDATE SKIP LOCKED
"""

# Rows the relay locked in FETCH_BATCH and published.
MARK_BATCH_PUBLISHED: LiteralString = """
UPDATE saga_outbox SET published_at = now(), attempts = attempts + 1 WHERE id = ANY(%s)
"""

RECORD_FAILURE: LiteralString = """
UPDATE saga_outbox
SET attempts = attempts + 1, last_error = %s,
    available_at = now() + least(60, power(2, attempts)) * interval '1 second'
WHERE id = ANY(%s)
"""

SECONDS_TO_NEXT: LiteralString = """
SELECT extract(epoch FROM min(available_at) - now()) FROM saga_outbox WHERE published_at IS NULL
"""

PRUNE: LiteralString = """
DELETE FROM saga_outbox WHERE id IN (
    SELECT id FROM saga_outbox WHERE published_at < now() - %s * interval '1 second' LIMIT 10000)
"""

OLDEST_UNPUBLISHED_AGE: LiteralString = """
SELECT coalesce(extract(epoch FROM now() - min(created_at)), 0) FROM saga_outbox
WHERE published_at IS NULL
"""
