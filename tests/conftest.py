"""Shared fixtures: a migrated template database cloned per test, a Redis broker, processes.

Services come from SAGA_TEST_DATABASE_URL / SAGA_TEST_REDIS_URL / SAGA_TEST_BROKER_URL
(`scripts/test` sets them, starting embedded servers when the configured ones do not answer) and
SAGA_TEST_AMQP_URL (RabbitMQ, for the tests that run on it too; nothing starts one).
A missing service skips on a laptop and fails in CI (CI=true).
"""

from __future__ import annotations

import os
import uuid
from collections.abc import Iterator
from pathlib import Path

import psycopg
import pytest
import redis
from psycopg.conninfo import make_conninfo

from saga.migrate import migrate
from saga.settings import Settings
from tests.processes import ProcessGroup

ADMIN_URL = os.environ.get("SAGA_TEST_DATABASE_URL", "postgresql://postgres@127.0.0.1:5432/test")
REDIS_URL = os.environ.get("SAGA_TEST_REDIS_URL", "redis://127.0.0.1:6379/15")
BROKER_URL = os.environ.get("SAGA_TEST_BROKER_URL", REDIS_URL)
AMQP_URL = os.environ.get("SAGA_TEST_AMQP_URL", "amqp://guest:guest@127.0.0.1:5672//")

TEST_TABLES = """
CREATE TABLE test_calls (
    id bigserial PRIMARY KEY,
    run_id text NOT NULL,
    step text NOT NULL,
    attempt integer NOT NULL,
    idempotency_key text NOT NULL,
    pid integer NOT NULL,
    at timestamptz NOT NULL DEFAULT now()
);
"""


def unavailable(what: str, exc: BaseException) -> None:
    message = f"{what} is not available: {exc}"
    if os.environ.get("CI"):
        pytest.fail(message)
    pytest.skip(message)


@pytest.fixture(scope="session")
def admin_conn() -> Iterator[psycopg.Connection[tuple[object, ...]]]:
    try:
        conn = psycopg.connect(ADMIN_URL, autocommit=True, connect_timeout=3)
    except psycopg.OperationalError as exc:
        unavailable("Postgres", exc)
        raise
    with conn:
        yield conn


@pytest.fixture(scope="session")
def template_db(admin_conn: psycopg.Connection[tuple[object, ...]]) -> Iterator[str]:
    """A database migrated once per session; each test gets a clone of it."""
    name = f"saga_tpl_{uuid.uuid4().hex[:10]}"
    admin_conn.execute(f'CREATE DATABASE "{name}"')
    url = make_conninfo(ADMIN_URL, dbname=name)
    migrate(url)
    with psycopg.connect(url, autocommit=True) as conn:
        conn.execute(TEST_TABLES)
    yield name
    admin_conn.execute(f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)')


@pytest.fixture
def empty_database_url(admin_conn: psycopg.Connection[tuple[object, ...]]) -> Iterator[str]:
    name = f"saga_empty_{uuid.uuid4().hex[:10]}"
    admin_conn.execute(f'CREATE DATABASE "{name}"')
    yield make_conninfo(ADMIN_URL, dbname=name)
    admin_conn.execute(f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)')


@pytest.fixture
def database_url(
    admin_conn: psycopg.Connection[tuple[object, ...]], template_db: str
) -> Iterator[str]:
    name = f"saga_t_{uuid.uuid4().hex[:10]}"
    admin_conn.execute(f'CREATE DATABASE "{name}" TEMPLATE "{template_db}"')
    yield make_conninfo(ADMIN_URL, dbname=name)
    admin_conn.execute(f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)')


@pytest.fixture
def db(database_url: str) -> Iterator[psycopg.Connection[tuple[object, ...]]]:
    with psycopg.connect(database_url, autocommit=True) as conn:
        yield conn


@pytest.fixture
def redis_client() -> Iterator[redis.Redis]:
    client = redis.Redis.from_url(REDIS_URL)
    try:
        client.ping()
    except redis.RedisError as exc:
        unavailable("Redis", exc)
    client.flushdb()
    yield client
    client.close()


@pytest.fixture
def settings(database_url: str, redis_client: redis.Redis, tmp_path: Path) -> Settings:
    """Settings with short timeouts so recovery paths run within a test."""
    return Settings(
        database_url=database_url,
        broker_url=BROKER_URL,
        queue=f"t-{uuid.uuid4().hex[:8]}",
        lease_seconds=2.0,
        dispatch_timeout_seconds=4.0,
        relay_poll_seconds=0.2,
        max_result_bytes=10_000,
        state_dir=tmp_path / "state",
    )


@pytest.fixture
def procs(tmp_path: Path, request: pytest.FixtureRequest) -> Iterator[ProcessGroup]:
    group = ProcessGroup(tmp_path / "logs")
    yield group
    group.stop_all()
    report = getattr(request.node, "rep_call", None)
    if report is not None and report.failed:
        print(group.logs_tail())


@pytest.hookimpl(wrapper=True, tryfirst=True)
def pytest_runtest_makereport(item: pytest.Item, call: pytest.CallInfo[None]):  # type: ignore[no-untyped-def]
    rep = yield
    setattr(item, f"rep_{rep.when}", rep)
    return rep
