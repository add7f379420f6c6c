"""The embedded servers really start, are shared between processes, outlive them, and stop."""

from __future__ import annotations

import json
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path

import psycopg
import pytest
import redis
from kombu.connection import Connection

from saga.embedded import EmbeddedServices, server_answers, start_embedded, stop_embedded

REPO = Path(__file__).resolve().parents[2]

_START_IN_CHILD = """
import dataclasses, json, sys
from pathlib import Path
from saga.embedded import start_embedded
print(json.dumps(dataclasses.asdict(start_embedded(Path(sys.argv[1])))))
"""


@pytest.fixture
def state_dir(tmp_path: Path) -> Iterator[Path]:
    path = tmp_path / "state"
    yield path
    stop_embedded(path)  # never leak servers, even when the test failed


def _start_in_child(state_dir: Path) -> subprocess.Popen[str]:
    return subprocess.Popen(
        [sys.executable, "-c", _START_IN_CHILD, str(state_dir)],
        cwd=REPO,
        stdout=subprocess.PIPE,
        text=True,
    )


def _result(child: subprocess.Popen[str]) -> EmbeddedServices:
    out, _ = child.communicate(timeout=60)
    assert child.returncode == 0
    return EmbeddedServices(**json.loads(out))


def _identity(services: EmbeddedServices) -> tuple[object, object]:
    """What changes whenever a server is restarted: Postgres' start time, Redis' run id."""
    with psycopg.connect(services.database_url) as conn:
        row = conn.execute("select pg_postmaster_start_time()").fetchone()
    client = redis.Redis.from_url(services.redis_url)
    try:
        run_id = client.info("server")["run_id"]
    finally:
        client.close()
    assert row is not None
    return row[0], run_id


def test_servers_answer_as_the_engine_uses_them(state_dir: Path) -> None:
    services = start_embedded(state_dir)

    with psycopg.connect(services.database_url, autocommit=True) as conn:
        assert conn.execute("select 1").fetchone() == (1,)
        su = conn.execute("select rolsuper from pg_roles where rolname = current_user").fetchone()
        assert su == (True,)
        # The test suite clones a template database per test.
        conn.execute("create database probe_template")
        conn.execute("create database probe_clone template probe_template")
        conn.execute("drop database probe_clone")
        conn.execute("drop database probe_template")

    client = redis.Redis.from_url(services.redis_url)
    try:
        assert client.ping()
        assert client.config_get("save") == {"save": ""}
    finally:
        client.close()

    with Connection(services.broker_url) as broker:  # type: ignore[no-untyped-call]
        queue = broker.SimpleQueue("embedded-probe")
        try:
            queue.put({"n": 1})
            message = queue.get(timeout=5)
            assert message.payload == {"n": 1}
            message.ack()
        finally:
            queue.close()


def test_second_start_from_another_process_reuses_the_servers(state_dir: Path) -> None:
    first = start_embedded(state_dir)
    before = _identity(first)

    second = _result(_start_in_child(state_dir))

    assert second == first
    assert server_answers(first.database_url, first.redis_url)
    assert _identity(first) == before


def test_servers_outlive_the_process_that_started_them(state_dir: Path) -> None:
    started = _result(_start_in_child(state_dir))

    assert server_answers(started.database_url, started.redis_url)
    assert start_embedded(state_dir) == started


def test_concurrent_starts_share_one_pair_of_servers(state_dir: Path) -> None:
    children = [_start_in_child(state_dir) for _ in range(3)]
    results = [_result(child) for child in children]

    assert results[0] == results[1] == results[2]
    assert server_answers(results[0].database_url, results[0].redis_url)


def test_stop_then_start_again(state_dir: Path) -> None:
    services = start_embedded(state_dir)

    stop_embedded(state_dir)
    assert not server_answers(database_url=services.database_url)
    assert not server_answers(redis_url=services.redis_url)
    assert not server_answers(redis_url=services.broker_url)
    stop_embedded(state_dir)  # stopping twice is fine

    # Same process: nothing cached may claim the old servers are still up.
    assert start_embedded(state_dir) == services
    assert server_answers(services.database_url, services.redis_url)


def test_long_state_dir_still_gets_a_usable_redis_socket(tmp_path: Path) -> None:
    state_dir = tmp_path / ("x" * 100) / "state"
    try:
        services = start_embedded(state_dir)
        assert server_answers(services.database_url, services.redis_url)
        assert _result(_start_in_child(state_dir)) == services
    finally:
        stop_embedded(state_dir)
    assert not server_answers(redis_url=services.redis_url)
