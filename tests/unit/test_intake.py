"""The worker's intake vetting: what the engine sends passes, every side door is refused.

Messages are built by Celery's own protocol 2 builder (``app.amqp.as_task_v2``), so a Celery
upgrade that changes what the engine sends shows here, not as a worker refusing every step.
"""

from __future__ import annotations

import json
import uuid
from typing import Any
from unittest.mock import ANY

import pytest
from kombu import Message

from saga.errors import MalformedMessageError
from saga.messages import ADVANCE_TASK, STEP_TASK, StepMessage, parse
from saga.settings import Settings
from saga.workers.app import create_app
from saga.workers.intake import (
    MAX_BODY_BYTES,
    GuardedAMQPSSLTransport,
    GuardedAMQPTransport,
    GuardedRedisTransport,
    guard,
    vet,
)

APP = create_app(Settings(broker_url="memory://", database_url="postgresql://x/y"))
STEP = {"run_id": "r-1", "step_key": "step1"}


def built(name: str = STEP_TASK, kwargs: Any = None, **options: Any) -> Message:
    """A task message as Celery builds it, as the worker receives it."""
    task = APP.amqp.as_task_v2(
        str(uuid.uuid4()), name, args=(), kwargs=STEP if kwargs is None else kwargs, **options
    )
    return Message(
        body=json.dumps(task.body).encode(),
        headers={**task.headers, "traceparent": "00-" + "1" * 32 + "-" + "2" * 16 + "-01"},
        content_type="application/json",
        content_encoding="utf-8",
    )


def test_the_engines_own_messages_pass() -> None:
    vet(built())
    vet(built(ADVANCE_TASK, {"run_id": "r-1"}))


def test_the_largest_message_the_engine_can_send_passes() -> None:
    # The longest run id and step key, in characters JSON escapes to six bytes each.
    vet(built(kwargs={"run_id": "\u2603" * 200, "step_key": "\U0001f600" * 500}))


SIGNATURE = {"task": "saga.step", "args": [], "kwargs": STEP, "options": {}, "immutable": True}


@pytest.mark.parametrize(
    ("options", "cause"),
    [
        ({"countdown": 10}, "sets eta="),
        ({"expires": 60}, "sets expires="),
        ({"time_limit": 5}, "sets timelimit="),
        ({"soft_time_limit": 5}, "sets timelimit="),
        ({"group_id": "g-1"}, "sets group="),
        ({"shadow": "other.name"}, "sets shadow="),
        ({"callbacks": [SIGNATURE]}, "embeds callbacks="),
        ({"errbacks": [SIGNATURE]}, "embeds errbacks="),
        ({"chain": [SIGNATURE]}, "embeds chain="),
        ({"chord": SIGNATURE}, "embeds chord="),
    ],
)
def test_side_doors_are_refused(options: dict[str, Any], cause: str) -> None:
    with pytest.raises(MalformedMessageError, match=cause):
        vet(built(**options))


@pytest.mark.parametrize(
    ("name", "kwargs", "cause"),
    [
        ("celery.chord_unlock", STEP, "unknown task 'celery.chord_unlock'"),
        ("celery.backend_cleanup", {}, "unknown task"),
        (STEP_TASK, {"run_id": "r\x00", "step_key": "s"}, "NUL"),
        (STEP_TASK, {"run_id": "r", "step_key": "s", "extra": 1}, "Extra inputs"),
        (ADVANCE_TASK, STEP, "Extra inputs"),
        (STEP_TASK, {"run_id": "x" * MAX_BODY_BYTES, "step_key": "s"}, "over 16384"),
    ],
)
def test_other_tasks_and_arguments_are_refused(name: str, kwargs: Any, cause: str) -> None:
    with pytest.raises(MalformedMessageError, match=cause):
        vet(built(name, kwargs))


def test_a_refusal_is_one_line() -> None:
    with pytest.raises(MalformedMessageError) as refused:
        parse(StepMessage, [], {"run_id": 1, "step_key": None, "more": "x"})
    assert "\n" not in str(refused.value)
    assert "run_id" in str(refused.value) and "more" in str(refused.value)


@pytest.mark.parametrize(
    ("url", "guarded"),
    [
        ("redis://127.0.0.1:6379/0", GuardedRedisTransport),
        ("rediss://h:6380/0", GuardedRedisTransport),
        ("redis+socket:///tmp/r.sock", GuardedRedisTransport),  # the embedded servers' form
        ("amqp://u:p@h:5672//", GuardedAMQPTransport),
        ("amqps://u:p@h:5671//", GuardedAMQPSSLTransport),
        ("sentinel://127.0.0.1:26379", None),  # vetted by the consumer only
        ("memory://", None),
    ],
)
def test_the_consumer_reads_through_a_guarded_transport(url: str, guarded: Any) -> None:
    settings = Settings(broker_url=url, database_url="postgresql://x/y", broker_sentinel_master="m")
    app = create_app(settings)
    connection = guard(app.connection_for_read())
    expected = guarded or connection.get_transport_cls()
    assert connection.get_transport_cls() is expected
    if guarded is not None:  # kombu's own reading of the URL is kept
        assert connection.info() == {**app.connection_for_read().info(), "transport": ANY}


# --- the engine on the user's own app (not strict) ---------------------------------------------


def test_on_a_users_app_other_tasks_go_to_celery_unvetted() -> None:
    message = built("proj.tasks.add", {"x": 1}, countdown=5)
    assert vet(message, strict=False) is None
    with pytest.raises(MalformedMessageError, match="unknown task"):
        vet(message)


def test_on_a_users_app_the_engines_tasks_are_still_vetted() -> None:
    pickled = built()
    pickled.content_type, pickled.content_encoding = "application/x-python-serialize", "binary"
    with pytest.raises(MalformedMessageError, match="pickle"):
        vet(pickled, strict=False)
    with pytest.raises(MalformedMessageError, match="eta="):
        vet(built(countdown=5), strict=False)
    assert vet(built(), strict=False) == StepMessage(**STEP)


@pytest.mark.parametrize(("task", "strict", "refused"), [
    ("proj.tasks.add", False, False),
    ("proj.tasks.add", True, True),
    (STEP_TASK, False, True),
])  # fmt: skip
def test_compressed_messages_are_refused_for_engine_tasks_or_in_strict_mode(
    task: str, strict: bool, refused: bool
) -> None:
    from saga.workers.intake import _compression_refused

    cause = _compression_refused({"task": task, "compression": "application/x-gzip"}, strict)
    assert (cause is not None) is refused
