"""An outbox message: what will be published, written first as a row in the state's transaction."""

from __future__ import annotations

import uuid
from dataclasses import dataclass, field
from typing import Any


@dataclass(frozen=True)
class OutboxMessage:
    """A Celery task message to publish: task name, queue and JSON keyword arguments.

    ``message_id`` becomes the Celery task id, so a row published twice is visibly one message.
    ``headers`` carry metadata such as the W3C trace context.
    """

    task_name: str
    destination: str
    payload: dict[str, Any]
    headers: dict[str, str] = field(default_factory=dict)
    message_id: uuid.UUID = field(default_factory=uuid.uuid4)


@dataclass(frozen=True)
class StoredMessage:
    """A message as read back from the outbox table."""

    id: int
    message: OutboxMessage
    attempts: int
