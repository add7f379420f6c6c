"""The engine on a Celery app: its tasks, its worker hooks, and each process's step executor.

``install(app)`` works on the user's own app (``saga.celery.install``) and on the engine's own
(``create_app``, for ``saga worker``). The user's configuration stays; the engine's tasks are
JSON-only, acked late, and vetted before Celery acts on them, whatever the app allows for its
other tasks. Nothing is kept on the app object: an install is found by app in a registry, and
the executor (Postgres pool, lease keeper) is made per process, after fork.
"""

from __future__ import annotations

import logging
import os
import sys
from typing import Any

from celery import Celery, Task, signals
from celery.exceptions import Reject, Retry

from saga.errors import (
    AttemptFailedError,
    ConfigurationError,
    MalformedMessageError,
    SagaError,
    StoreError,
    StoreRejectedError,
)
from saga.messages import ADVANCE_TASK, START_TASK, STEP_TASK, StartMessage, parse
from saga.settings import Settings
from saga.workers.broker_options import apply_broker_options
from saga.workers.registry import Installation, installation, installed, register

log = logging.getLogger("saga.worker")

ENGINE_TASKS = (STEP_TASK, ADVANCE_TASK, START_TASK)
CELERY_CONSUMER = "celery.worker.consumer:Consumer"
GUARDED_CONSUMER = "saga.workers.intake:GuardedConsumer"
START_RETRY_SECONDS = 60.0  # how long saga.start retries through a Postgres outage


def install(app: Celery, settings: Settings | None = None, *, exclusive: bool = False) -> Celery:
    """Register the engine's tasks and worker hooks on ``app`` and return it.

    ``settings`` default to ``Settings()`` (the ``SAGA_*`` environment). The app's broker is
    the engine's: SAGA_BROKER_URL fills it when the app has none, and must agree with it when
    both are set (the relay publishes there). Call it once, after configuring the app."""
    if installed(app) is not None:
        return app  # once per app: a second call (a module imported twice) changes nothing
    settings = settings if settings is not None else Settings()
    if app.conf.task_compression:
        raise ConfigurationError(
            f"task_compression={app.conf.task_compression!r} on Celery app {app.main!r} would "
            f"compress the engine's messages too, which its workers refuse (a small compressed "
            f"message can inflate to gigabytes): compress per task instead, "
            f"@app.task(compression=...)"
        )
    _use_one_broker(app, settings)
    apply_broker_options(app, settings)
    conf = app.conf
    if str(conf.worker_consumer or CELERY_CONSUMER) == CELERY_CONSUMER:
        conf.worker_consumer = GUARDED_CONSUMER  # every engine message is vetted first
    if settings.task_events:
        conf.worker_send_task_events = True
    # Remote control in JSON whatever the task serializer: workers read no other (control.py),
    # and `celery inspect` run with this app sends that way.
    app.control.mailbox.serializer = "json"
    if not conf.get("task_default_queue") or exclusive:
        conf.task_default_queue = settings.queue
    register(app, Installation(settings, exclusive))
    _register_tasks(app)
    _connect_signals(app)
    return app


def _use_one_broker(app: Celery, settings: Settings) -> None:
    own = app.conf.broker_url
    if not own:
        if not settings.broker_url:
            raise ConfigurationError(
                f"no broker: set broker_url on Celery app {app.main!r} or SAGA_BROKER_URL"
            )
        app.conf.broker_url = settings.broker_url
    elif settings.broker_url and str(settings.broker_url) != str(own):
        raise ConfigurationError(
            f"SAGA_BROKER_URL differs from the broker_url of Celery app {app.main!r}: the relay "
            f"would publish steps where this worker does not read. Unset SAGA_BROKER_URL (and "
            f"run `saga relay --app MODULE:APP`) or make them agree"
        )


# -- what each process makes --------------------------------------------------------------------


def executor_for(app: Celery) -> Any:
    """This process's step executor for ``app`` (its Postgres pool, lease keeper, publisher)."""
    from saga.workers.executor import StepExecutor

    install_ = installation(app)
    settings = install_.settings
    return install_.per_process(
        "executor", lambda: StepExecutor(settings, app, consumed_queues(app, settings))
    )


def client_for(app: Celery) -> Any:
    """This process's client for ``app``, which starts scheduled runs."""
    from saga.client import SagaClient
    from saga.workers.publish import CeleryPublisher

    install_ = installation(app)
    # The run's first message goes out through this app (its broker options are the user's).
    return install_.per_process(
        "client",
        lambda: SagaClient(install_.settings, publisher=CeleryPublisher(app, retry=False)),
    )


def _close(made: dict[str, Any]) -> None:
    """At process exit: stop renewing leases, leave the worker registry, close the client's
    pool."""
    executor, client = made.get("executor"), made.get("client")
    if executor is not None:
        executor.leases.stop()
    if client is not None:
        client.close()


def consumed_queues(app: Celery, settings: Settings) -> list[str]:
    """The queues this worker reads (``-Q a,b``): the worker registry recovers their steps
    when it dies."""
    try:
        names = [str(name) for name in app.amqp.queues.consume_from]
    except Exception:  # not a worker, or no queues configured yet
        names = []
    return names or [settings.queue]


# -- tasks ----------------------------------------------------------------------------------------

TASK_OPTIONS: dict[str, Any] = {
    "bind": True,
    "serializer": "json",  # whatever the app's task_serializer: beat sends saga.start as JSON
    "ignore_result": True,  # Postgres holds results; nothing goes to the app's result backend
    "acks_late": True,
    "reject_on_worker_lost": True,
    # A failed attempt is journaled: its message is done with, never requeued by Celery.
    "acks_on_failure_or_timeout": True,
    "acks_on_failure": True,
    "acks_on_timeout": True,
    "throws": (AttemptFailedError,),  # an expected outcome: logged on one line, no traceback
}


def _register_tasks(app: Celery) -> None:
    app.task(name=STEP_TASK, **TASK_OPTIONS)(run_step)
    app.task(name=ADVANCE_TASK, **TASK_OPTIONS)(advance_run)
    app.task(name=START_TASK, **TASK_OPTIONS)(start_run)


def run_step(self: Task, *args: Any, **kwargs: Any) -> str:
    """Run one attempt of a saga step. The message only names the step; all else is in Postgres.
    Celery sees the attempt's real outcome: a failed attempt fails the task (or retries it, when
    the journal schedules another attempt), so its events and Flower count it."""
    executor = executor_for(self.app)
    try:
        trace = executor.execute(args, kwargs, self.request.id, self.request.headers)
    except MalformedMessageError as exc:
        log.error("rejected malformed task message %s: %s", self.request.id, exc)
        raise Reject(str(exc), requeue=False) from None
    outcome = getattr(trace, "outcome", None)
    if outcome is None:
        return "nothing to do (a duplicate or stale message)"
    if outcome == "completed":
        return "completed"
    error = AttemptFailedError(
        f"attempt {trace.claim.attempt} of step {trace.claim.step_key!r} of run "
        f"{trace.claim.run_id!r} {_OUTCOMES.get(outcome, outcome)}: {trace.error or '-'}"
    )
    if outcome == "retry":
        # Celery's Retry, raised alone: it reports the retry and sends nothing (the journal
        # schedules the next attempt, the sweeper dispatches it).
        raise Retry(str(error), exc=error)
    raise error


_OUTCOMES = {
    "retry": "failed, another attempt is scheduled",
    "failed": "failed for good",
    "fenced": "was overtaken (lease lost or run ended); its outcome was discarded",
}


def advance_run(self: Task, *args: Any, **kwargs: Any) -> None:
    """Advance a run after an outside change (an event arrived, an operator acted)."""
    try:
        executor_for(self.app).advance(args, kwargs, self.request.id)
    except MalformedMessageError as exc:
        log.error("rejected malformed task message %s: %s", self.request.id, exc)
        raise Reject(str(exc), requeue=False) from None


def start_run(self: Task, *args: Any, **kwargs: Any) -> str:
    """Start a run: ``saga`` (``module:attribute``), ``input``, and either ``schedule`` (the beat
    entry's name: one run per tick) or ``run_id``. Returns the run id."""
    import time

    from saga.workers.schedule import run_id_for

    try:
        msg = parse(StartMessage, args, kwargs)
    except MalformedMessageError as exc:
        log.error("rejected malformed task message %s: %s", self.request.id, exc)
        raise Reject(str(exc), requeue=False) from None
    if msg.run_id is not None:
        run_id = msg.run_id
    elif msg.schedule is not None:
        run_id = run_id_for(msg.schedule, self.app.conf.beat_schedule, msg.fired_at)
    else:
        raise ConfigurationError(
            f"{START_TASK} needs schedule= (the beat entry's name, one run per tick) or run_id=: "
            f"without either a message sent twice would start two runs"
        )
    client = client_for(self.app)
    deadline, delay = time.monotonic() + START_RETRY_SECONDS, 0.1
    while True:  # a tick is sent once: ride out a short Postgres outage instead of losing it
        try:
            return str(client.start(msg.saga, msg.input, run_id=run_id, timeout=msg.timeout))
        except StoreRejectedError:
            raise
        except StoreError as exc:
            if time.monotonic() + delay > deadline:
                raise
            log.warning("starting run %r failed, retrying in %.1f s: %s", run_id, delay, exc)
            time.sleep(delay)
            delay = min(delay * 2, 5.0)


# -- worker hooks -----------------------------------------------------------------------------


def _connect_signals(app: Celery) -> None:
    # Signals are process-wide: each hook checks that the worker is this app's. The receivers
    # are kept alive by the registry entry's app (weak=False, keyed per app).
    uid = f"saga-{id(app)}"

    def on_worker_init(sender: Any = None, **_: Any) -> None:
        if getattr(sender, "app", None) is app:
            start_checks(app, sender)

    def on_process_exit(**_: Any) -> None:
        install_ = installed(app)
        if install_ is not None:
            _close(install_.release())

    signals.worker_init.connect(on_worker_init, weak=False, dispatch_uid=uid)
    signals.worker_process_shutdown.connect(on_process_exit, weak=False, dispatch_uid=uid)
    signals.worker_shutdown.connect(on_process_exit, weak=False, dispatch_uid=uid)
    from saga.signing import SIGNATURE, MessageKeys
    from saga.workers.schedule import restore_kwargs, stamp_fired_at, track_beat_entries

    keys = MessageKeys.from_settings(installation(app).settings)

    def on_publish(sender: Any = None, body: Any = None, headers: Any = None, **_: Any) -> None:
        # In the process that sends saga.start (beat): the time it fired, and, with message
        # signing on, the signature workers require (after the stamp, which it covers).
        if sender != START_TASK:
            return
        stamp_fired_at(sender=sender, body=body, beat_schedule=app.conf.beat_schedule)
        if keys is not None and isinstance(headers, dict) and SIGNATURE not in headers:
            args, kwargs = body[0], body[1]
            headers[SIGNATURE] = keys.sign(sender, headers["id"], list(args), kwargs, headers)

    signals.before_task_publish.connect(on_publish, weak=False, dispatch_uid=uid)
    signals.after_task_publish.connect(restore_kwargs, weak=False, dispatch_uid=uid)

    def on_beat_init(sender: Any = None, **_: Any) -> None:
        if getattr(sender, "app", None) is app:
            track_beat_entries(sender=sender)

    signals.beat_init.connect(on_beat_init, weak=False, dispatch_uid=uid)
    signals.beat_embedded_init.connect(on_beat_init, weak=False, dispatch_uid=uid)


def start_checks(app: Celery, worker: Any = None) -> None:
    """What ``saga worker`` checks before it starts, for any worker of an installed app (run in
    ``worker_init``): a process that cannot keep the engine's guarantees stops with exit code 2
    and what to do, before it takes a message."""
    install_ = installation(app)
    # Definitions are imported by path, as `saga worker` does: the working folder is importable.
    if os.getcwd() not in sys.path:
        sys.path.insert(0, os.getcwd())
    from saga.workers import telemetry
    from saga.workers.pools import bound_shutdown, pool_name, refuse_unsupported_pool

    telemetry.install_worker_hooks()  # each pool process exports its spans and metrics
    if worker is not None:
        refuse_unsupported_pool(sender=worker)  # timeouts hold on prefork, solo, threads only
        _consume_engine_queue(app, install_.settings)
        if pool_name(getattr(worker, "pool_cls", None)) == "threads":
            telemetry.configure_sdk("saga-worker")  # the threads pool has no process init
    # Bound the warm shutdown: always on the engine's own app; on yours only when asked, as it
    # bounds your own tasks too.
    if install_.exclusive or "shutdown_grace_seconds" in install_.settings.model_fields_set:
        bound_shutdown(install_.settings.shutdown_grace_seconds)
    if install_.checked:
        return
    try:
        run_checks(app)
    except SagaError as exc:
        print(f"saga: error: {exc}", file=sys.stderr)
        raise SystemExit(2) from None


def run_checks(app: Celery) -> None:
    """Schema current, configuration safe, broker reachable; ConfigurationError otherwise."""
    from saga.migrate import require_schema
    from saga.workers.broker import check_broker
    from saga.workers.intake import GuardedConsumer

    install_ = installation(app)
    if not install_.settings.database_url:
        raise ConfigurationError("a worker running saga steps needs SAGA_DATABASE_URL")
    from celery.utils.imports import symbol_by_name

    consumer = symbol_by_name(app.conf.worker_consumer)
    if not (isinstance(consumer, type) and issubclass(consumer, GuardedConsumer)):
        raise ConfigurationError(
            f"worker_consumer is {app.conf.worker_consumer!r}: saga messages must be vetted "
            f"before Celery acts on them; make it a subclass of {GUARDED_CONSUMER}"
        )
    require_schema(install_.settings.database_url)
    assert_safe(app, whole_app=install_.exclusive)
    check_broker(app)
    install_.checked = True


def _consume_engine_queue(app: Celery, settings: Settings) -> None:
    """A worker started without ``-Q`` reads the engine's queue as well as the app's."""
    queues = app.amqp.queues
    if queues._consume_from is None and settings.queue not in queues.consume_from:
        queues.select_add(settings.queue)


def assert_safe(app: Celery, *, whole_app: bool = True) -> None:
    """Refuse to run with settings that break the engine's guarantees. On the user's own app
    (``whole_app`` false) only the engine's tasks are held to them: the app's other tasks keep
    the app's own serializers and acks."""
    problems = []
    if whole_app:
        accepted = {str(c).lower() for c in app.conf.accept_content or ()}
        if not accepted <= {"json", "application/json"} or app.conf.task_serializer != "json":
            problems.append(
                f"only JSON may be accepted and sent (accept_content={sorted(accepted)}, "
                f"task_serializer={app.conf.task_serializer!r}); pickle runs code from messages"
            )
        if not app.conf.task_acks_late:
            problems.append("task_acks_late is off (a worker crash would lose the message)")
    for name in ENGINE_TASKS:
        task = app.tasks.get(name)
        if task is None:
            problems.append(f"task {name} is not registered (call saga.celery.install(app))")
            continue
        if task.serializer != "json":
            problems.append(f"task {name} is sent as {task.serializer!r}, not JSON")
        if not task.acks_late:
            problems.append(f"task {name} is acked early (a worker crash would lose it)")
    if problems:
        raise ConfigurationError("unsafe Celery configuration: " + "; ".join(problems))
