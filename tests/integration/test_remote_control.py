"""Remote control on a real ``saga worker``: inspection answers (the usual liveness probe), and
no broadcast message (a command that would stop it, pickle, a malformed body) stops or stalls
the worker."""

from __future__ import annotations

import pickle
from typing import Any

from kombu import Connection, Exchange, Producer

from saga.client import SagaClient
from saga.settings import Settings
from saga.workers.app import create_app
from tests import sagas
from tests.processes import ProcessGroup, wait_until


def broadcast(url: str, body: Any, *, serializer: str = "json") -> None:
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
            producer.publish(body, serializer=serializer)


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
