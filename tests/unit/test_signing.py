"""Task message signing: what the engine's publisher signs, the worker's intake verifies; a
forged, altered or unsigned message is refused; a rotation's old key is still accepted."""

from __future__ import annotations

import json
import uuid
from typing import Any

import pytest
from kombu import Message
from pydantic import ValidationError

from saga.errors import MalformedMessageError, UnsignedMessageError
from saga.messages import STEP_TASK
from saga.outbox.message import OutboxMessage
from saga.settings import Settings
from saga.signing import SIGNATURE, MessageKeys
from saga.workers.app import create_app
from saga.workers.intake import vet
from saga.workers.publish import CeleryPublisher

OLD, NEW = "o" * 32, "n" * 40
STEP = {"run_id": "r-1", "step_key": "step1"}
TRACEPARENT = "00-" + "1" * 32 + "-" + "2" * 16 + "-01"


def settings(**changes: Any) -> Settings:
    return Settings(broker_url="memory://", database_url="postgresql://x/y", **changes)


def keys(**changes: Any) -> MessageKeys:
    found = MessageKeys.from_settings(settings(**changes))
    assert found is not None
    return found


def published(settings: Settings, kwargs: dict[str, Any] | None = None) -> Message:
    """One message through the engine's publisher and a real (in-memory) kombu transport, as
    the worker receives it."""
    app = create_app(settings)
    queue = f"q-{uuid.uuid4().hex[:8]}"
    CeleryPublisher(app).publish(
        [OutboxMessage(STEP_TASK, queue, kwargs or STEP, {"traceparent": TRACEPARENT})]
    )
    with app.connection_for_read() as conn:
        received = conn.SimpleQueue(queue).get(timeout=5)
    message: Message = received
    return message


def forged(headers: dict[str, Any], kwargs: dict[str, Any] | None = None) -> Message:
    task = create_app(settings()).amqp.as_task_v2(
        str(uuid.uuid4()), STEP_TASK, args=(), kwargs=kwargs or STEP
    )
    return Message(
        body=json.dumps(task.body).encode(),
        headers={**task.headers, **headers},
        content_type="application/json",
        content_encoding="utf-8",
    )


def test_signing_is_off_by_default_and_nothing_is_signed() -> None:
    assert MessageKeys.from_settings(settings()) is None
    message = published(settings())
    assert SIGNATURE not in message.headers
    vet(message)


def test_what_the_publisher_signs_the_intake_verifies() -> None:
    message = published(settings(message_signing_key=NEW, message_signing_key_id="k2"))
    assert message.headers[SIGNATURE].startswith("v1:k2:")
    vet(message, keys(message_signing_key=NEW, message_signing_key_id="k2"))


def test_an_unsigned_message_is_refused_when_signing_is_on() -> None:
    with pytest.raises(UnsignedMessageError, match="not signed"):
        vet(published(settings()), keys(message_signing_key=NEW))


def test_a_message_signed_with_another_key_is_refused() -> None:
    message = published(settings(message_signing_key=OLD, message_signing_key_id="k2"))
    with pytest.raises(UnsignedMessageError, match="does not verify under key 'k2'"):
        vet(message, keys(message_signing_key=NEW, message_signing_key_id="k2"))


def test_a_message_signed_with_an_unknown_key_id_is_refused() -> None:
    message = published(settings(message_signing_key=OLD, message_signing_key_id="k1"))
    with pytest.raises(UnsignedMessageError, match="key id 'k1'"):
        vet(message, keys(message_signing_key=NEW, message_signing_key_id="k2"))


def test_during_a_rotation_the_old_key_still_verifies() -> None:
    rotated = keys(
        message_signing_key=NEW,
        message_signing_key_id="k2",
        message_verification_keys={"k1": OLD},
    )
    vet(published(settings(message_signing_key=OLD, message_signing_key_id="k1")), rotated)
    vet(published(settings(message_signing_key=NEW, message_signing_key_id="k2")), rotated)
    assert rotated.signing_id == "k2"


@pytest.mark.parametrize(
    "change",
    [
        {"kwargs": {"run_id": "r-2", "step_key": "step1"}},  # another run
        {"headers": {"traceparent": "00-" + "3" * 32 + "-" + "2" * 16 + "-01"}},
        {"headers": {"saga-run-start": "1"}},  # an engine header added
        {"headers": {"id": str(uuid.uuid4())}},  # another task id
    ],
)
def test_any_change_to_a_signed_message_breaks_its_signature(change: dict[str, Any]) -> None:
    signer = keys(message_signing_key=NEW)
    task_id = str(uuid.uuid4())
    headers = {"id": task_id, "traceparent": TRACEPARENT}
    headers[SIGNATURE] = signer.sign(STEP_TASK, task_id, [], STEP, headers)
    message = forged({**headers, **change.get("headers", {})}, change.get("kwargs"))
    with pytest.raises(UnsignedMessageError, match="does not verify"):
        vet(message, signer)


@pytest.mark.parametrize("value", ["", "v1:k", "v2:1:abc", "v1:1:\u00e9\u00e9", 7])
def test_a_garbled_signature_is_refused_as_unsigned(value: object) -> None:
    with pytest.raises(UnsignedMessageError):
        vet(forged({SIGNATURE: value}), keys(message_signing_key=NEW))


def test_unsigned_is_a_malformed_message_for_the_intake() -> None:
    assert issubclass(UnsignedMessageError, MalformedMessageError)


def test_keys_never_print() -> None:
    s = settings(message_signing_key=NEW, message_verification_keys={"k0": OLD})
    assert NEW not in repr(s) and OLD not in repr(s) and NEW not in str(s)
    assert NEW not in repr(MessageKeys.from_settings(s))
    # ... but a child process gets them.
    env = s.child_env({})
    assert env["SAGA_MESSAGE_SIGNING_KEY"] == NEW
    assert json.loads(env["SAGA_MESSAGE_VERIFICATION_KEYS"]) == {"k0": OLD}


@pytest.mark.parametrize(
    ("changes", "message"),
    [
        ({"message_signing_key": "short"}, "fewer than 32 characters"),
        ({"message_verification_keys": {"k0": OLD}}, "without SAGA_MESSAGE_SIGNING_KEY"),
        (
            {"message_signing_key": NEW, "message_verification_keys": {"1": OLD}},
            "names two different keys",
        ),
        ({"message_signing_key": NEW, "message_verification_keys": {"a b": OLD}}, "must match"),
    ],
)
def test_bad_key_settings_are_refused(changes: dict[str, Any], message: str) -> None:
    with pytest.raises(ValidationError, match=message):
        settings(**changes)
