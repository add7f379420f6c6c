"""Which Celery pools run steps, and how long a stopping worker waits for its running steps.

``timeout=`` holds on the prefork, solo and threads pools (``saga.workers.calling``); on any
other pool (eventlet, gevent, a custom one) it could not be enforced, so a worker refuses to
start on one.

Shutdown: SIGTERM starts Celery's warm shutdown. The worker takes no new message and waits for
the steps it is running; each is journaled as usual when it returns. That wait is bounded by
``SAGA_SHUTDOWN_GRACE_SECONDS``: past it, the worker kills its pool processes and exits with
status 1, as a kill -9 would. Nothing is lost: the cut steps' leases run out and the sweeper
dispatches them again (their attempts count as started, with unknown outcomes), and the
worker's heartbeat stops, so a message it had taken but not claimed is dispatched again too.
With late acks the broker also redelivers the unacked message (RabbitMQ at once, Redis after
its visibility timeout); the journal fences that duplicate.
"""

from __future__ import annotations

import contextlib
import logging
import os
import signal
import threading
from typing import Any

from celery import signals

log = logging.getLogger("saga.worker")

SUPPORTED_POOLS = ("prefork", "solo", "threads")
_SAME = {"processes": "prefork", "thread": "threads"}  # Celery's alias, and the module's name


def pool_name(pool_cls: Any) -> str:
    """The pool's short name, from Celery's alias (``threads``), a ``module:Class`` path, or
    a class of ``celery.concurrency``."""
    if isinstance(pool_cls, str):
        name = pool_cls.split(":")[0].rsplit(".", 1)[-1] if ":" in pool_cls else pool_cls
    else:
        name = getattr(pool_cls, "__module__", repr(pool_cls)).rsplit(".", 1)[-1]
    return _SAME.get(name.lower(), name.lower())


def refuse_unsupported_pool(sender: Any = None, **_: Any) -> None:
    """``worker_init``: stop a worker on a pool where step timeouts cannot be enforced."""
    name = pool_name(getattr(sender, "pool_cls", None))
    if name not in SUPPORTED_POOLS:
        message = (
            f"saga steps cannot run on the {name!r} pool: their timeouts are enforced only on "
            f"the {', '.join(SUPPORTED_POOLS)} pools; start the worker with --pool prefork, "
            f"solo or threads"
        )
        log.error(message)
        raise SystemExit(message)  # a receiver's Exception would only be logged by Celery


def bound_shutdown(grace_seconds: float) -> None:
    """In the worker's main process: a warm shutdown waits for running steps at most
    ``grace_seconds``, then the process and its pool processes are killed."""

    def shutting_down(**_: Any) -> None:
        timer = threading.Timer(grace_seconds, _grace_over, args=(grace_seconds,))
        timer.name, timer.daemon = "saga-shutdown-grace", True
        timer.start()

    signals.worker_shutting_down.connect(shutting_down, weak=False)


def _grace_over(grace_seconds: float) -> None:
    from billiard import process  # Celery's multiprocessing: the prefork pool's children

    log.error(
        "steps were still running %s s after shutdown began (SAGA_SHUTDOWN_GRACE_SECONDS); "
        "exiting now: their leases run out and other workers take them over",
        grace_seconds,
    )
    for child in process.active_children():
        if child.pid:
            with contextlib.suppress(ProcessLookupError):
                os.kill(child.pid, signal.SIGKILL)
    os._exit(1)
