"""Publishes outbox messages as Celery task messages (protocol 2, JSON) with kombu."""

from __future__ import annotations

import logging
import threading
import time
import uuid
from collections.abc import Callable, Sequence

from celery import Celery

from saga import tracing
from saga.outbox.message import OutboxMessage
from saga.outbox.relay import PublishingImpossible
from saga.signing import SIGNATURE, MessageKeys
from saga.workers.broker import missing_transport
from saga.workers.registry import installed

log = logging.getLogger("saga.worker")


class CeleryPublisher:
    """Sends outbox messages through a Celery app's producer pool.

    The task id is the outbox message id, so a row published twice is recognisably one message.
    With message signing on (in the settings the engine was installed with), every message is
    signed (``saga.signing``).
    """

    def __init__(self, app: Celery) -> None:
        self._app = app
        self._system = tracing.messaging_system(app.conf.broker_url)
        install = installed(app)
        self._keys = None if install is None else MessageKeys.from_settings(install.settings)

    def publish(self, messages: Sequence[OutboxMessage]) -> None:
        if not messages:
            return
        try:
            self._send(messages)
        except ImportError as exc:  # a transport missing a module: the relay stops on this
            url = str(self._app.conf.broker_url)
            raise PublishingImpossible(missing_transport(url, exc)) from exc
        tracing.published(messages)

    def _send(self, messages: Sequence[OutboxMessage]) -> None:
        with self._app.producer_or_acquire() as producer:
            for m in messages:
                with tracing.send_span(m, self._system) as headers:
                    if self._keys is not None:
                        task_id = str(m.message_id)
                        headers[SIGNATURE] = self._keys.sign(
                            m.task_name, task_id, [], m.payload, headers
                        )
                    self._app.send_task(
                        m.task_name,
                        kwargs=m.payload,
                        task_id=str(m.message_id),
                        queue=m.destination,
                        serializer="json",  # whatever the app's task_serializer is
                        headers=headers,
                        producer=producer,
                        add_to_parent=False,
                        ignore_result=True,
                    )


class PendingMarks:
    """Outbox rows this process published itself and has yet to mark published.

    Marking costs a round trip; instead the ids ride on this process's next claim (see
    ``PostgresStore.claim_step``). A worker that goes idle has them marked by a daemon thread
    after ``flush_after`` seconds, well inside the relay's grace period, so the relay does not
    publish them again. A mark lost with its process costs one duplicate message, which the
    claim fences.
    """

    def __init__(self, mark: Callable[[Sequence[uuid.UUID]], None], flush_after: float) -> None:
        self._mark = mark
        self._flush_after = flush_after
        self._ids: list[uuid.UUID] = []
        self._lock = threading.Lock()
        self._wake = threading.Event()
        self._thread: threading.Thread | None = None

    def add(self, messages: Sequence[OutboxMessage]) -> None:
        with self._lock:
            self._ids.extend(m.message_id for m in messages)
            if self._thread is None:
                self._thread = threading.Thread(target=self._run, name="saga-marks", daemon=True)
                self._thread.start()
        self._wake.set()

    def flush(self) -> None:
        """Mark what is pending now (a process about to exit)."""
        ids = self.take()
        if ids:
            try:
                self._mark(ids)
            except Exception as exc:  # the relay publishes them again; consumers fence
                log.warning("could not mark %d outbox rows published: %s", len(ids), exc)

    def take(self) -> list[uuid.UUID]:
        with self._lock:
            ids, self._ids = self._ids, []
        return ids

    def _run(self) -> None:
        while True:
            self._wake.wait()
            self._wake.clear()
            time.sleep(self._flush_after)  # a claim in the meantime takes them first
            self.flush()
