"""Which Celery apps have the engine installed, and each one's per-process executor.

Nothing is kept on the app object (any ``Celery()`` works, no subclass): an install is found by
app here, and its executor (Postgres pool, lease keeper, publisher) is made per process, after
fork, on first use.
"""

from __future__ import annotations

import os
import threading
import weakref
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any, TypeVar

from celery import Celery

from saga.errors import ConfigurationError
from saga.settings import Settings

T = TypeVar("T")


@dataclass
class Installation:
    """The engine on one app: its settings, and what this process made for it (its executor,
    a client for scheduled starts), made once per process and dropped after fork."""

    settings: Settings
    exclusive: bool  # the app runs the engine's tasks only (``saga worker``)
    checked: bool = False  # start-up checks done (``saga worker`` runs them before Celery)
    _made: dict[str, Any] = field(default_factory=dict)
    _pid: int | None = None
    _lock: threading.Lock = field(default_factory=threading.Lock)

    def per_process(self, name: str, make: Callable[[], T]) -> T:
        """This process's ``name``, made by ``make`` on first use."""
        with self._lock:
            if self._pid != os.getpid():  # connections and threads do not survive fork
                self._made, self._pid = {}, os.getpid()
            if name not in self._made:
                self._made[name] = make()
            made: T = self._made[name]
            return made

    def release(self) -> dict[str, Any]:
        """What this process made, for closing at its exit (nothing made before a fork)."""
        with self._lock:
            if self._pid != os.getpid():
                return {}
            made, self._made = self._made, {}
            return made


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
