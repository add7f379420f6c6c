"""The one configuration object. Read from ``SAGA_*`` environment variables at the edge only."""

from __future__ import annotations

import difflib
import json
import os
import re
from collections.abc import Mapping
from pathlib import Path
from typing import Any, Literal, Self

from pydantic import (
    Field,
    NonNegativeFloat,
    PositiveFloat,
    PositiveInt,
    SecretStr,
    model_validator,
)
from pydantic_settings import BaseSettings, SettingsConfigDict


class Settings(BaseSettings):
    """Engine configuration. Every field can be set by ``SAGA_<FIELD>`` in the environment.

    Build it with ``Settings()`` in a process entry point (CLI, worker, test) and pass it down;
    library code never reads the environment itself.
    """

    model_config = SettingsConfigDict(env_prefix="SAGA_", frozen=True, extra="forbid")

    database_url: str | None = Field(
        default=None, description="Postgres URL; unset means the embedded server (demo only)."
    )
    broker_url: str | None = Field(
        default=None, description="Celery broker URL (redis:// or amqp://); unset means embedded."
    )
    state_dir: Path = Field(
        default=Path(".saga"), description="Folder for the embedded servers' data."
    )
    queue: str = Field(default="saga", description="Broker queue that step tasks go to.")
    lease_seconds: PositiveFloat = Field(
        default=30.0,
        description="How long a claimed step is owned before another worker may take it over; "
        "renewed every third of it while the step runs.",
    )
    dispatch_timeout_seconds: PositiveFloat = Field(
        default=60.0,
        description="A dispatched step not claimed within this time is dispatched again "
        "(its message was lost, e.g. the broker restarted empty).",
    )
    max_result_bytes: PositiveInt = Field(
        default=1_048_576, description="Largest JSON-encoded step result accepted."
    )
    max_input_bytes: PositiveInt = Field(
        default=1_048_576,
        description="Largest JSON-encoded run input or event payload accepted (it is journaled "
        "and handed to steps).",
    )
    relay_batch_size: PositiveInt = Field(default=200, description="Outbox rows per publish batch.")
    relay_poll_seconds: PositiveFloat = Field(
        default=1.0, description="Relay/sweeper polling interval when no NOTIFY arrives."
    )
    outbox_retention_seconds: PositiveFloat = Field(
        default=3600.0, description="Published outbox rows older than this are pruned."
    )
    visibility_timeout_seconds: PositiveFloat = Field(
        default=3600.0,
        description="Redis visibility timeout: must exceed the longest step, else Redis "
        "redelivers running tasks (harmless, the journal fences them, but wasteful).",
    )
    pool_size: PositiveInt = Field(
        default=4,
        description="Most Postgres connections of each pool (one per worker process, client "
        "and relay sweeper), opened as needed; a threads-pool worker wants one per thread.",
    )

    # Celery-native (issue 11): broker security and scale, Celery's own tools.
    broker_ca_file: Path | None = Field(
        default=None,
        description="CA bundle that verifies the broker's TLS certificate (rediss://, amqps://); "
        "unset: the system's CAs. Verification is always on for those schemes.",
    )
    broker_cert_file: Path | None = Field(
        default=None, description="Client certificate for a TLS broker that asks for one."
    )
    broker_key_file: Path | None = Field(
        default=None, description="Private key of SAGA_BROKER_CERT_FILE."
    )
    broker_sentinel_master: str | None = Field(
        default=None,
        description="Redis Sentinel master name, for a sentinel:// broker URL (required there).",
    )
    queue_type: Literal["classic", "quorum"] = Field(
        default="classic",
        description="RabbitMQ type of the queues the engine declares; quorum needs Celery 5.5+.",
    )
    task_events: bool = Field(
        default=False,
        description="Workers send Celery task events (Flower, `celery events`), one task per "
        "step attempt, named saga.step[<step>].",
    )

    # Security: deployment namespace, message signing, exception details in traces.
    key_prefix: str = Field(
        default="",
        pattern=r"^[A-Za-z0-9._-]{0,64}$",
        description="Deployment namespace put first in every idempotency key "
        "(<prefix>:<run_id>:<step_key>), so environments sharing a provider account never send "
        "the same key; empty keeps keys unprefixed. A run keeps the prefix it started with.",
    )
    message_signing_key: SecretStr | None = Field(
        default=None,
        description="Shared secret (at least 32 characters) that turns message signing on: "
        "every task message is signed with HMAC-SHA256, and workers drop any message that is "
        "not signed by a known key. Unset: off.",
    )
    message_signing_key_id: str = Field(
        default="1",
        pattern=r"^[A-Za-z0-9._-]{1,32}$",
        description="Id of SAGA_MESSAGE_SIGNING_KEY, sent with each signature.",
    )
    message_verification_keys: dict[str, SecretStr] = Field(
        default_factory=dict,
        description='More keys accepted on received messages, as JSON {"<key id>": "<key>"}: '
        "for a key rotation (the signing key is always accepted).",
    )
    trace_exception_details: bool = Field(
        default=False,
        description="Export exception messages and stack traces in spans; off: only the "
        "exception's type and a fixed message (messages may carry secrets).",
    )

    @model_validator(mode="after")
    def _check_signing_keys(self) -> Self:
        keys = dict(self.message_verification_keys)
        if self.message_signing_key is not None:
            keys[self.message_signing_key_id] = self.message_signing_key
        elif keys:
            raise ValueError(
                "SAGA_MESSAGE_VERIFICATION_KEYS is set without SAGA_MESSAGE_SIGNING_KEY: set "
                "the signing key too (verification keys only serve a rotation)"
            )
        for key_id, key in keys.items():
            if not MIN_KEY_ID.fullmatch(key_id):
                raise ValueError(f"message key id {key_id!r} must match {MIN_KEY_ID.pattern}")
            if len(key.get_secret_value()) < MIN_KEY_LENGTH:
                raise ValueError(
                    f"message key {key_id!r} has fewer than {MIN_KEY_LENGTH} characters; make "
                    f"one with: python -c 'import secrets; print(secrets.token_urlsafe(32))'"
                )
        signing = self.message_verification_keys.get(self.message_signing_key_id)
        if signing is not None and signing != self.message_signing_key:
            raise ValueError(
                f"key id {self.message_signing_key_id!r} names two different keys (the signing "
                f"key and a verification key): give the new key a new id"
            )
        return self

    # -- retention: finished runs (steps, events, history) deleted after a per-state age --------
    retention_completed_seconds: NonNegativeFloat | None = Field(
        default=None,
        description="Completed runs are deleted this long after they finished; unset keeps them.",
    )
    retention_compensated_seconds: NonNegativeFloat | None = Field(
        default=None,
        description="Compensated runs are deleted this long after they finished; unset keeps them.",
    )
    retention_cancelled_seconds: NonNegativeFloat | None = Field(
        default=None,
        description="Cancelled runs are deleted this long after they finished; unset keeps them.",
    )
    retention_failed_seconds: NonNegativeFloat | None = Field(
        default=None,
        description="Failed runs (an operator may still `saga retry` them) are deleted this long "
        "after they failed; unset keeps them.",
    )
    retention_compensation_failed_seconds: NonNegativeFloat | None = Field(
        default=None,
        description="Runs whose compensation failed (effects may remain; an operator may retry "
        "it) are deleted this long after; unset keeps them.",
    )
    retention_batch_size: PositiveInt = Field(
        default=200, description="Runs deleted per short transaction when pruning."
    )
    retention_interval_seconds: PositiveFloat = Field(
        default=60.0, description="How often a relay prunes finished runs (when any is set)."
    )

    # asyncio and timeouts (issue 11, items 5-6)
    shutdown_grace_seconds: PositiveFloat = Field(
        default=25.0,
        description="How long a stopping worker (SIGTERM, warm shutdown) waits for its running "
        "steps before it kills them and exits 1; their leases then run out and other workers "
        "take them over. Keep it under your orchestrator's own grace (Kubernetes: 30 s).",
    )

    # Operations: probes, /metrics, log format (saga/probes.py, saga/logs.py).
    http_port: int | None = Field(
        default=None,
        ge=0,
        le=65535,
        description="Port of the worker's or relay's /healthz, /readyz and /metrics; unset means "
        "no HTTP server (`--http-port` overrides it).",
    )
    http_host: str = Field(
        default="127.0.0.1",
        description="Address the probe server binds to; 0.0.0.0 to be scraped from elsewhere.",
    )
    log_format: Literal["text", "json"] = Field(
        default="text",
        description="Log records as text lines or one JSON object per line; both carry the run "
        "id, step key, attempt, trace id and span id of the step being run.",
    )

    # Operators (saga show, the dashboard): where a run's trace is.
    trace_url_template: str | None = Field(
        default=None,
        description="Link to a run's trace, with {trace_id} in it (Jaeger: "
        "http://localhost:16686/trace/{trace_id}); `saga show` prints it.",
    )

    # The web dashboard (`saga dashboard`).
    dashboard_token: SecretStr | None = Field(
        default=None,
        description="Token the dashboard asks for (a Bearer header or its login form); required "
        "to bind it to anything but loopback.",
    )
    token_prices: dict[str, tuple[float, float]] = Field(
        default_factory=dict,
        description="Model prices in USD per million tokens, prompt then completion, as JSON "
        '({"gpt-4o-mini": [0.15, 0.6]}): the dashboard shows what an agent run\'s completions '
        "cost.",
    )

    def child_env(self, base: Mapping[str, str] | None = None) -> dict[str, str]:
        """The environment for a child process that should use exactly these settings: ``base``
        (this process's environment by default) with every set field as its ``SAGA_*``
        variable, and the working folder on ``PYTHONPATH`` (saga modules are imported by path,
        as Celery does)."""
        env = dict(os.environ if base is None else base)
        for name, value in self.model_dump().items():
            if value is not None:
                env[f"SAGA_{name.upper()}"] = _env_value(value)
        env["PYTHONPATH"] = os.pathsep.join(filter(None, [os.getcwd(), env.get("PYTHONPATH")]))
        return env


MIN_KEY_LENGTH = 32
MIN_KEY_ID = re.compile(r"[A-Za-z0-9._-]{1,32}")


def _env_value(value: Any) -> str:
    """A setting's value as its environment variable reads: secrets in clear (a child process
    needs them), collections as JSON."""
    if isinstance(value, dict | list):
        return json.dumps(_plain(value))
    return str(_plain(value))


def _plain(value: Any) -> Any:
    if isinstance(value, SecretStr):
        return value.get_secret_value()
    if isinstance(value, dict):
        return {k: _plain(v) for k, v in value.items()}
    if isinstance(value, list):
        return [_plain(v) for v in value]
    return value


# Variables with the prefix that belong to the test suite, not to the engine.
_NOT_SETTINGS = ("SAGA_TEST_", "SAGA_MODEL_")  # the test suite's; saga.agent's model client


def unknown_variables(environ: Mapping[str, str]) -> list[str]:
    """One line per ``SAGA_*`` variable that names no setting, with the closest setting: a
    typo (``SAGA_DATABSE_URL``) would otherwise leave the default in place without a word."""
    known = {f"SAGA_{name.upper()}" for name in Settings.model_fields}
    found = []
    for var in sorted(environ):
        upper = var.upper()  # pydantic-settings reads names case-insensitively
        if upper.startswith("SAGA_") and upper not in known and not upper.startswith(_NOT_SETTINGS):
            # Compared without the prefix, which every candidate shares.
            close = difflib.get_close_matches(var[5:].lower(), Settings.model_fields, n=1)
            hint = f" (did you mean SAGA_{close[0].upper()}?)" if close else ""
            found.append(f"{var} is not a setting{hint}")
    return found
