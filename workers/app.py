"""The Celery app: safe configuration and the one task that runs saga steps."""

from __future__ import annotations

import logging
import os
from typing import Any

from celery import Celery, Task, signals
from celery.exceptions import Reject

from saga.errors import ConfigurationError, MalformedMessageError
from saga.messages import ADVANCE_TASK, STEP_TASK
from saga.settings import Settings

log = logging.getLogger("saga.worker")


class SagaCelery(Celery):  # type: ignore[misc]
    """A Celery app that carries the engine's settings and its per-process step executor."""

    saga_settings: Settings
    _executor: Any = None
    _executor_pid: int | None = None

    def executor(self) -> Any:
        # One executor per process, made after fork: connections and threads do not survive it.
        if self._executor is None or self._executor_pid != os.getpid():
            from saga.workers.executor import StepExecutor

            self._executor = StepExecutor(self.saga_settings, self)
            self._executor_pid = os.getpid()
        return self._executor

    def start(self, argv: list[str] | None = None) -> int:
        """Run the ``celery`` command; returns its exit status, which Celery's own ``start`` and
        ``worker_main`` drop (a worker stopped by an unrecoverable error would exit 0, and a
        supervisor restarting on failure would leave it down)."""
        from celery.bin.celery import celery

        celery.params[0].default = self  # as Celery.start: the command runs this app
        try:
            code = celery.main(args=argv, standalone_mode=False)
        finally:
            celery.params[0].default = None
        return 0 if code is None else int(code)

    def leave(self, **_: Any) -> None:
        """At process shutdown: stop renewing leases and leave the worker registry."""
        if self._executor is not None and self._executor_pid == os.getpid():
            self._executor.leases.stop()


def broker_options(broker_url: str, settings: Settings) -> dict[str, Any]:
    if broker_url.startswith(("redis", "rediss")):
        # Must outlast the longest step, or Redis hands a running task to another worker.
        return {"visibility_timeout": settings.visibility_timeout_seconds}
    if broker_url.startswith(("amqp", "pyamqp")):
        return {"confirm_publish": True}  # the relay marks a row published only once confirmed
    return {}


def create_app(settings: Settings, broker_url: str | None = None) -> SagaCelery:
    """A Celery app for these settings. JSON only: pickle is refused even if configured later."""
    url = broker_url or settings.broker_url
    if not url:
        raise ConfigurationError("no broker: set SAGA_BROKER_URL (redis:// or amqp://)")
    app = SagaCelery("saga", broker=url, set_as_current=False)
    app.saga_settings = settings
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
        broker_transport_options=broker_options(url, settings),
        broker_connection_retry_on_startup=True,
        worker_hijack_root_logger=False,
        worker_send_task_events=False,
        task_send_sent_event=False,
        worker_enable_remote_control=False,
        # The engine retries through Postgres, never through broker-side ETA messages.
        task_track_started=False,
        # Every message is vetted before Celery acts on it (saga/workers/intake.py).
        worker_consumer="saga.workers.intake:GuardedConsumer",
    )
    app.task(name=STEP_TASK, bind=True, acks_late=True, reject_on_worker_lost=True)(run_step)
    app.task(name=ADVANCE_TASK, bind=True, acks_late=True, reject_on_worker_lost=True)(advance_run)
    return app


def install_shutdown_hooks(app: SagaCelery) -> None:
    """For the worker process only (signals are process-wide). Also refuses pools where step
    timeouts cannot hold, and bounds how long a warm shutdown waits (``workers/pools.py``)."""
    from saga.workers.pools import bound_shutdown, refuse_unsupported_pool

    signals.worker_init.connect(refuse_unsupported_pool, weak=False)
    bound_shutdown(app.saga_settings.shutdown_grace_seconds)
    signals.worker_process_shutdown.connect(app.leave, weak=False)  # a prefork child
    signals.worker_shutdown.connect(app.leave, weak=False)  # solo and threads pools


def assert_safe(app: Celery) -> None:
    """Refuse to run with settings that break the engine's guarantees."""
    problems = []
    accepted = {str(c).lower() for c in app.conf.accept_content or ()}
    if not accepted <= {"json", "application/json"} or app.conf.task_serializer != "json":
        problems.append(
            f"only JSON may be accepted and sent (accept_content={sorted(accepted)}, "
            f"task_serializer={app.conf.task_serializer!r}); pickle runs code from messages"
        )
    if not app.conf.task_acks_late:
        problems.append("task_acks_late is off (a worker crash would lose the message)")
    if problems:
        raise ConfigurationError("unsafe Celery configuration: " + "; ".join(problems))


def run_step(self: Task, *args: Any, **kwargs: Any) -> None:
    """Run one attempt of a saga step. The message only names the step; all else is in Postgres."""
    try:
        self.app.executor().execute(args, kwargs, self.request.id, self.request.headers)
    except MalformedMessageError as exc:
        log.error("rejected malformed task message %s: %s", self.request.id, exc)
        raise Reject(str(exc), requeue=False) from None


def advance_run(self: Task, *args: Any, **kwargs: Any) -> None:
    """Advance a run after an outside change (an event arrived, an operator acted)."""
    try:
        self.app.executor().advance(args, kwargs, self.request.id)
    except MalformedMessageError as exc:
        log.error("rejected malformed task message %s: %s", self.request.id, exc)
        raise Reject(str(exc), requeue=False) from None
