"""Task message authentication: an HMAC-SHA256 over each message's body and engine headers.

Whoever can write to the broker could otherwise make workers run any step of any run (the
journal fences duplicates, not forgeries). With ``SAGA_MESSAGE_SIGNING_KEY`` set, every message
the engine publishes (relay and fast path alike) carries ``saga-signature: v1:<key id>:<hex>``,
and a worker drops a message that lacks one or whose signature no known key verifies, before
it claims anything.

What is signed is a canonical JSON of the task name, the task id, the positional and keyword
arguments, and every header the engine sets (``traceparent`` and ``saga-*``): sorted keys, no
spaces, ASCII. Celery's own headers are not signed; the intake refuses those that could make a
message do more (``eta``, ``callbacks``...). A signature does not stop a replay of a message
the engine did send: the journal does (a message only names a step, which runs once).

Rotation: sign with the new key under a new id while the workers still accept the old one
(``SAGA_MESSAGE_VERIFICATION_KEYS``), then drop the old key once no message signed with it can
still be in the broker or the outbox.
"""

from __future__ import annotations

import hashlib
import hmac
import json
from collections.abc import Mapping, Sequence
from typing import Any

from saga.errors import UnsignedMessageError
from saga.settings import Settings

SIGNATURE = "saga-signature"  # the header: v1:<key id>:<hex digest>
VERSION = "v1"


def signed_headers(headers: Mapping[str, Any]) -> dict[str, Any]:
    """The headers a signature covers: the engine's own, not Celery's nor the signature."""
    return {
        k: v
        for k, v in headers.items()
        if (k == "traceparent" or k.startswith("saga-")) and k != SIGNATURE
    }


def canonical(
    task: str,
    task_id: str,
    args: Sequence[Any],
    kwargs: Mapping[str, Any],
    headers: Mapping[str, Any],
) -> bytes:
    """The bytes a signature is computed over (the same on both sides of a JSON round trip)."""
    document = {
        "v": VERSION,
        "task": task,
        "id": task_id,
        "args": list(args),
        "kwargs": dict(kwargs),
        "headers": signed_headers(headers),
    }
    return json.dumps(document, sort_keys=True, separators=(",", ":"), ensure_ascii=True).encode()


class MessageKeys:
    """The key that signs this process's messages and the keys its worker accepts."""

    def __init__(self, signing_id: str, keys: Mapping[str, bytes]) -> None:
        if signing_id not in keys:
            raise ValueError(f"no key with the signing key id {signing_id!r}")
        self.signing_id = signing_id
        self._keys = dict(keys)

    @classmethod
    def from_settings(cls, settings: Settings) -> MessageKeys | None:
        """The keys the settings name, or None when signing is off."""
        if settings.message_signing_key is None:
            return None
        keys = {
            k: v.get_secret_value().encode() for k, v in settings.message_verification_keys.items()
        }
        keys[settings.message_signing_key_id] = (
            settings.message_signing_key.get_secret_value().encode()
        )
        return cls(settings.message_signing_key_id, keys)

    def __repr__(self) -> str:  # never the keys
        return f"MessageKeys(signing_id={self.signing_id!r}, ids={sorted(self._keys)!r})"

    def sign(
        self,
        task: str,
        task_id: str,
        args: Sequence[Any],
        kwargs: Mapping[str, Any],
        headers: Mapping[str, Any],
    ) -> str:
        """The ``saga-signature`` header value for this message."""
        digest = _digest(
            self._keys[self.signing_id], canonical(task, task_id, args, kwargs, headers)
        )
        return f"{VERSION}:{self.signing_id}:{digest}"

    def verify(
        self,
        task: str,
        task_id: str,
        args: Sequence[Any],
        kwargs: Mapping[str, Any],
        headers: Mapping[str, Any],
    ) -> str:
        """The id of the key that signed the message; UnsignedMessageError saying why not."""
        value = headers.get(SIGNATURE)
        if value is None:
            raise UnsignedMessageError(
                "it is not signed, and message signing is on (SAGA_MESSAGE_SIGNING_KEY)"
            )
        parts = value.split(":") if isinstance(value, str) else []
        if len(parts) != 3 or parts[0] != VERSION:
            raise UnsignedMessageError(f"its {SIGNATURE} header is not {VERSION}:<key id>:<hex>")
        _, key_id, digest = parts
        key = self._keys.get(key_id)
        if key is None:
            raise UnsignedMessageError(
                f"it is signed with key id {key_id!r:.40}, which is not among this worker's "
                f"keys {sorted(self._keys)} (SAGA_MESSAGE_VERIFICATION_KEYS during a rotation)"
            )
        expected = _digest(key, canonical(task, task_id, args, kwargs, headers))
        if not hmac.compare_digest(expected.encode(), digest.encode("utf-8", "replace")):
            raise UnsignedMessageError(f"its signature does not verify under key {key_id!r}")
        return key_id


def _digest(key: bytes, data: bytes) -> str:
    return hmac.new(key, data, hashlib.sha256).hexdigest()
