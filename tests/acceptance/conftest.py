"""Fixtures of the acceptance tests that run the project's commands as a user would."""

from __future__ import annotations

import os
import uuid
from collections.abc import Iterator

import psycopg
import pytest
from psycopg.conninfo import make_conninfo

from tests.conftest import ADMIN_URL


@pytest.fixture
def bench_database_url(request: pytest.FixtureRequest) -> Iterator[str]:
    """An empty database of the test's own, for a bench to migrate from scratch; dropped after."""
    try:
        admin = psycopg.connect(ADMIN_URL, autocommit=True, connect_timeout=3)
    except psycopg.OperationalError as exc:
        if os.environ.get("CI"):
            pytest.fail(f"Postgres is not available: {exc}")
        pytest.skip(f"Postgres is not available: {exc}")
    module = request.module.__name__.rsplit(".", 1)[-1].removeprefix("test_")
    name = f"{module}_{uuid.uuid4().hex[:10]}"
    with admin:
        admin.execute(f'CREATE DATABASE "{name}"')
        try:
            yield make_conninfo(ADMIN_URL, dbname=name)
        finally:
            admin.execute(f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)')
