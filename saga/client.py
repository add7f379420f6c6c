"""The Python API for starting runs, waiting for them and reading them back."""

from __future__ import annotations

import uuid
from typing import Any

from saga import tracing
from saga.coordinator import encode_input, new_step, step_message
from saga.definition import Saga, load_saga
from saga.errors import ConfigurationError, RunFailedError
from saga.settings import Settings
from saga.store import PostgresStore, RunRecord, StepRecord, open_pool


class SagaClient:
    """Starts and inspects runs. Needs only Postgres: the relay publishes what it writes.

    >>> with SagaClient(Settings()) as client:                     # doctest: +SKIP
    ...     run_id = client.start(book_trip, {"city": "Lisbon"})
    ...     result = client.result(run_id, timeout=60)
    """

    def __init__(self, settings: Settings) -> None:
        if not settings.database_url:
            raise ConfigurationError(
                "SagaClient needs SAGA_DATABASE_URL (or use `saga demo`, which starts the "
                "embedded servers)"
            )
        self.settings = settings
        self.store = PostgresStore(
            open_pool(settings.database_url, size=2, name="saga-client"),
            dispatch_timeout=settings.dispatch_timeout_seconds,
        )

    def __enter__(self) -> SagaClient:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def close(self) -> None:
        self.store.close()

    def start(self, saga: Saga | str, input: Any = None, *, run_id: str | None = None) -> str:
        """Start a run and return its id. Idempotent: the same ``run_id`` with the same saga
        and input returns the existing run instead of starting another."""
        definition = load_saga(saga) if isinstance(saga, str) else saga
        ref = saga if isinstance(saga, str) else definition.ref()
        run_id = run_id or uuid.uuid4().hex
        input_json = encode_input(definition, input)
        trace_context = tracing.new_run_carrier()  # the run's root span context
        first = new_step(run_id, definition.first, input_json)
        self.store.create_run(
            run_id=run_id,
            saga_name=definition.name,
            saga_ref=ref,
            saga_version=definition.version,
            input_json=input_json,
            trace_context=trace_context,
            first_steps=[first],
            messages=[step_message(self.settings.queue, run_id, first.step_key, trace_context)],
        )
        return run_id

    def wait(self, run_id: str, *, timeout: float | None = None) -> RunRecord:
        """Block until the run has finished, in whatever state; WaitTimeoutError after
        ``timeout`` seconds."""
        return self.store.wait_for_run(run_id, timeout)

    def result(self, run_id: str, *, timeout: float | None = None) -> Any:
        """The run's result once it completes; RunFailedError if it ends any other way."""
        run = self.wait(run_id, timeout=timeout)
        if run.state != "completed":
            raise RunFailedError(
                f"run {run_id!r} of saga {run.saga_name!r} ended {run.state}: {run.error}"
            )
        return run.result

    def run(self, run_id: str) -> RunRecord:
        return self.store.get_run(run_id)

    def steps(self, run_id: str) -> list[StepRecord]:
        return self.store.get_steps(run_id)
