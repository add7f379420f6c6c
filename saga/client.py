"""The Python API: start runs, wait for them, read them back, and operate on them."""

from __future__ import annotations

import contextlib
import getpass
import json
import os
import re
import socket
import threading
import uuid
from typing import Any

from pydantic_core import PydanticSerializationError

from saga import coordinator, strict_json, tracing
from saga.definition import NAME, Saga
from saga.errors import ConfigurationError, InputError, RunFailedError
from saga.failures import ErrorType, error_record
from saga.limits import check_priority, check_run_keys
from saga.loader import Definition, load_definition
from saga.outbox.message import OutboxMessage
from saga.records import OperatorError, RunRecord, StepRecord
from saga.run_transaction import RunTransaction
from saga.settings import Settings
from saga.states import RunState
from saga.store import PostgresStore, open_pool

# Run ids are part of idempotency keys ("<run_id>:<step_key>"): no ":" so keys cannot collide.
_RUN_ID = re.compile(r"[A-Za-z0-9][A-Za-z0-9_.\-]{0,199}")


def check_run_id(run_id: str) -> str:
    if not isinstance(run_id, str) or not _RUN_ID.fullmatch(run_id):
        raise ConfigurationError(
            f"run id {run_id!r} is not allowed: use 1-200 letters, digits, '_', '.' or '-', "
            f"starting with a letter or digit"
        )
    return run_id


MAX_ACTOR = 200  # characters of an actor kept in a run's history


def operator(actor: str | None = None) -> str:
    """Who acts on a run, for its history: ``actor`` as given (a dashboard passes its user and
    the request's address), else this process's ``user@host``."""
    if actor is None:
        try:
            user = getpass.getuser()
        except (OSError, KeyError):  # no login name and no passwd entry (some containers)
            user = f"uid{os.getuid()}" if hasattr(os, "getuid") else "unknown"
        actor = f"{user}@{socket.gethostname()}"
    return actor[:MAX_ACTOR]


# The clients' Postgres application name (and pool name).
APPLICATION_NAME = "saga-client"


def database_url(settings: Settings, who: str) -> str:
    if not settings.database_url:
        raise ConfigurationError(
            f"{who} needs SAGA_DATABASE_URL (or use `saga demo`, which starts the embedded servers)"
        )
    return settings.database_url


def result_of(run: RunRecord) -> Any:
    """A finished run's result; RunFailedError if it ended any other way than completed."""
    if run.state != RunState.COMPLETED:
        raise RunFailedError(
            f"run {run.run_id!r} of saga {run.saga_name!r} ended {run.state}: {run.error}"
        )
    return run.result


class SagaClient:
    """Starts and inspects runs. Needs only Postgres: the relay publishes what it writes.

    >>> with SagaClient(Settings()) as client:                     # doctest: +SKIP
    ...     run_id = client.start(book_trip, {"city": "Lisbon"})
    ...     result = client.result(run_id, timeout=60)
    """

    def __init__(
        self,
        settings: Settings,
        *,
        store: PostgresStore | None = None,
        publish: bool = True,
        publisher: Any = None,
    ) -> None:
        """``publish``: send a new run's first messages to the broker right after its commit
        (when ``settings.broker_url`` is set, or through ``publisher``, a
        ``saga.workers.publish.CeleryPublisher``), rather than through the outbox and a relay."""
        self.settings = settings
        self._publish = publish and (publisher is not None or bool(settings.broker_url))
        self._publisher: Any = publisher
        self._own_publisher = False  # one made here is closed here
        self._publisher_lock = threading.Lock()
        if settings.trace_exception_details:  # asked for; never switched off for the process
            tracing.export_exception_details(True)
        url = database_url(settings, "SagaClient") if store is None else ""
        self.store = store or PostgresStore(
            open_pool(url, size=settings.pool_size, name=APPLICATION_NAME),
            queue=settings.queue,
            dispatch_timeout=settings.dispatch_timeout_seconds,
            key_prefix=settings.key_prefix,
        )

    def __enter__(self) -> SagaClient:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def close(self) -> None:
        self.store.close()
        if self._own_publisher:
            self._publisher.close()

    def start(
        self,
        saga: Definition | str,
        input: Any = None,
        *,
        run_id: str | None = None,
        timeout: float | None = None,
        priority: int = 0,
    ) -> str:
        """Start a run and return its id. Idempotent: the same ``run_id`` with the same saga
        and input returns the existing run instead of starting another. After ``timeout``
        seconds a run still running is stopped and its completed steps compensated.
        ``priority``: where its steps wait for a limit (``saga.Concurrency``,
        ``saga.RateLimit``), higher ones go first (an interactive run before a batch)."""
        check_priority(priority, f"run {run_id!r}", InputError)
        definition: Definition = load_definition(saga) if isinstance(saga, str) else saga
        ref = saga if isinstance(saga, str) else definition.ref()
        run_id = check_run_id(run_id or uuid.uuid4().hex)
        input_json = self._fits(definition.validate_input(input), f"the input of run {run_id!r}")
        trace_context = tracing.new_run_carrier()  # the run's root span context

        def start(tx: RunTransaction) -> None:
            coordinator.advance(tx, lambda _ref: definition)

        unsent: list[OutboxMessage] | None = [] if self._publish else None
        declared = list(definition.limits()) if isinstance(definition, Saga) else []
        if definition.concurrency is not None:
            declared.append(definition.concurrency)
        if declared:
            check_run_keys(declared, json.loads(input_json), f"run {run_id!r}")
        limit, replaced = definition.concurrency, list[str]()
        run_gate = None
        if limit is not None:
            where = f"{definition.name!r} run {run_id!r}"
            gate = limit.gate(definition.name, json.loads(input_json), where, run_level=True)
            run_gate = {**gate, "on_limit": limit.on_limit}
        created = self.store.create_run(
            run_id=run_id,
            saga_name=definition.name,
            saga_ref=ref,
            saga_version=definition.version_tag,
            input_json=input_json,
            trace_context=trace_context,
            timeout=timeout,
            start=start,
            fast_path=unsent,
            priority=priority,
            run_gate=run_gate,
            replaced=replaced,
        )
        for old_run in replaced:  # Concurrency(on_limit="cancel_oldest"): the newest wins
            with contextlib.suppress(OperatorError):  # it finished meanwhile
                self.cancel(
                    old_run,
                    f"replaced by run {run_id!r} (Concurrency on_limit='cancel_oldest')",
                    actor="saga",
                )
        if unsent:
            self._publish_now(unsent)
        elif not created and unsent is not None:
            # The run existed: perhaps our own earlier try, whose commit's reply was lost and
            # whose messages were never published. The sweeper sends what it still owes.
            self.store.messages_owed_now(run_id)
        return run_id

    def _publish_now(self, messages: list[OutboxMessage]) -> None:
        """The run's first messages straight to the broker, as a worker's fast path does; a
        client that dies before sending them delays the run by the dispatch timeout."""
        from saga.workers.publish import CeleryPublisher, publish_now

        with self._publisher_lock:  # one per client, whichever thread starts first
            if self._publisher is None:
                self._publisher = CeleryPublisher.for_settings(self.settings)
                self._own_publisher = True
        publish_now(self._publisher, self.store.relay_later, messages)

    def wait(self, run_id: str, *, timeout: float | None = None) -> RunRecord:
        """Block until the run has finished, in whatever state; WaitTimeoutError after
        ``timeout`` seconds."""
        return self.store.wait_for_run(run_id, timeout)

    def result(self, run_id: str, *, timeout: float | None = None) -> Any:
        """The run's result once it completes; RunFailedError if it ends any other way."""
        return result_of(self.wait(run_id, timeout=timeout))

    def run(self, run_id: str) -> RunRecord:
        return self.store.get_run(run_id)

    def steps(self, run_id: str) -> list[StepRecord]:
        return self.store.get_steps(run_id)

    # -- operator actions ---------------------------------------------------------------------

    def send_event(
        self, run_id: str, name: str, payload: Any = None, *, actor: str | None = None
    ) -> bool:
        """Deliver an outside event (an approval, a webhook) to a run. True if a step was
        waiting for it; otherwise it is kept until the run waits for it. ``actor`` (who sends
        it, recorded in the run's history) defaults to this process's ``user@host``."""
        if not isinstance(name, str) or not NAME.match(name):
            raise InputError(
                f"event name {name!r} for run {run_id!r} must match {NAME.pattern} (the name "
                f"a workflow passes to ctx.wait_event)"
            )
        try:
            payload_json = strict_json.dump(payload)
        except (strict_json.NotJSONError, PydanticSerializationError) as exc:
            raise InputError(
                f"event {name!r} for run {run_id!r}: the payload is not JSON: {exc}"
            ) from None
        self._fits(payload_json.decode(), f"event {name!r} for run {run_id!r}")
        payload = strict_json.loads(payload_json)
        return self.store.send_event(run_id, name, payload, actor=operator(actor))

    def _fits(self, json_text: str, what: str) -> str:
        size = len(json_text.encode())
        if size > self.settings.max_input_bytes:
            raise InputError(
                f"{what} is {size} bytes of JSON, over the limit of "
                f"{self.settings.max_input_bytes} bytes (SAGA_MAX_INPUT_BYTES); pass a reference "
                f"to large data instead"
            )
        return json_text

    def cancel(
        self, run_id: str, reason: str = "cancelled by an operator", *, actor: str | None = None
    ) -> None:
        """Stop a running run: nothing new starts, completed steps are compensated in reverse
        order, and the run ends ``cancelled``."""
        error = error_record(ErrorType.CANCELLED, reason)
        self.store.stop_run(
            run_id,
            lambda tx: coordinator.stop(tx, error),
            actor=operator(actor),
            detail={"reason": reason},
        )

    def retry(self, run_id: str, *, actor: str | None = None) -> None:
        """Resume a failed run at its failed steps (after a code fix, it replays); or retry the
        failed compensation of a ``compensation_failed`` run."""
        self.store.retry_run(run_id, actor=operator(actor))

    def fork(
        self,
        run_id: str,
        step_key: str,
        *,
        new_run_id: str | None = None,
        actor: str | None = None,
    ) -> str:
        """Start a new run from ``run_id``'s journal before ``step_key``: that step and what
        follows run again, under the definition the workers have now."""
        definition = load_definition(self.run(run_id).saga_ref)
        if new_run_id is not None:
            check_run_id(new_run_id)
        return self.store.fork_run(
            run_id,
            step_key,
            saga_version=definition.version_tag,
            new_run_id=new_run_id,
            actor=operator(actor),
        )
