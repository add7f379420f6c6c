"""`saga health`, the exec probe: its exit status and its one line, from a real subprocess."""

from __future__ import annotations

import json
import socket
import subprocess
import sys
from typing import Any

import psycopg
from psycopg.conninfo import make_conninfo

from saga.migrate import available_migrations
from saga.settings import Settings
from tests.processes import ROOT


def closed_port() -> int:
    """A port nothing listens on (bound, then closed)."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def health(settings: Settings, *args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "saga", "health", *args],
        env=settings.child_env(),
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=60,
    )


def test_exit_0_when_postgres_and_the_broker_answer_and_the_schema_is_current(
    settings: Settings,
) -> None:
    done = health(settings)
    assert (done.returncode, done.stdout, done.stderr) == (0, "ok\n", "")
    report: dict[str, Any] = json.loads(health(settings, "--json").stdout)
    assert report["ok"] is True
    assert [c["name"] for c in report["checks"]] == ["postgres", "schema", "broker"]


def test_postgres_unreachable_exits_1_saying_so_on_one_line(settings: Settings) -> None:
    assert settings.database_url
    down = settings.model_copy(
        update={"database_url": make_conninfo(settings.database_url, port=str(closed_port()))}
    )
    done = health(down)
    assert done.returncode == 1
    assert done.stdout == ""
    assert done.stderr.count("\n") == 1
    assert done.stderr.startswith("postgres: Postgres does not answer: "), done.stderr
    report = json.loads(health(down, "--json").stdout)
    assert report["ok"] is False
    assert [(c["name"], c["ok"]) for c in report["checks"]] == [
        ("postgres", False),
        ("broker", True),
    ]


def test_a_schema_behind_the_code_exits_1_naming_the_missing_migration(
    settings: Settings, db: psycopg.Connection[Any]
) -> None:
    latest = available_migrations()[-1].version
    db.execute("DELETE FROM saga_schema_migrations WHERE version = %s", (latest,))
    done = health(settings)
    assert done.returncode == 1
    assert done.stderr == (
        f"schema: the database schema lacks migrations [{latest}]: run `saga migrate` first\n"
    )


def test_the_broker_unreachable_exits_1(settings: Settings) -> None:
    down = settings.model_copy(update={"broker_url": f"redis://127.0.0.1:{closed_port()}/0"})
    done = health(down)
    assert done.returncode == 1
    assert done.stderr.startswith("broker: the broker does not answer: "), done.stderr
    assert done.stderr.count("\n") == 1


def test_an_unset_database_is_reported_not_started_embedded(settings: Settings) -> None:
    unset = settings.model_copy(update={"database_url": None})
    done = health(unset)
    assert done.returncode == 1
    assert done.stderr == "postgres: SAGA_DATABASE_URL is not set\n"
    assert not (settings.state_dir).exists()
