"""``AsyncSagaClient``: ``SagaClient``'s methods to await, on a pool of psycopg's async
connections (``psycopg_pool.AsyncConnectionPool``).

Everything but ``wait`` runs ``SagaClient``'s own code (validation, the run transaction, the
coordinator, message building) through ``saga.async_bridge``: one copy of the logic, with each
statement awaited on an async connection. ``wait`` listens for the run's end on one pooled
connection, without holding a thread.
"""

from __future__ import annotations

import contextlib
import time
from typing import Any, cast

import psycopg
from psycopg.rows import class_row
from psycopg_pool import AsyncConnectionPool, ConnectionPool

from saga import queries as q
from saga.async_bridge import BridgedPool, greenlets, run_sync
from saga.client import APPLICATION_NAME, SagaClient, database_url, result_of
from saga.errors import RunNotFoundError
from saga.loader import Definition
from saga.records import RunRecord, StepRecord
from saga.run_transaction import translated
from saga.settings import Settings
from saga.store import PostgresStore, listen_for, pool_options


class AsyncSagaClient:
    """Starts and inspects runs from asyncio code (a FastAPI handler, an async agent).

    >>> async with AsyncSagaClient(Settings()) as client:          # doctest: +SKIP
    ...     run_id = await client.start(book_trip, {"city": "Lisbon"})
    ...     result = await client.result(run_id, timeout=60)
    """

    def __init__(self, settings: Settings) -> None:
        greenlets()  # the async extra, or a clear error now rather than at the first call
        self.settings = settings
        self.pool: AsyncConnectionPool[Any] = AsyncConnectionPool(
            database_url(settings, "AsyncSagaClient"),
            open=False,  # opened by `async with` or open(): it needs the running loop
            **pool_options(settings.pool_size, APPLICATION_NAME),
        )
        # The pool as the sync store sees it; its calls run through run_sync.
        bridged = cast(ConnectionPool, BridgedPool(self.pool))
        self._client = SagaClient(
            settings,
            store=PostgresStore(
                bridged,
                queue=settings.queue,
                dispatch_timeout=settings.dispatch_timeout_seconds,
                key_prefix=settings.key_prefix,
            ),
            publish=False,  # kombu's publish would block the event loop: the relay sends
        )

    async def open(self) -> None:
        await self.pool.open()

    async def close(self) -> None:
        await self.pool.close()

    async def __aenter__(self) -> AsyncSagaClient:
        await self.open()
        return self

    async def __aexit__(self, *exc: object) -> None:
        await self.close()

    async def start(
        self,
        saga: Definition | str,
        input: Any = None,
        *,
        run_id: str | None = None,
        timeout: float | None = None,
        priority: int = 0,
    ) -> str:
        """As ``SagaClient.start``."""
        return await run_sync(
            self._client.start, saga, input, run_id=run_id, timeout=timeout, priority=priority
        )

    async def wait(self, run_id: str, *, timeout: float | None = None) -> RunRecord:
        """As ``SagaClient.wait``: until the run has finished; WaitTimeoutError after
        ``timeout`` seconds. One pooled connection listens and reads the run."""
        deadline = None if timeout is None else time.monotonic() + timeout
        with translated(f"waiting for run {run_id!r}"):
            async with self.pool.connection() as conn:
                await conn.execute(q.LISTEN_RUN_FINISHED)
                try:
                    while True:
                        cur = conn.cursor(row_factory=class_row(RunRecord))
                        read = await cur.execute(q.SELECT_RUN, (run_id,))
                        run: RunRecord | None = await read.fetchone()
                        if run is None:
                            raise RunNotFoundError(f"no run has id {run_id!r}")
                        wait = listen_for(run, deadline, timeout)
                        if wait is None:
                            return run
                        async for notify in conn.notifies(timeout=wait):
                            if notify.payload == run_id:
                                break
                finally:
                    with contextlib.suppress(psycopg.Error):  # a broken one leaves the pool
                        await conn.execute(q.UNLISTEN_RUN_FINISHED)

    async def result(self, run_id: str, *, timeout: float | None = None) -> Any:
        """As ``SagaClient.result``."""
        return result_of(await self.wait(run_id, timeout=timeout))

    async def run(self, run_id: str) -> RunRecord:
        return await run_sync(self._client.run, run_id)

    async def steps(self, run_id: str) -> list[StepRecord]:
        return await run_sync(self._client.steps, run_id)

    async def send_event(self, run_id: str, name: str, payload: Any = None) -> bool:
        """As ``SagaClient.send_event``."""
        return await run_sync(self._client.send_event, run_id, name, payload)

    async def cancel(self, run_id: str, reason: str = "cancelled by an operator") -> None:
        """As ``SagaClient.cancel``."""
        await run_sync(self._client.cancel, run_id, reason)

    async def retry(self, run_id: str) -> None:
        """As ``SagaClient.retry``."""
        await run_sync(self._client.retry, run_id)

    async def fork(self, run_id: str, step_key: str, *, new_run_id: str | None = None) -> str:
        """As ``SagaClient.fork``."""
        return await run_sync(self._client.fork, run_id, step_key, new_run_id=new_run_id)
