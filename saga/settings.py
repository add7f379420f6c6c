"""The one configuration object. Read from ``SAGA_*`` environment variables at the edge only."""

from __future__ import annotations

import difflib
import json
import os
from collections.abc import Mapping
from pathlib import Path

from pydantic import Field, PositiveFloat, PositiveInt, SecretStr
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
    fast_path_grace_seconds: PositiveFloat = Field(
        default=5.0,
        description="A row a worker publishes itself right after commit is left to the relay "
        "only after this long.",
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
            if isinstance(value, SecretStr):
                value = value.get_secret_value()
            elif isinstance(value, dict):  # read back as JSON
                value = json.dumps(value)
            if value is not None:
                env[f"SAGA_{name.upper()}"] = str(value)
        env["PYTHONPATH"] = os.pathsep.join(filter(None, [os.getcwd(), env.get("PYTHONPATH")]))
        return env


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
