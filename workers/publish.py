"""Publishes outbox messages as Celery task messages (protocol 2, JSON) with kombu."""

from __future__ import annotations

import logging
from collections.abc import Callable, Sequence

from celery import Celery

from saga import tracing
from saga.outbox.message import OutboxMessage
from saga.outbox.relay import PublishingImpossible
from saga.settings import Settings
from saga.signing import SIGNATURE, MessageKeys
from saga.workers.broker import missing_transport
from saga.workers.broker_options import apply_broker_options
from saga.workers.registry import installed

log = logging.getLogger("saga.worker")


class CeleryPublisher:
    """Sends outbox messages through a Celery app's producer pool.

    The task id is the outbox message id, so a row published twice is recognisably one message.
    With message signing on (in the settings the engine was installed with), every message is
    signed (``saga.signing``).
    """

    def __init__(
        self, app: Celery, *, retry: bool = True, settings: Settings | None = None
    ) -> None:
        self._app = app
        self._retry = retry  # off: a broker that is down fails the publish at once
        self._system = tracing.messaging_system(app.conf.broker_url)
        if settings is None:
            install = installed(app)
            settings = None if install is None else install.settings
        self._keys = None if settings is None else MessageKeys.from_settings(settings)

    @classmethod
    def for_settings(cls, settings: Settings) -> CeleryPublisher:
        """A publisher of its own for a process that only sends (a client): the settings'
        broker with the engine's broker options (TLS, confirms), no tasks installed, and no
        retries, so a broker that is down fails a publish at once."""
        app = Celery("saga-client", broker=settings.broker_url, set_as_current=False)
        app.conf.update(task_serializer="json", accept_content=["json"])
        apply_broker_options(app, settings)
        return cls(app, retry=False, settings=settings)

    def close(self) -> None:
        self._app.close()  # its broker connections

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
                        retry=self._retry,
                    )


def publish_now(
    publisher: CeleryPublisher,
    relay_later: Callable[[Sequence[OutboxMessage]], None],
    messages: Sequence[OutboxMessage],
) -> None:
    """A fast path: publish messages whose journal rows were just committed. What cannot be
    published goes to the relay through outbox rows (``relay_later``); if even that fails, the
    sweeper sends the messages again from those journal rows once they are due."""
    if not messages:
        return
    try:
        publisher.publish(messages)
    except Exception as exc:  # kombu raises many types
        log.warning("fast-path publish failed, the relay will publish instead: %s", exc)
        try:
            relay_later(messages)
        except Exception as store_exc:  # StoreError; the journal rows remain
            log.warning("the sweeper will send them again: %s", store_exc)
