"""Errors no retry can fix stop the relay and the worker, saying why; broker outages do not.

A broker transport whose module is missing is a real one: kombu's ``mongodb://`` transport needs
``pymongo``, which nothing here installs (the same failure as the Redis transport without
``packaging``).
"""

from __future__ import annotations

import threading
from collections.abc import Iterator
from typing import Any
from urllib.parse import urlsplit, urlunsplit

import psycopg
import pytest
from kombu import Connection

from saga.client import SagaClient
from saga.outbox.relay import PublishingImpossible, Relay
from saga.settings import Settings
from saga.workers.app import create_app
from saga.workers.publish import CeleryPublisher
from tests import sagas
from tests.conftest import AMQP_URL, BROKER_URL, unavailable
from tests.processes import ProcessGroup, wait_until

Conn = psycopg.Connection[Any]
MISSING_TRANSPORT = "mongodb://127.0.0.1:27017/saga"
REFUSED = "redis://127.0.0.1:1/0"  # nothing listens on port 1: connection refused


@pytest.fixture(autouse=True)
def _no_pymongo() -> None:
    try:
        import pymongo  # noqa: F401
    except ImportError:
        return
    pytest.skip("pymongo is installed: mongodb:// is no missing transport here")


def outbox_rows(db: Conn) -> list[tuple[int, str | None, bool]]:
    rows = db.execute(
        "SELECT attempts, last_error, published_at IS NOT NULL FROM saga_outbox ORDER BY id"
    ).fetchall()
    return [(r[0], r[1], r[2]) for r in rows]


@pytest.mark.parametrize("role", ["relay", "worker"])
def test_a_missing_transport_module_stops_the_process_naming_it(
    role: str, settings: Settings, procs: ProcessGroup
) -> None:
    broken = settings.model_copy(update={"broker_url": MISSING_TRANSPORT})
    process = procs.relay(broken) if role == "relay" else procs.worker(broken, "w1")
    wait_until(lambda: not process.alive(), 60, f"the {role} to stop")
    assert process.popen.returncode == 2
    log = process.log()
    assert "No module named 'pymongo'" in log
    assert "pip install 'kombu[mongodb]'" in log
    assert "Traceback" not in log


@pytest.mark.parametrize("role", ["relay", "worker"])
def test_an_invalid_setting_stops_the_process_naming_it(
    role: str, settings: Settings, procs: ProcessGroup
) -> None:
    process = procs.spawn(role, settings, role, env={"SAGA_LEASE_SECONDS": "soon"})
    wait_until(lambda: not process.alive(), 60, f"the {role} to stop")
    assert process.popen.returncode == 2
    assert "invalid settings: SAGA_LEASE_SECONDS='soon': Input should be a valid number" in (
        process.log()
    )


@pytest.mark.parametrize("role", ["relay", "worker"])
def test_a_broker_refusing_the_login_stops_the_process(
    role: str, settings: Settings, procs: ProcessGroup
) -> None:
    try:
        with Connection(AMQP_URL, connect_timeout=3) as conn:
            conn.connect()
    except Exception as exc:  # kombu raises the socket's or py-amqp's own errors
        unavailable("RabbitMQ", exc)
    wrong = urlsplit(AMQP_URL)._replace(netloc=f"saga-nobody:wrong@{urlsplit(AMQP_URL).hostname}")
    broken = settings.model_copy(update={"broker_url": urlunsplit(wrong)})
    process = procs.relay(broken) if role == "relay" else procs.worker(broken, "w1")
    wait_until(lambda: not process.alive(), 60, f"the {role} to stop")
    assert process.popen.returncode == 2
    assert "ACCESS_REFUSED" in process.log()
    assert "check the user, password and vhost" in process.log()


def test_a_redis_database_out_of_range_stops_the_relay(
    settings: Settings, procs: ProcessGroup
) -> None:
    if not BROKER_URL.startswith("redis://"):
        pytest.skip(f"a Redis database number in a redis:// URL is the point; not {BROKER_URL}")
    url = urlunsplit(urlsplit(BROKER_URL)._replace(path="/9999"))
    process = procs.relay(settings.model_copy(update={"broker_url": url}))
    wait_until(lambda: not process.alive(), 60, "the relay to stop")
    assert process.popen.returncode == 2
    assert "DB index is out of range" in process.log()


def test_an_unknown_broker_scheme_stops_the_relay(settings: Settings, procs: ProcessGroup) -> None:
    process = procs.relay(settings.model_copy(update={"broker_url": "reddis://127.0.0.1:6379/0"}))
    wait_until(lambda: not process.alive(), 60, "the relay to stop")
    assert process.popen.returncode == 2
    assert "names no broker transport kombu knows" in process.log()


@pytest.fixture
def outbox_client(settings: Settings) -> Iterator[SagaClient]:
    """A client that leaves a run's first message to the relay (no publish of its own)."""
    with SagaClient(settings, publish=False) as client:
        yield client


def test_a_publish_that_cannot_import_its_transport_stops_the_relay_leaving_the_rows(
    settings: Settings, outbox_client: SagaClient, db: Conn
) -> None:
    """The publish path itself (a process checks its transport at start-up first): the error
    ends ``Relay.run`` instead of being recorded on the rows and retried forever."""
    outbox_client.start(sagas.ten, {"n": 1})
    before = outbox_rows(db)
    assert before and not any(published for _, _, published in before)
    assert settings.database_url
    relay = Relay(
        settings.database_url,
        CeleryPublisher(create_app(settings, broker_url=MISSING_TRANSPORT)),
        poll_seconds=0.2,
    )
    with pytest.raises(PublishingImpossible, match=r"No module named 'pymongo'.*kombu\[mongodb\]"):
        relay.run(threading.Event())
    assert outbox_rows(db) == before  # not published, no failure recorded, no backoff


def test_a_refused_broker_is_retried_and_the_relay_keeps_running(
    settings: Settings, procs: ProcessGroup, outbox_client: SagaClient, db: Conn
) -> None:
    process = procs.relay(settings.model_copy(update={"broker_url": REFUSED}))
    outbox_client.start(sagas.ten, {"n": 1})

    def retried() -> bool:
        return any(attempts >= 2 for attempts, _, _ in outbox_rows(db))

    wait_until(retried, 60, "the relay to fail a publish twice")
    assert process.alive()
    (_, error, published), *_ = outbox_rows(db)
    assert error and not published
    assert "refused" in error.lower() or "connect" in error.lower(), error


def test_a_worker_waits_for_a_postgres_not_up_yet_but_not_for_a_wrong_database(
    admin_conn: Any,
) -> None:
    import psycopg

    from saga.migrate import still_starting as _still_starting

    with pytest.raises(psycopg.OperationalError) as refused:
        psycopg.connect("postgresql://postgres@127.0.0.1:1/test", connect_timeout=2)
    assert _still_starting(refused.value)  # nothing listens yet: wait for it
    with pytest.raises(psycopg.OperationalError) as missing:
        psycopg.connect(
            "postgresql://postgres@127.0.0.1:5432/no_such_database_here", connect_timeout=2
        )
    assert not _still_starting(missing.value)  # no wait fixes a wrong name: exit 2 at once
