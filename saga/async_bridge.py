"""The engine's Postgres code (store, run transaction, coordinator) on psycopg's async
connections, with no thread and no second copy of the logic.

The code stays sync. ``run_sync`` runs it in a greenlet; each statement it sends through a
``BridgedPool`` connection switches back to the event loop, which awaits it on an async
connection from a ``psycopg_pool.AsyncConnectionPool`` and switches back with the answer.
While a statement is in flight the loop serves other tasks. (SQLAlchemy's asyncio support
works the same way.) Needs ``greenlet``: ``pip install 'durable-saga[async]'``.
"""

from __future__ import annotations

import contextlib
import contextvars
import functools
from collections.abc import Awaitable, Callable, Iterator, Sequence
from contextlib import AbstractAsyncContextManager
from typing import Any, TypeVar

import psycopg
from psycopg_pool import AsyncConnectionPool

from saga.errors import ConfigurationError

T = TypeVar("T")


@functools.cache
def greenlets() -> Any:
    """The ``greenlet`` module, an optional dependency (``import saga`` works without it)."""
    try:
        import greenlet
    except ModuleNotFoundError:
        raise ConfigurationError(
            "AsyncSagaClient needs greenlet, which comes with the async extra: "
            "pip install 'durable-saga[async]'"
        ) from None
    return greenlet


@functools.cache
def _bridge_class() -> type[Any]:
    class Bridge(greenlets().greenlet):  # type: ignore[misc]
        """A greenlet running sync code whose I/O its parent (the loop's task) awaits."""

        def __init__(self, fn: Callable[..., Any], driver: Any) -> None:
            super().__init__(fn, driver)
            self.driver = driver

    return Bridge


def await_(awaitable: Awaitable[T]) -> T:
    """From sync code inside ``run_sync``: the result of ``awaitable``, awaited by the loop."""
    current = greenlets().getcurrent()
    if not isinstance(current, _bridge_class()):
        raise RuntimeError("await_ is only for code run by saga.async_bridge.run_sync")
    result: T = current.driver.switch(awaitable)
    return result


async def run_sync(fn: Callable[..., T], *args: Any, **kwargs: Any) -> T:
    """``fn(*args, **kwargs)`` run in a greenlet on this task; its awaits happen here."""
    bridge = _bridge_class()(fn, greenlets().getcurrent())
    bridge.gr_context = contextvars.copy_context()  # the caller's current span, for instance
    step = bridge.switch(*args, **kwargs)
    while not bridge.dead:
        try:
            value = await step
        except BaseException as exc:  # cancellation too: the sync code unwinds, then re-raises
            step = bridge.throw(type(exc), exc, exc.__traceback__)
        else:
            step = bridge.switch(value)
    result: T = step
    return result


@contextlib.contextmanager
def _entered(manager: AbstractAsyncContextManager[T]) -> Iterator[T]:
    """An async context manager, entered and left from sync code."""
    value = await_(manager.__aenter__())
    try:
        yield value
    except BaseException as exc:
        if not await_(manager.__aexit__(type(exc), exc, exc.__traceback__)):
            raise
    else:
        await_(manager.__aexit__(None, None, None))


class BridgedCursor:
    """What the store calls on a ``psycopg.Cursor``, on an async cursor."""

    def __init__(self, cursor: psycopg.AsyncCursor[Any], connection: BridgedConnection) -> None:
        self._cursor = cursor
        self.connection = connection

    def execute(self, query: Any, params: Any = None) -> BridgedCursor:
        await_(self._cursor.execute(query, params))
        return self

    def executemany(self, query: Any, params_seq: Sequence[Any]) -> None:
        await_(self._cursor.executemany(query, params_seq))

    def fetchone(self) -> Any:
        return await_(self._cursor.fetchone())

    def fetchall(self) -> list[Any]:
        return await_(self._cursor.fetchall())

    def __enter__(self) -> BridgedCursor:
        return self

    def __exit__(self, *exc: object) -> None:
        await_(self._cursor.close())


class BridgedConnection:
    """What the store calls on a ``psycopg.Connection``, on an async connection."""

    def __init__(self, connection: psycopg.AsyncConnection[Any]) -> None:
        self._connection = connection
        self.info = connection.info

    @property
    def closed(self) -> bool:
        return self._connection.closed

    def cursor(self, *, row_factory: Any = None) -> BridgedCursor:
        if row_factory is None:
            return BridgedCursor(self._connection.cursor(), self)
        return BridgedCursor(self._connection.cursor(row_factory=row_factory), self)

    def execute(self, query: Any, params: Any = None) -> BridgedCursor:
        return self.cursor().execute(query, params)

    def pipeline(self) -> contextlib.AbstractContextManager[Any]:
        return _entered(self._connection.pipeline())

    def transaction(self) -> contextlib.AbstractContextManager[Any]:
        return _entered(self._connection.transaction())

    def rollback(self) -> None:
        await_(self._connection.rollback())


class BridgedPool:
    """What the store calls on a ``psycopg_pool.ConnectionPool``, on an AsyncConnectionPool."""

    def __init__(self, pool: AsyncConnectionPool[Any]) -> None:
        self._pool = pool

    @contextlib.contextmanager
    def connection(self) -> Iterator[BridgedConnection]:
        with _entered(self._pool.connection()) as connection:
            yield BridgedConnection(connection)

    def close(self) -> None:
        await_(self._pool.close())
