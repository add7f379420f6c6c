"""The worker's intake: every delivered message is vetted before Celery acts on any of it.

Celery and kombu act on many fields of a task message: a body of the wrong shape raises out of
the consumer and stops the worker, ``eta`` holds a message in memory past the prefetch limit,
``timelimit`` has a pool child killed, ``callbacks``/``chain`` publish further messages, and
any registered task (Celery's built-ins too) runs by name. The engine sends none of that: only
``saga.step``/``saga.advance``, JSON, keyword arguments naming a step. Anything else is rejected
without requeue (gone from the queue), with one log line naming its task id and the cause, and
the worker goes on with the next message.

Two depths: ``GuardedConsumer`` (Celery's ``worker_consumer``) vets each task message before
Celery's strategy sees it. Below it, the consumer's connection uses kombu transports that fail
no message inside kombu or py-amqp, before any Celery callback: they refuse a ``compression``
header before decompressing (a small body can inflate to gigabytes), drop Redis list items that
are not a kombu envelope (not JSON, not an object, a body that is not base64), and deliver a
RabbitMQ message whose properties py-amqp cannot decode (not UTF-8) marked for rejection.
"""

from __future__ import annotations

import json
import logging
import sys
from collections import defaultdict
from collections.abc import Mapping
from struct import unpack_from
from typing import Any

from amqp import spec
from amqp.basic_message import Message as AMQPMessage
from amqp.exceptions import UnexpectedFrame
from celery import signals
from celery.worker.consumer import Consumer
from kombu.transport import pyamqp as kombu_amqp
from kombu.transport import redis as kombu_redis
from kombu.transport.virtual import Message as VirtualMessage
from pydantic import BaseModel

from saga.errors import MalformedMessageError, UnsignedMessageError
from saga.messages import ADVANCE_TASK, STEP_TASK, AdvanceMessage, StepMessage, parse
from saga.metrics import message_rejected
from saga.signing import MessageKeys

log = logging.getLogger("saga.worker")

MODELS: dict[str, type[BaseModel]] = {STEP_TASK: StepMessage, ADVANCE_TASK: AdvanceMessage}

# The engine's bodies are well under 1 KiB (a run id and a step key); headers carry a trace
# context. Far above both, far below what would strain a worker.
MAX_BODY_BYTES = 16 * 1024
MAX_HEADERS_BYTES = 16 * 1024

# Header fields through which a message makes Celery schedule it later, expire it, limit its
# time (the engine sets step timeouts from the journal), rename it, or start other work.
SIDE_DOORS = (
    "eta",
    "countdown",
    "expires",
    "timelimit",
    "time_limit",
    "soft_time_limit",
    "shadow",
    "group",
    "group_index",
    "chord",
    "chain",
    "callbacks",
    "errbacks",
    "link",
    "link_error",
)


def _unset(value: Any) -> bool:
    """None, empty, or all None (Celery sends ``timelimit: [null, null]``)."""
    if isinstance(value, list | tuple):
        return all(v is None for v in value)
    return value is None or value == {} or value == ""


def one_line(text: object) -> str:
    """``text`` kept to one log line: a forged field may carry line breaks."""
    return str(text).replace("\r", "\\r").replace("\n", "\\n")


def task_id_of(headers: Any) -> str:
    """The message's task id, fit for one log line (a forged id may hold anything)."""
    task_id = headers.get("id") if isinstance(headers, Mapping) else None
    if isinstance(task_id, str) and 0 < len(task_id) <= 200 and task_id.isprintable():
        return task_id
    return "(no task id)" if task_id is None else f"(bad task id {task_id!r:.60})"


def vet(message: Any, keys: MessageKeys | None = None) -> None:
    """Raise MalformedMessageError naming the cause unless ``message`` is a task message the
    engine could have sent: a protocol 2 JSON message of one of its tasks, keyword arguments
    only, that fit the task's model, and no side-door field set; with ``keys`` (signing on),
    signed by one of them (UnsignedMessageError otherwise)."""
    headers = message.headers
    if not isinstance(headers, Mapping) or "task" not in headers:
        raise MalformedMessageError("not a Celery protocol 2 task message (no task header)")
    name = headers["task"]
    if not isinstance(name, str) or name not in MODELS:
        raise MalformedMessageError(
            f"unknown task {name!r:.100}: this worker runs only {STEP_TASK} and {ADVANCE_TASK}"
        )
    if task_id_of(headers).startswith("("):
        raise MalformedMessageError("the task id is missing or not a short printable string")
    if message.content_type != "application/json" or message.content_encoding != "utf-8":
        raise MalformedMessageError(
            f"content type {message.content_type!r:.60} ({message.content_encoding!r:.30}) is "
            "refused: only application/json in utf-8 is accepted (pickle runs code from messages)"
        )
    for field in SIDE_DOORS:
        if not _unset(headers.get(field)):
            raise MalformedMessageError(
                f"sets {field}={headers[field]!r:.60}, which the engine never sends"
            )
    if len(json.dumps(headers, default=str)) > MAX_HEADERS_BYTES:
        raise MalformedMessageError(f"its headers exceed {MAX_HEADERS_BYTES} bytes")
    body = message.body
    if not isinstance(body, bytes | str):
        raise MalformedMessageError(f"the body is a {type(body).__name__}, not bytes")
    if len(body) > MAX_BODY_BYTES:
        raise MalformedMessageError(f"the body has {len(body)} bytes, over {MAX_BODY_BYTES}")
    try:
        decoded = message.decode()
    except Exception as exc:  # kombu wraps the serializer's error types, but not all of them
        raise MalformedMessageError(f"the body is not JSON: {exc!s:.200}") from None
    if not isinstance(decoded, list) or len(decoded) != 3:
        raise MalformedMessageError(
            f"the body is {decoded!r:.80}, not [args, kwargs, embed] (Celery protocol 2)"
        )
    args, kwargs, embed = decoded
    if not isinstance(args, list) or not isinstance(kwargs, dict):
        raise MalformedMessageError("the body's args are not a list or its kwargs not an object")
    if embed is not None and not isinstance(embed, dict):
        raise MalformedMessageError(f"the body's embed is {embed!r:.60}, not an object")
    for field, value in (embed or {}).items():
        if not _unset(value):
            raise MalformedMessageError(
                f"embeds {field}={value!r:.60}: the engine never sends other work in a message"
            )
    if keys is not None:
        keys.verify(name, headers["id"], args, kwargs, headers)
    parse(MODELS[name], args, kwargs)


class GuardedConsumer(Consumer):  # type: ignore[misc]
    """Celery's consumer, vetting each message first (``worker_consumer`` names it)."""

    def create_task_handler(self, *args: Any, **kwargs: Any) -> Any:
        handle = super().create_task_handler(*args, **kwargs)
        settings = getattr(self.app, "saga_settings", None)  # a SagaCelery app's
        keys = None if settings is None else MessageKeys.from_settings(settings)

        def on_task_received(message: Any) -> None:
            try:
                vet(message, keys)
            except MalformedMessageError as exc:
                self.refuse(message, exc)
                return
            except Exception as exc:  # a field the vetting did not foresee: refused all the same
                cause = f"cannot vet it: {type(exc).__name__}: {exc!s:.200}"
                self.refuse(message, MalformedMessageError(cause))
                return
            try:
                handle(message)
            except Exception as exc:
                if self._connection_error(exc):
                    raise  # the consumer reconnects; the broker redelivers
                # Celery failed on a message that passed the vetting: still no reason to stop.
                self.refuse(message, exc)

        return on_task_received

    def update_strategies(self) -> None:
        """Strategies for the engine's tasks only: no other registered task (Celery's built-ins
        included) is runnable by a message, whatever the vetting lets through."""
        super().update_strategies()
        for name in [n for n in self.strategies if n not in MODELS]:
            del self.strategies[name]

    def on_decode_error(self, message: Any, exc: Exception) -> None:
        """kombu could not read the message (an AMQP message kombu refuses, say): one line, not
        Celery's traceback, and rejected like the rest."""
        self.refuse(message, MalformedMessageError(f"cannot decode it: {exc!s:.200}"))

    def refuse(self, message: Any, exc: Exception) -> None:
        unsigned = isinstance(exc, UnsignedMessageError)
        log.error(  # never the body: a forged message may carry anything
            "rejected %s task message %s: %s",
            "unsigned" if unsigned else "malformed",
            task_id_of(getattr(message, "headers", None)),
            one_line(exc),
        )
        message_rejected(unsigned)
        if not hasattr(message, "reject_log_error"):
            # A raw py-amqp frame: kombu failed to make a message of it (on_decode_error).
            message.channel.basic_reject(message.delivery_tag, requeue=False)
        elif not message.acknowledged:
            message.reject_log_error(log, self.connection_errors, requeue=False)
        signals.task_rejected.send(sender=self, message=message, exc=exc)

    def _connection_error(self, exc: Exception) -> bool:
        # kombu's Redis transport counts KeyError among connection errors (a stale poller fd);
        # raised from here it is Celery failing on a field, not the connection.
        return isinstance(exc, self.connection_errors) and not isinstance(exc, KeyError)

    def connection_for_read(self, heartbeat: float | None = None) -> Any:
        return self.ensure_connected(guard(self.app.connection_for_read(heartbeat=heartbeat)))


def guard(connection: Any) -> Any:
    """``connection``, set to consume through the guarded subclass of its kombu transport if
    there is one (another transport, Redis Sentinel say, gets the consumer's vetting only)."""
    guarded = GUARDED_TRANSPORTS.get(connection.get_transport_cls())
    if guarded is not None:
        connection.transport_cls = guarded  # read when the transport is made, on connecting
    return connection


COMPRESSED = (
    "compressed ({!r:.40}): the engine sends no compressed messages, and a small one can "
    "inflate to gigabytes when kombu decompresses it"
)


def _refused_compression(headers: Any) -> list[Any]:
    """kombu's ``Message.errors`` for a compressed message: kombu then skips decompressing and
    hands it to the consumer's ``on_decode_error``, which rejects it."""
    compression = headers.get("compression") if isinstance(headers, Mapping) else None
    return _refused(COMPRESSED.format(compression)) if compression else []


class UnreadableMessageError(MalformedMessageError):
    """A Redis list item kombu cannot make a message of: ``<task id>: <cause>``."""


class _GuardedMessage(VirtualMessage):
    def __init__(self, payload: Any, channel: Any = None, **kwargs: Any) -> None:
        problem = _envelope_problem(payload)
        if problem is None:
            try:
                super().__init__(payload, channel, **kwargs)  # type: ignore[no-untyped-call]
                return
            except Exception as exc:  # the base64 codec, an unknown body encoding
                problem = f"kombu cannot read it: {type(exc).__name__}: {exc!s:.120}"
        headers = payload.get("headers") if isinstance(payload, dict) else None
        raise UnreadableMessageError(f"{task_id_of(headers)}: {problem}")


def _envelope_problem(payload: Any) -> str | None:
    """What keeps kombu's Redis transport from reading ``payload``, if anything (it would raise
    out of the consumer and stop the worker, or be taken for a lost connection)."""
    if not isinstance(payload, dict):
        return f"the Redis envelope is a JSON {type(payload).__name__}, not an object"
    properties = payload.get("properties")
    if not isinstance(properties, dict):
        return "the Redis envelope has no properties object"
    if not isinstance(properties.get("delivery_tag"), str):
        return "the Redis envelope has no delivery tag"
    info = properties.get("delivery_info")
    if not isinstance(info, dict) or "exchange" not in info or "routing_key" not in info:
        return "the Redis envelope has no delivery_info with exchange and routing_key"
    headers = payload.get("headers") or {}
    if not isinstance(headers, dict):
        return "the Redis envelope's headers are not an object"
    if headers.get("compression"):
        return COMPRESSED.format(headers["compression"])
    return None


class _GuardedChannel(kombu_redis.Channel):
    Message = _GuardedMessage

    def _brpop_read(self, **options: Any) -> Any:
        # By now BRPOP has taken the item off the list: logging and returning drops it.
        try:
            return super()._brpop_read(**options)  # type: ignore[no-untyped-call]
        except UnreadableMessageError as exc:
            log.error("rejected malformed task message %s", one_line(exc))
            message_rejected(False)
            return True
        except (ValueError, TypeError, AttributeError, ArithmeticError, KeyError) as exc:
            # kombu's loads() of the item: not UTF-8, not JSON, or a bad kombu type marker.
            # What runs after it (the consumer) lets only connection errors out.
            log.error(
                "rejected malformed task message (no task id): a Redis list item that is not "
                "a kombu envelope: %s: %.200s",
                type(exc).__name__,
                one_line(exc),
            )
            message_rejected(False)
            return True


class GuardedRedisTransport(kombu_redis.Transport):
    """kombu's Redis transport for consuming, dropping what is not a kombu envelope."""

    Channel = _GuardedChannel


class _GuardedAMQPMessage(kombu_amqp.Message):
    def __init__(self, msg: Any, channel: Any = None, **kwargs: Any) -> None:
        unreadable = getattr(msg, "saga_unreadable", None)  # set by guarded_frame_handler
        if unreadable:
            self.errors = _refused(unreadable)
        else:
            self.errors = _refused_compression(msg.properties.get("application_headers"))
        super().__init__(msg, channel, **kwargs)  # type: ignore[no-untyped-call]


def _refused(cause: str) -> list[Any]:
    try:
        raise MalformedMessageError(cause)
    except MalformedMessageError:
        return [sys.exc_info()]


_CONTENT_METHODS = frozenset([spec.Basic.Return, spec.Basic.Deliver, spec.Basic.GetOk])


def guarded_frame_handler(connection: Any, callback: Any) -> Any:
    """py-amqp's ``frame_handler`` (amqp/method_framing.py, 5.x), except that a message whose
    properties cannot be decoded (a content type that is not UTF-8, say) is delivered without
    them, marked unreadable, for the consumer to reject. py-amqp's own raises out of the
    connection with the message unacked: the worker stops, and so does each one it is
    redelivered to."""
    expected_types: defaultdict[int, int] = defaultdict(lambda: 1)
    partial_messages: dict[int, Any] = {}

    def on_frame(frame: tuple[int, int, Any]) -> bool:
        frame_type, channel, buf = frame
        connection.bytes_recv += 1
        if frame_type not in (expected_types[channel], 8):
            raise UnexpectedFrame(
                f"Received frame {frame_type} while expecting type: {expected_types[channel]}"
            )
        if frame_type == 1:
            method_sig = unpack_from(">HH", buf, 0)
            if method_sig in _CONTENT_METHODS:
                partial_messages[channel] = AMQPMessage(frame_method=method_sig, frame_args=buf)
                expected_types[channel] = 2
                return False
            callback(channel, method_sig, buf, None)
        elif frame_type == 2:
            msg = partial_messages[channel]
            try:
                msg.inbound_header(buf)
            except Exception as exc:  # the properties; the body size before them was read
                msg.properties = {}
                msg.saga_unreadable = f"its AMQP properties cannot be decoded: {exc!s:.120}"
                msg.ready = not msg.body_size
            if not msg.ready:
                expected_types[channel] = 3
                return False
            expected_types[channel] = 1
            partial_messages.pop(channel, None)
            callback(channel, msg.frame_method, msg.frame_args, msg)
        elif frame_type == 3:
            msg = partial_messages[channel]
            msg.inbound_body(buf)
            if not msg.ready:
                return False
            expected_types[channel] = 1
            partial_messages.pop(channel, None)
            callback(channel, msg.frame_method, msg.frame_args, msg)
        elif frame_type == 8:
            return False
        return True

    return on_frame


class _GuardedAMQPChannel(kombu_amqp.Channel):
    Message = _GuardedAMQPMessage


class _GuardedAMQPConnection(kombu_amqp.Connection):
    Channel = _GuardedAMQPChannel

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        kwargs.setdefault("frame_handler", guarded_frame_handler)
        super().__init__(*args, **kwargs)


class GuardedAMQPTransport(kombu_amqp.Transport):
    """kombu's py-amqp transport for consuming, refusing compressed messages undecompressed."""

    Connection = _GuardedAMQPConnection


class GuardedAMQPSSLTransport(kombu_amqp.SSLTransport):
    """The same, over TLS (``amqps://``)."""

    Connection = _GuardedAMQPConnection


GUARDED_TRANSPORTS: dict[type[Any], type[Any]] = {
    kombu_redis.Transport: GuardedRedisTransport,
    kombu_amqp.Transport: GuardedAMQPTransport,
    kombu_amqp.SSLTransport: GuardedAMQPSSLTransport,
}
