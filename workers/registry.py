"""Which Celery apps have the engine installed, and each one's per-process executor.

Nothing is kept on the app object (any ``Celery()`` works, no subclass): an install is found by
app here, and its executor (Postgres pool, lease keeper, publisher) is made per process, after
fork, on first use.
"""

from __future__ import annotations

import os
import threading
import weakref
from dataclasses import dataclass, field
from typing import Any

from celery import Celery

from saga.errors import ConfigurationError
from saga.settings import Settings


@dataclass
class Installation:
    """The engine on one app: its settings and this process's executor and client."""

    settings: Settings
    exclusive: bool  # the app runs the engine's tasks only (``saga worker``)
    checked: bool = False  # start-up checks done (``saga worker`` runs them before Celery)
    _executor: Any = None
    _client: Any = None
    _pid: int | None = None
    _lock: threading.Lock = field(default_factory=threading.Lock)

    def _fresh(self) -> None:
        # Connections and threads do not survive fork: a child makes its own.
        if self._pid != os.getpid():
            self._executor = self._client = None
            self._pid = os.getpid()

    def executor(self, app: Celery) -> Any:
        with self._lock:
            self._fresh()
            if self._executor is None:
                from saga.workers.executor import StepExecutor

                self._executor = StepExecutor(
                    self.settings, app, consumed_queues(app, self.settings)
                )
            return self._executor

    def client(self) -> Any:
        with self._lock:
            self._fresh()
            if self._client is None:
                from saga.client import SagaClient

                self._client = SagaClient(self.settings)
            return self._client

    def shutdown(self) -> None:
        """At process exit: mark the fast path's last publishes (else a relay sends them again,
        a fenced duplicate) and leave the worker registry."""
        with self._lock:
            if self._pid != os.getpid():
                return
            executor, client, self._executor, self._client = (
                self._executor,
                self._client,
                None,
                None,
            )
        if executor is not None:
            executor.marks.flush()
            executor.leases.stop()
        if client is not None:
            client.close()


_INSTALLED: weakref.WeakKeyDictionary[Celery, Installation] = weakref.WeakKeyDictionary()


def register(app: Celery, install: Installation) -> None:
    _INSTALLED[app] = install


def installed(app: Celery) -> Installation | None:
    """The engine's install on ``app``, if any."""
    return _INSTALLED.get(app)


def installation(app: Celery) -> Installation:
    try:
        return _INSTALLED[app]
    except KeyError:
        raise ConfigurationError(
            f"the engine is not installed on Celery app {app.main!r}: call "
            f"saga.celery.install(app) where the app is made"
        ) from None


def consumed_queues(app: Celery, settings: Settings) -> list[str]:
    """The queues this worker reads (``-Q a,b``): the worker registry recovers their steps
    when it dies."""
    try:
        names = [str(name) for name in app.amqp.queues.consume_from]
    except Exception:  # not a worker, or no queues configured yet
        names = []
    return names or [settings.queue]
