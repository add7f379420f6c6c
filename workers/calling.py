"""How a worker calls a step function: ``async def`` steps on the calling thread's own event
loop, and the step's ``timeout=`` enforced on every pool.

- One event loop per pool thread (the main thread of a solo worker or of a prefork child, or
  each thread of a threads pool), made at its first async step and reused by every later one:
  connection pools and clients an async step keeps on its loop survive from task to task.
- Timeouts: a sync step on a main thread is interrupted by SIGALRM; a sync step on a threads-pool
  thread runs in a helper thread that the pool thread stops waiting for at the deadline (a Python
  thread cannot be killed: the late step may still finish its work, and its result is dropped,
  never journaled); an async step is cancelled by ``asyncio.timeout`` at its next ``await``.
  In each case the attempt ends with a StepTimeoutError and the retry policy decides what next.
"""

from __future__ import annotations

import asyncio
import contextlib
import contextvars
import inspect
import logging
import os
import signal
import threading
from collections.abc import Awaitable, Callable, Iterator
from typing import Any

from saga.errors import StepTimeoutError

log = logging.getLogger("saga.worker")

_local = threading.local()


def event_loop() -> asyncio.Runner:
    """This thread's runner (its event loop), made once per thread and process."""
    runner: asyncio.Runner | None = getattr(_local, "runner", None)
    if runner is None or getattr(_local, "pid", None) != os.getpid():  # not one from before a fork
        runner = _local.runner = asyncio.Runner()
        _local.pid = os.getpid()
    return runner


def call_step(
    fn: Callable[[Any, Any], Any], ctx: Any, value: Any, timeout: float | None, what: str
) -> Any:
    """``fn(ctx, value)``, awaited on this thread's loop if it is async, within ``timeout``."""
    if inspect.iscoroutinefunction(fn):
        return _run_async(fn(ctx, value), timeout, what)
    if not timeout:
        result = fn(ctx, value)
    elif threading.current_thread() is threading.main_thread():
        with _alarm(timeout, what):
            result = fn(ctx, value)
    else:
        result = _with_deadline(fn, ctx, value, timeout, what)
    if inspect.isawaitable(result):  # e.g. a sync wrapper around an async function
        return _run_async(result, timeout, what)
    return result


def _run_async(awaitable: Awaitable[Any], timeout: float | None, what: str) -> Any:
    # The caller's context (its current span) goes with the coroutine; a runner would use its own.
    return event_loop().run(_limited(awaitable, timeout, what), context=contextvars.copy_context())


async def _limited(awaitable: Awaitable[Any], timeout: float | None, what: str) -> Any:
    if not timeout:
        return await awaitable
    limit = asyncio.timeout(timeout)
    try:
        async with limit:
            return await awaitable
    except TimeoutError:
        if limit.expired():
            raise _expired(what, timeout) from None
        raise  # the step's own TimeoutError


def _expired(what: str, seconds: float) -> StepTimeoutError:
    return StepTimeoutError(f"{what} ran longer than its timeout of {seconds} s")


@contextlib.contextmanager
def _alarm(seconds: float, what: str) -> Iterator[None]:
    """Interrupt the main thread after ``seconds`` (SIGALRM)."""

    def expired(signum: int, frame: Any) -> None:
        raise _expired(what, seconds)

    previous = signal.signal(signal.SIGALRM, expired)
    signal.setitimer(signal.ITIMER_REAL, seconds)
    try:
        yield
    finally:
        signal.setitimer(signal.ITIMER_REAL, 0)
        signal.signal(signal.SIGALRM, previous)


def _with_deadline(
    fn: Callable[[Any, Any], Any], ctx: Any, value: Any, seconds: float, what: str
) -> Any:
    """Off the main thread no signal can interrupt the step: it runs in a helper thread, and
    the pool thread stops waiting at the deadline. The attempt then fails with a
    StepTimeoutError; what the helper thread returns later is dropped (only the pool thread
    journals), and its effect, if any, is what invariant 6 already covers: a timed-out attempt
    has an unknown outcome, which compensation accounts for."""
    outcome: dict[str, Any] = {}
    done = threading.Event()
    context = contextvars.copy_context()  # the current span, for the step's own spans

    def run() -> None:
        try:
            outcome["result"] = context.run(fn, ctx, value)
        except BaseException as exc:
            outcome["error"] = exc
        finally:
            done.set()

    threading.Thread(target=run, name=f"saga-step {what}", daemon=True).start()
    if not done.wait(seconds):
        log.warning(
            "%s passed its timeout of %s s; it goes on in its thread until it returns, and "
            "whatever it returns is dropped",
            what,
            seconds,
        )
        raise _expired(what, seconds)
    if "error" in outcome:
        raise outcome["error"]
    return outcome["result"]
