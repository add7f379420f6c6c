"""Celery remote control on a worker that runs saga steps: inspection only.

``celery inspect ping/active/stats`` (a liveness probe, Flower) answer as usual. Commands that
would stop or stall the worker, or drop messages the journal counts on, are answered with an
error and do nothing: ``shutdown``, ``pool_restart``, ``revoke``/``terminate`` (a revoked id is
acked unrun), ``add_consumer``/``cancel_consumer``, rate and time limits, autoscaling, memory
dumps. Broadcast messages are read as JSON only, whatever the app accepts for its tasks, with
Celery's fields only, and a host name pattern only as a glob (kombu runs a "pcre" one on the
consumer loop: a pattern that backtracks stalls the worker).
"""

from __future__ import annotations

import functools
import logging
from typing import Any

log = logging.getLogger("saga.worker")

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
        box: Any = getattr(step, "box", None)
        node = getattr(box, "node", None)
        if node is None:
            continue
        # On the node, not Celery's handler table, which every worker in the process shares.
        node.handle = _known_only(node.handle)
        box.on_message = _well_formed_only(box.on_message)
        node.Consumer = functools.partial(node.Consumer, accept=["json"])


def _well_formed_only(on_message: Any) -> Any:
    """A broadcast body kombu's node cannot read is dropped with one line: Celery would log a
    traceback and reset the control channel, after which this worker answered no more."""

    def checked(body: Any, message: Any) -> None:
        problem = _body_problem(body) or _headers_problem(getattr(message, "headers", None))
        if problem is not None:
            log.error("ignored a malformed remote control message: %s", problem)
            return
        on_message(body, message)

    return checked


def _body_problem(body: Any) -> str | None:
    if not isinstance(body, dict):
        return f"the body is a {type(body).__name__}, not an object"
    unknown = sorted(str(k)[:40] for k in body if k not in _FIELDS)
    if unknown:
        return f"it has fields {', '.join(unknown)[:200]!r}, which Celery never sends"
    if not isinstance(body.get("method"), str):
        return "it names no method"
    for name, kinds in _FIELDS.items():
        if body.get(name) is not None and not isinstance(body[name], kinds):
            return f"its {name} is a {type(body[name]).__name__}"
    if body.get("matcher") not in (None, "glob"):
        # kombu's pcre matcher runs the sender's regular expression on the consumer loop: one
        # with catastrophic backtracking stalls the worker for hours.
        return f"its matcher {body['matcher'][:40]!r} is refused: only glob is accepted"
    reply_to = body.get("reply_to")
    if reply_to is not None and not all(
        isinstance(reply_to.get(k), str) for k in ("exchange", "routing_key")
    ):
        return "its reply_to has no exchange and routing key"
    return None


def _headers_problem(headers: Any) -> str | None:
    """kombu adjusts its clock to ``headers["clock"]``: anything but an int raised, and Celery
    reset the control channel."""
    clock = headers.get("clock") if isinstance(headers, dict) else None
    if clock is not None and (not isinstance(clock, int) or isinstance(clock, bool)):
        return f"its clock header is a {type(clock).__name__}, not an integer"
    return None


# Every field Celery's control messages carry, and its type.
_FIELDS: dict[str, type | tuple[type, ...]] = {
    "method": str,
    "arguments": dict,
    "destination": (list, tuple),
    "pattern": str,
    "matcher": str,
    "reply_to": dict,
    "ticket": str,
}


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
