"""Settings: SAGA_* environment variables, frozen, unknown keys refused, values validated."""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any

import pydantic
import pytest

from saga.settings import Settings


@pytest.fixture(autouse=True)
def clean_env(monkeypatch: pytest.MonkeyPatch) -> None:
    """Settings read the environment: start each test without any SAGA_* variable."""
    for key in list(os.environ):
        if key.upper().startswith("SAGA_"):
            monkeypatch.delenv(key)


def test_defaults() -> None:
    s = Settings()
    assert s.database_url is None
    assert s.broker_url is None
    assert s.state_dir == Path(".saga")
    assert s.queue == "saga"
    assert s.lease_seconds == 30.0
    assert s.max_result_bytes == 1_048_576
    assert s.pool_size == 4


def test_env_prefix_saga(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("SAGA_DATABASE_URL", "postgresql://db/x")
    monkeypatch.setenv("SAGA_BROKER_URL", "redis://r:6379/1")
    monkeypatch.setenv("SAGA_LEASE_SECONDS", "7.5")
    monkeypatch.setenv("SAGA_MAX_RESULT_BYTES", "1234")
    monkeypatch.setenv("SAGA_QUEUE", "jobs")
    monkeypatch.setenv("SAGA_STATE_DIR", "/tmp/somewhere")
    s = Settings()
    assert s.database_url == "postgresql://db/x"
    assert s.broker_url == "redis://r:6379/1"
    assert s.lease_seconds == 7.5
    assert s.max_result_bytes == 1234
    assert s.queue == "jobs"
    assert s.state_dir == Path("/tmp/somewhere")


def test_unprefixed_variables_are_ignored(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("LEASE_SECONDS", "9")
    monkeypatch.setenv("DATABASE_URL", "postgresql://not/ours")
    s = Settings()
    assert s.lease_seconds == 30.0
    assert s.database_url is None


def test_keyword_arguments_override_the_environment(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("SAGA_LEASE_SECONDS", "7")
    assert Settings(lease_seconds=3).lease_seconds == 3.0


def test_invalid_environment_value_is_refused(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("SAGA_LEASE_SECONDS", "-1")
    with pytest.raises(pydantic.ValidationError, match="lease_seconds"):
        Settings()


@pytest.mark.parametrize("key", ["nope", "lease", "SAGA_LEASE_SECONDS", "databaseurl"])
def test_unknown_keyword_arguments_are_refused(key: str) -> None:
    with pytest.raises(pydantic.ValidationError) as info:
        Settings(**{key: 1})
    errors = info.value.errors()
    assert [e["type"] for e in errors] == ["extra_forbidden"]
    assert errors[0]["loc"] == (key,)


def test_settings_are_frozen() -> None:
    s = Settings(lease_seconds=5)
    with pytest.raises(pydantic.ValidationError, match="frozen"):
        s.lease_seconds = 10  # type: ignore[misc]
    with pytest.raises(pydantic.ValidationError, match="frozen"):
        s.database_url = "postgresql://x/y"  # type: ignore[misc]
    assert s.lease_seconds == 5.0
    # A changed copy is made instead; the original stays as it was.
    changed = s.model_copy(update={"lease_seconds": 10})
    assert changed.lease_seconds == 10 and s.lease_seconds == 5


@pytest.mark.parametrize(
    ("field", "value"),
    [
        ("lease_seconds", -1),
        ("lease_seconds", 0),
        ("dispatch_timeout_seconds", -5.0),
        ("max_result_bytes", 0),
        ("max_result_bytes", -10),
        ("max_result_bytes", 1.5),
        ("relay_batch_size", 0),
        ("relay_poll_seconds", 0),
        ("visibility_timeout_seconds", -1),
        ("pool_size", 0),
        ("lease_seconds", "soon"),
    ],
)
def test_invalid_values_are_refused(field: str, value: Any) -> None:
    with pytest.raises(pydantic.ValidationError) as info:
        Settings(**{field: value})
    assert [e["loc"] for e in info.value.errors()] == [(field,)]


def test_a_misspelt_variable_is_reported_with_the_setting_it_resembles() -> None:
    from saga.settings import unknown_variables

    environ = {
        "SAGA_DATABSE_URL": "postgresql://x",
        "SAGA_BROKER_URL": "redis://y",
        "SAGA_TEST_DATABASE_URL": "postgresql://z",  # the test suite's own
        "SAGA_MODEL_BASE_URL": "http://m",  # saga.agent's model client
        "saga_Queue": "q",  # read by pydantic-settings whatever its case
        "SAGA_COLOUR": "blue",
        "PATH": "/bin",
    }
    assert unknown_variables(environ) == [
        "SAGA_COLOUR is not a setting",
        "SAGA_DATABSE_URL is not a setting (did you mean SAGA_DATABASE_URL?)",
    ]


def test_the_cli_help_names_every_variable_the_engine_reads() -> None:
    from saga.agent.llm import ModelSettings
    from saga.cli import ENV_HELP

    for name in Settings.model_fields:
        assert f"SAGA_{name.upper()}" in ENV_HELP
    for name in ModelSettings.model_fields:
        assert f"SAGA_MODEL_{name.upper()}" in ENV_HELP


def test_child_env_passes_secrets_and_dicts_as_the_child_reads_them(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    # Secrets in clear (a child needs them) and dict settings as JSON, nested secrets included.
    settings = Settings(
        message_signing_key="k" * 40,
        message_signing_key_id="k2",
        message_verification_keys={"k1": "o" * 40},
        token_prices={"gpt-x": (1.5, 6.0)},
    )
    for name, value in settings.child_env(base={}).items():
        if name.startswith("SAGA_"):
            monkeypatch.setenv(name, value)
    assert Settings() == settings
