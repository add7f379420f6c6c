"""The outbox relay: publishes committed rows and marks them published.

Several relays may run: each claims a batch with ``FOR UPDATE SKIP LOCKED``. A relay wakes on
``NOTIFY saga_outbox`` and polls as a fallback, so a missed notification only delays a message.
Publishing is at-least-once (a crash between publish and mark publishes again); consumers fence
duplicates by the journal. A broker that fails (refused, timed out) is retried with backoff, per
row; an error no retry can fix (a missing module, a bad configuration) stops the relay with it.
"""

from __future__ import annotations

import logging
import threading
import time
from collections.abc import Callable, Sequence
from typing import Any, Protocol

import psycopg

from saga.outbox import queries as q
from saga.outbox.message import OutboxMessage, StoredMessage

log = logging.getLogger("saga.relay")


class PublishingImpossible(Exception):
    """Publishing cannot succeed until someone acts (a missing module, a bad configuration):
    the relay stops and says why, instead of retrying forever."""


class Publisher(Protocol):
    def publish(self, messages: Sequence[OutboxMessage]) -> None: ...


class Relay:
    def __init__(
        self,
        conninfo: str,
        publisher: Publisher,
        *,
        batch_size: int = 200,
        poll_seconds: float = 1.0,
        retention_seconds: float = 3600.0,
    ) -> None:
        self._conninfo = conninfo
        self._publisher = publisher
        self._batch_size = batch_size
        self._poll = poll_seconds
        self._retention = retention_seconds
        self._conn: psycopg.Connection[Any] | None = None
        self.published = 0

    def _connection(self) -> psycopg.Connection[Any]:
        if self._conn is None or self._conn.closed:
            self._conn = psycopg.connect(
                self._conninfo, autocommit=True, application_name="saga-relay"
            )
            self._conn.execute(q.LISTEN_OUTBOX)
        return self._conn

    def close(self) -> None:
        if self._conn is not None:
            self._conn.close()
            self._conn = None

    def publish_batch(self) -> int:
        """Publish one batch of ready rows; returns how many were published."""
        conn = self._connection()
        try:
            with conn.transaction():
                rows = conn.execute(q.FETCH_BATCH, (self._batch_size,)).fetchall()
                if not rows:
                    return 0
                batch = [
                    StoredMessage(
                        id=r[0],
                        attempts=r[6],
                        message=OutboxMessage(
                            message_id=r[1],
                            destination=r[2],
                            task_name=r[3],
                            payload=r[4],
                            headers=r[5],
                        ),
                    )
                    for r in rows
                ]
                self._publisher.publish([b.message for b in batch])
                conn.execute(q.MARK_BATCH_PUBLISHED, ([b.id for b in batch],))
        except psycopg.Error:
            raise
        except PublishingImpossible:
            raise  # the transaction rolls back: the rows stay as they were for the next relay
        except ImportError as exc:
            missing = f"the missing module {exc.name!r}" if exc.name else "what it names"
            raise PublishingImpossible(
                f"publishing the outbox failed with an error no retry can fix: {exc}. Install "
                f"{missing} into the relay's Python environment and start it again"
            ) from exc
        except Exception as exc:  # the broker failed: keep the rows, back off, go on
            log.warning("publishing %d outbox rows failed, will retry: %s", len(rows), exc)
            conn.execute(q.RECORD_FAILURE, (str(exc)[:2000], [r[0] for r in rows]))
            return 0
        self.published += len(batch)
        return len(batch)

    def publish_all(self, heartbeat: Callable[[], None] = lambda: None) -> int:
        total = 0
        while (n := self.publish_batch()) > 0:
            heartbeat()  # a long backlog is progress too
            total += n
            if n < self._batch_size:
                break
        return total

    def prune(self) -> int:
        return self._connection().execute(q.PRUNE, (self._retention,)).rowcount

    def lag_seconds(self) -> float:
        """Age of the oldest unpublished row (0 when none): the relay's backlog."""
        row = self._connection().execute(q.OLDEST_UNPUBLISHED_AGE).fetchone()
        return float(row[0]) if row else 0.0

    def _seconds_to_next(self) -> float | None:
        row = self._connection().execute(q.SECONDS_TO_NEXT).fetchone()
        return None if row is None or row[0] is None else max(0.0, float(row[0]))

    def run(
        self,
        stop: threading.Event,
        also: Callable[[], float | None] | None = None,
        prune_every: float = 60.0,
        heartbeat: Callable[[], None] | None = None,
    ) -> None:
        """Publish until ``stop`` is set. ``also`` runs after each wake-up (the sweeper) and
        returns the seconds until it wants to run again; ``heartbeat`` is called at each turn of
        the loop, outages included, and after each batch (the liveness probe). Raises
        ``PublishingImpossible`` when publishing cannot succeed until someone acts (a missing
        module, a bad configuration)."""
        try:
            self._run(stop, also, prune_every, heartbeat or (lambda: None))
        finally:
            self.close()

    def _run(
        self,
        stop: threading.Event,
        also: Callable[[], float | None] | None,
        prune_every: float,
        heartbeat: Callable[[], None],
    ) -> None:
        next_prune = time.monotonic()
        while not stop.is_set():
            heartbeat()
            try:
                self.publish_all(heartbeat)
                waits = [self._poll, self._seconds_to_next()]
                if also is not None:
                    waits.append(also())
                if time.monotonic() >= next_prune:
                    self.prune()
                    next_prune = time.monotonic() + prune_every
                timeout = min(w for w in waits if w is not None)
                if timeout > 0:
                    for _ in self._connection().notifies(timeout=timeout, stop_after=1):
                        pass
            except PublishingImpossible:
                raise  # retrying cannot help: stop, and say why
            except Exception as exc:  # keep relaying through any outage; log and reconnect
                log.warning("relay loop failed, reconnecting: %s", exc)
                self.close()
                stop.wait(self._poll)
