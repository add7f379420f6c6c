"""Remote control on a real ``saga worker``: inspection answers (the usual liveness probe), and
no broadcast message (a command that would stop it, pickle, a malformed body) stops or stalls
the worker."""

from __future__ import annotations

import pickle
from typing import Any

import redis
from kombu import Connection, Exchange, Producer

from saga.client import SagaClient
from saga.settings import Settings
from saga.workers.app import create_app
from tests import sagas
from tests.processes import ProcessGroup, wait_until


def broadcast(
    url: str, body: Any, *, serializer: str = "json", headers: dict[str, Any] | None = None
) -> None:
    """A message on Celery's control exchange, as anyone with broker access could send."""
    exchange = Exchange("celery.pidbox", type="fanout", durable=False, delivery_mode="transient")
    with Connection(url) as conn:
        producer = Producer(conn.default_channel, exchange=exchange)
        if serializer == "pickle":
            producer.publish(
                pickle.dumps(body), content_type="application/x-python-serialize",
                content_encoding="binary",
            )  # fmt: skip
        else:
            producer.publish(body, serializer=serializer, headers=headers or {})


def test_inspection_answers_and_no_broadcast_stops_the_worker(
    settings: Settings, procs: ProcessGroup
) -> None:
    assert settings.broker_url
    procs.relay(settings)
    worker = procs.worker(settings, "ctl")
    control = create_app(settings).control
    wait_until(lambda: control.inspect(timeout=1).ping(), 30, "the worker to answer ping")

    for command in ("shutdown", "pool_restart", "cancel_consumer", "revoke", "no_such_command"):
        replies = control.broadcast(command, arguments={"queue": settings.queue}, reply=True)
        assert replies and all("refused" in str(r) for r in replies), replies
    broadcast(settings.broker_url, {"method": "shutdown", "arguments": {}}, serializer="pickle")
    broadcast(settings.broker_url, ["not", "an", "object"])
    broadcast(settings.broker_url, {"method": "ping", "arguments": "not an object"})
    broadcast(settings.broker_url, {"method": {"nested": 1}})

    assert control.inspect(timeout=5).ping()
    active = control.inspect(timeout=5).active()
    assert active is not None and all(v == [] for v in active.values())
    with SagaClient(settings) as client:
        run_id = client.start(sagas.two, {})
        assert client.result(run_id, timeout=60)["trail"] == [1, 2]
    assert worker.alive()
    log = worker.log()
    assert log.count("ignored a malformed remote control message") == 3, log[-3000:]
    assert "Refusing to deserialize untrusted content of type pickle" in log


def test_a_raw_publish_on_the_control_channel_does_not_stop_the_worker(
    settings: Settings, procs: ProcessGroup
) -> None:
    """Any client of the Redis server can PUBLISH on the channel kombu's fanout exchange
    subscribes to: items that are not a kombu envelope (and one nested past the recursion
    limit) stopped every worker at once."""
    assert settings.broker_url and settings.broker_url.startswith("redis")
    worker = procs.worker(settings, "rawctl")
    control = create_app(settings).control
    wait_until(lambda: control.inspect(timeout=1).ping(), 30, "the worker to answer ping")
    client = redis.Redis.from_url(settings.broker_url)
    db = client.connection_pool.connection_kwargs.get("db", 0)
    channel = f"/{db}.celery.pidbox"  # kombu's topic: its fanout prefix, then the exchange
    payloads = ["{}", "[]", '{"properties": 1}', "[" * 100_000, '{"body": ' * 50_000]
    for payload in payloads:
        assert client.publish(channel, payload) == 1, "the worker listens on this channel"

    wait_until(
        lambda: (
            not worker.alive()
            or worker.log().count("ignored a malformed broadcast message") == len(payloads)
        ),
        30,
        "the worker to log each message",
    )
    assert worker.alive(), worker.log()[-3000:]
    assert control.inspect(timeout=5).ping()
    with SagaClient(settings) as saga_client:
        procs.relay(settings)
        run_id = saga_client.start(sagas.two, {})
        assert saga_client.result(run_id, timeout=60)["trail"] == [1, 2]
    assert "Traceback" not in worker.log()


def test_a_broadcast_kombu_cannot_act_on_is_ignored(
    settings: Settings, procs: ProcessGroup
) -> None:
    """A regular expression matcher (kombu's pcre runs it on the consumer loop: this one
    backtracks for hours on the worker's long host name), an unknown matcher, an unknown field
    or a clock that is not an integer: each is ignored with one line, and the worker answers
    the next ping. Before, the first stalled the worker and the others had Celery reset the
    control channel."""
    assert settings.broker_url
    worker = procs.worker(settings, "ctl" + "a" * 40)
    control = create_app(settings).control
    wait_until(lambda: control.inspect(timeout=1).ping(), 30, "the worker to answer ping")

    bad: list[tuple[dict[str, Any], dict[str, Any] | None, str]] = [
        ({"method": "ping", "pattern": "(((.+)+)+)+!", "matcher": "pcre"}, None, "'pcre'"),
        ({"method": "ping", "pattern": "x", "matcher": "nope"}, None, "'nope'"),
        ({"method": "ping", "self": 1}, None, "fields 'self'"),
        ({"method": "ping"}, {"clock": "x"}, "clock header is a str"),
    ]
    for body, headers, cause in bad:
        since = len(worker.log())
        broadcast(settings.broker_url, body, headers=headers)
        assert control.inspect(timeout=5, limit=1).ping(), f"no answer after {body} {headers}"
        lines = [
            line
            for line in worker.log()[since:].splitlines()
            if "ignored a malformed remote control message" in line
        ]
        assert len(lines) == 1 and cause in lines[0], lines
    assert control.inspect(timeout=5, limit=1, pattern="ctl*", matcher="glob").ping()
    assert worker.alive()
    assert "Traceback" not in worker.log()
