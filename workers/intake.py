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
are not a kombu envelope (not JSON, not an object, a body that is not base64) and broadcasts
on its pub/sub channels that kombu or Celery cannot read, and deliver a
RabbitMQ message whose properties py-amqp cannot decode (not UTF-8) marked for rejection.
"""

from __future__ import annotations

import json
import logging
import re
import sys
from collections import defaultdict
from collections.abc import Mapping
from queue import Empty
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
from saga.keys import COMPENSATION_PREFIX
from saga.messages import (
    ADVANCE_TASK,
    START_TASK,
    STEP_TASK,
    AdvanceMessage,
    StartMessage,
    StepMessage,
    parse,
)
from saga.metrics import message_rejected
from saga.signing import MessageKeys
from saga.workers.registry import installed

log = logging.getLogger("saga.worker")

MODELS: dict[str, type[BaseModel]] = {
    STEP_TASK: StepMessage,
    ADVANCE_TASK: AdvanceMessage,
    START_TASK: StartMessage,
}

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


def vet(message: Any, keys: MessageKeys | None = None, *, strict: bool = True) -> BaseModel | None:
    """Raise MalformedMessageError naming the cause unless ``message`` is a task message the
    engine could have sent: a protocol 2 JSON message of one of its tasks, keyword arguments
    only, that fit the task's model, and no side-door field set; with ``keys`` (signing on),
    signed by one of them (UnsignedMessageError otherwise). Returns its arguments.

    Not ``strict`` (the engine on the user's own app): a message naming another task is the
    app's own business, and goes to Celery as it came (None)."""
    headers = message.headers
    if not isinstance(headers, Mapping) or "task" not in headers:
        if not strict:
            return None
        raise MalformedMessageError("not a Celery protocol 2 task message (no task header)")
    name = headers["task"]
    if not isinstance(name, str) or name not in MODELS:
        if not strict:
            return None
        raise MalformedMessageError(
            f"unknown task {name!r:.100}: this worker runs only {', '.join(MODELS)}"
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
    return parse(MODELS[name], args, kwargs)


def shadow_name(arguments: BaseModel) -> str | None:
    """The name Celery's tools show for an engine task (its shadow name): the step's name, so
    that events and Flower count each step's attempts apart. ``saga.step[book_flight]`` for a
    step (``book_flight#4`` in a workflow, ``book_flight[2]`` in a fan-out),
    ``saga.compensate[book_flight]`` for its compensation, ``saga.start[<schedule>]``."""
    if isinstance(arguments, StepMessage):
        key = arguments.step_key
        task = "saga.step"
        if key.startswith(COMPENSATION_PREFIX):
            key, task = key[len(COMPENSATION_PREFIX) :], "saga.compensate"
        return f"{task}[{_POSITION.sub('', key)[:200]}]"
    if isinstance(arguments, StartMessage):
        return f"{START_TASK}[{(arguments.schedule or arguments.saga)[:200]}]"
    return None


_POSITION = re.compile(r"(#\d+|\[\d+\])$")  # a workflow position, a fan-out index


class GuardedConsumer(Consumer):  # type: ignore[misc]
    """Celery's consumer, vetting each message first (``worker_consumer`` names it).

    Strict (``saga worker``): nothing but the engine's tasks runs. On the user's own app the
    engine's tasks are vetted the same way and the app's other tasks go to Celery as usual.
    Remote control answers inspection commands only (``saga.workers.control``)."""

    strict = True

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        from saga.workers import control

        install = installed(self.app)
        self.strict = install is None or install.exclusive
        control.restrict(self)

    def create_task_handler(self, *args: Any, **kwargs: Any) -> Any:
        handle = super().create_task_handler(*args, **kwargs)
        install = installed(self.app)
        keys = None if install is None else MessageKeys.from_settings(install.settings)

        def on_task_received(message: Any) -> None:
            try:
                arguments = vet(message, keys, strict=self.strict)
                shadow = None if arguments is None else shadow_name(arguments)
                if shadow is not None:
                    message.headers["shadow"] = shadow  # read by Celery's request: events, logs
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
        if self.strict:
            for name in [n for n in self.strategies if n not in MODELS]:
                del self.strategies[name]
        for name in MODELS:
            if name in self.strategies:
                self.strategies[name] = self._vetted_only(name, self.strategies[name])

    def _vetted_only(self, name: str, strategy: Any) -> Any:
        """``strategy`` (Celery's for the engine task ``name``), run only for a message whose
        task header names it, the one the vetting checked. Celery reads a message with no task
        header as protocol 1 and takes the task from its body: on the user's own app, with
        pickle accepted, such a message would run the engine's task unvetted and unsigned."""

        def run(message: Any, *args: Any, **kwargs: Any) -> Any:
            headers = message.headers
            if not isinstance(headers, Mapping) or headers.get("task") != name:
                self.refuse(
                    message,
                    MalformedMessageError(
                        f"names the engine's task {name} without a Celery protocol 2 task "
                        "header: only a vetted protocol 2 message runs it"
                    ),
                )
                return None
            return strategy(message, *args, **kwargs)

        return run

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
        connection = self.app.connection_for_read(heartbeat=heartbeat)
        return self.ensure_connected(guard(connection, strict=self.strict))


def guard(connection: Any, *, strict: bool = True) -> Any:
    """``connection``, set to consume through the guarded subclass of its kombu transport if
    there is one (another transport, Redis Sentinel say, gets the consumer's vetting only).
    Not ``strict``: compressed messages are refused only when they name an engine task."""
    transports = GUARDED_TRANSPORTS if strict else SHARED_TRANSPORTS
    guarded = transports.get(connection.get_transport_cls())
    if guarded is not None:
        # Read when the transport is made, on connecting. By name: `celery inspect stats`
        # reports it, in JSON.
        connection.transport_cls = f"{guarded.__module__}:{guarded.__qualname__}"
    return connection


COMPRESSED = (
    "compressed ({!r:.40}): the engine sends no compressed messages, and a small one can "
    "inflate to gigabytes when kombu decompresses it"
)


def _compression_refused(headers: Any, strict: bool) -> str | None:
    """Why a compressed message is refused, if it is: any (strict), else one naming an engine
    task (the app's own tasks may be compressed, as the app decides)."""
    if not isinstance(headers, Mapping) or not headers.get("compression"):
        return None
    if strict or headers.get("task") in MODELS:
        return COMPRESSED.format(headers["compression"])
    return None


def _refused_compression(headers: Any, strict: bool = True) -> list[Any]:
    """kombu's ``Message.errors`` for a compressed message: kombu then skips decompressing and
    hands it to the consumer's ``on_decode_error``, which rejects it."""
    cause = _compression_refused(headers, strict)
    return _refused(cause) if cause else []


class UnreadableMessageError(MalformedMessageError):
    """A Redis list item kombu cannot make a message of: ``<task id>: <cause>``."""


class _GuardedMessage(VirtualMessage):
    strict = True

    def __init__(self, payload: Any, channel: Any = None, **kwargs: Any) -> None:
        problem = _envelope_problem(payload, self.strict)
        if problem is None:
            try:
                super().__init__(payload, channel, **kwargs)  # type: ignore[no-untyped-call]
                return
            except Exception as exc:  # the base64 codec, an unknown body encoding
                problem = f"kombu cannot read it: {type(exc).__name__}: {exc!s:.120}"
        headers = payload.get("headers") if isinstance(payload, dict) else None
        raise UnreadableMessageError(f"{task_id_of(headers)}: {problem}")


def _envelope_problem(payload: Any, strict: bool = True) -> str | None:
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
    return _compression_refused(headers, strict)


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
        except Exception as exc:
            if isinstance(exc, Empty) or self._connection_error(exc):
                raise
            # kombu's loads() of the item: not UTF-8, not JSON, nested past the recursion
            # limit, a bad kombu type marker. What runs after it (the consumer) lets only
            # connection errors out.
            log.error(
                "rejected malformed task message (no task id): a Redis list item that is not "
                "a kombu envelope: %s: %.200s",
                type(exc).__name__,
                one_line(exc),
            )
            message_rejected(False)
            return True

    def _receive_one(self, c: Any) -> Any:
        """A message on a fanout exchange (remote control: ``celery.pidbox``), which any client
        of the Redis server can PUBLISH: one that kombu or Celery cannot read is dropped with
        one line. kombu catches only a body that is not JSON; anything else stopped the
        worker."""
        try:
            return super()._receive_one(c)  # type: ignore[no-untyped-call]
        except Exception as exc:
            if isinstance(exc, Empty) or self._connection_error(exc):
                raise
            log.error(
                "ignored a malformed broadcast message: %s: %.200s",
                type(exc).__name__,
                one_line(exc),
            )
            message_rejected(False)
            return True

    def _connection_error(self, exc: Exception) -> bool:
        # As GuardedConsumer's: kombu counts KeyError among Redis connection errors, but raised
        # while reading an item it is the item's fault.
        return isinstance(exc, self.connection_errors) and not isinstance(exc, KeyError)


class GuardedRedisTransport(kombu_redis.Transport):
    """kombu's Redis transport for consuming, dropping what is not a kombu envelope."""

    Channel = _GuardedChannel


class _GuardedAMQPMessage(kombu_amqp.Message):
    strict = True

    def __init__(self, msg: Any, channel: Any = None, **kwargs: Any) -> None:
        unreadable = getattr(msg, "saga_unreadable", None)  # set by guarded_frame_handler
        if unreadable:
            self.errors = _refused(unreadable)
        else:
            headers = msg.properties.get("application_headers")
            self.errors = _refused_compression(headers, self.strict)
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


# The same on the user's own app: compressed messages of the app's own tasks pass.
class _SharedMessage(_GuardedMessage):
    strict = False


class _SharedChannel(_GuardedChannel):
    Message = _SharedMessage


class SharedRedisTransport(GuardedRedisTransport):
    Channel = _SharedChannel


class _SharedAMQPMessage(_GuardedAMQPMessage):
    strict = False


class _SharedAMQPChannel(_GuardedAMQPChannel):
    Message = _SharedAMQPMessage


class _SharedAMQPConnection(_GuardedAMQPConnection):
    Channel = _SharedAMQPChannel


class SharedAMQPTransport(GuardedAMQPTransport):
    Connection = _SharedAMQPConnection


class SharedAMQPSSLTransport(GuardedAMQPSSLTransport):
    Connection = _SharedAMQPConnection


SHARED_TRANSPORTS: dict[type[Any], type[Any]] = {
    kombu_redis.Transport: SharedRedisTransport,
    kombu_amqp.Transport: SharedAMQPTransport,
    kombu_amqp.SSLTransport: SharedAMQPSSLTransport,
}
