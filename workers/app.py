"""The engine's own Celery app (``saga worker``, ``saga relay``) and its safety check."""

from __future__ import annotations

from celery import Celery

from saga.errors import ConfigurationError
from saga.settings import Settings
from saga.workers.broker_options import broker_options
from saga.workers.install import assert_safe, install

__all__ = ["assert_safe", "broker_options", "create_app", "run_celery"]


def run_celery(app: Celery, argv: list[str] | None = None) -> int:
    """Run the ``celery`` command on ``app``; returns its exit status, which Celery's own
    ``start`` and ``worker_main`` drop (a worker stopped by an unrecoverable error would exit 0,
    and a supervisor restarting on failure would leave it down)."""
    from celery.bin.celery import celery

    celery.params[0].default = app  # as Celery.start: the command runs this app
    try:
        code = celery.main(args=argv, standalone_mode=False)
    finally:
        celery.params[0].default = None
    return 0 if code is None else int(code)


def create_app(settings: Settings, broker_url: str | None = None) -> Celery:
    """The engine's own app (``saga worker``, ``saga relay``): a plain Celery app, configured
    for the engine alone, with the engine installed. JSON only: pickle is refused even if
    configured later."""
    url = broker_url or settings.broker_url
    if not url:
        raise ConfigurationError("no broker: set SAGA_BROKER_URL (redis:// or amqp://)")
    app = Celery("saga", broker=url, set_as_current=False)
    app.conf.update(
        task_serializer="json",
        result_serializer="json",
        accept_content=["json"],
        event_serializer="json",
        result_accept_content=["json"],
        task_ignore_result=True,
        task_acks_late=True,
        task_reject_on_worker_lost=True,
        worker_prefetch_multiplier=1,
        task_default_queue=settings.queue,
        broker_connection_retry_on_startup=True,
        worker_hijack_root_logger=False,
        worker_send_task_events=settings.task_events,
        task_send_sent_event=False,
        # `celery inspect ping/active/stats` answer; control commands are refused (control.py).
        worker_enable_remote_control=True,
        # The engine retries through Postgres, never through broker-side ETA messages.
        task_track_started=False,
    )
    return install(app, settings.model_copy(update={"broker_url": url}), exclusive=True)
