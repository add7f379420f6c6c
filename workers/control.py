"""Celery remote control on a worker that runs saga steps: inspection only.

``celery inspect ping/active/stats`` (a liveness probe, Flower) answer as usual. Commands that
would stop or stall the worker, or drop messages the journal counts on, are answered with an
error and do nothing: ``shutdown``, ``pool_restart``, ``revoke``/``terminate`` (a revoked id is
acked unrun), ``add_consumer``/``cancel_consumer``, rate and time limits, autoscaling, memory
dumps. Broadcast messages are read as JSON only, whatever the app accepts for its tasks.
"""

from __future__ import annotations

import functools
from typing import Any

ALLOWED = frozenset(
    {
        "ping",
        "stats",
        "active",
        "reserved",
        "scheduled",
        "registered",
        "active_queues",
        "query_task",
        "clock",
        "report",
        "revoked",
        "enable_events",  # Flower turns events on this way; they cost a little, stop nothing
        "disable_events",
        "heartbeat",
    }
)


def _refused(name: str) -> Any:
    def handler(state: Any, **_: Any) -> dict[str, str]:
        return {
            "error": f"{name!r} is refused by this worker (it runs saga steps): only inspection "
            "commands are accepted; stop a worker with SIGTERM"
        }

    return handler


def restrict(consumer: Any) -> None:
    """Limit the remote control of ``consumer`` (a Celery worker consumer) to ``ALLOWED``."""
    for step in consumer.blueprint.steps.values():
        node = getattr(getattr(step, "box", None), "node", None)
        if node is None:
            continue
        # On the node, not Celery's handler table, which every worker in the process shares.
        node.handle = _known_only(node.handle)
        node.Consumer = functools.partial(node.Consumer, accept=["json"])


def _known_only(handle: Any) -> Any:
    """Only allowed commands run; any other name (sent by anyone) gets a clear reply instead of
    running, or of a KeyError, which would make Celery reset the control channel."""

    def checked(method: Any, arguments: Any = None) -> Any:
        if not isinstance(method, str) or method not in ALLOWED:
            return _refused(str(method)[:60])(None)
        if arguments is not None and not isinstance(arguments, dict):
            return {"error": "control arguments must be a JSON object"}
        return handle(method, arguments)

    return checked
