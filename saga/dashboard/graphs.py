"""The step graphs of graph sagas, read from their definitions (by ``saga_ref``) when this
process can import them, for the run page. A workflow written as code has no graph: its page
shows the steps in the order the run scheduled them."""

from __future__ import annotations

import logging
import threading

from saga.definition import Saga
from saga.loader import load_definition

log = logging.getLogger("saga.dashboard")

Graph = dict[str, tuple[str, ...]]  # step name -> the steps it comes after


class Graphs:
    def __init__(self) -> None:
        self._known: dict[str, Graph | None] = {}
        self._lock = threading.Lock()

    def of(self, saga_ref: str) -> Graph | None:
        with self._lock:
            if saga_ref not in self._known:
                self._known[saga_ref] = _load(saga_ref)
            return self._known[saga_ref]


def _load(saga_ref: str) -> Graph | None:
    try:
        definition = load_definition(saga_ref)
    except Exception as exc:  # importing the user's module can raise anything: no graph then
        log.info("no step graph for %s (its module does not import here: %s)", saga_ref, exc)
        return None
    if not isinstance(definition, Saga):
        return None
    return {s.name: s.after for s in definition.steps}
