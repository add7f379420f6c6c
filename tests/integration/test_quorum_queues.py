"""RabbitMQ quorum queues (SAGA_QUEUE_TYPE=quorum, Celery 5.5+), on the local RabbitMQ: the
engine declares its queue as a quorum queue, and a saga runs on it (the worker's QoS is then
per consumer: quorum queues have no global QoS), publisher confirms on."""

from __future__ import annotations

from collections.abc import Iterator

import amqp
import pytest
from kombu import Connection

from saga.client import SagaClient
from saga.settings import Settings
from tests import sagas
from tests.conftest import AMQP_URL, unavailable
from tests.processes import ProcessGroup


@pytest.fixture
def quorum(settings: Settings) -> Iterator[Settings]:
    try:
        with Connection(AMQP_URL, connect_timeout=3) as conn:
            conn.connect()
    except Exception as exc:
        unavailable("RabbitMQ", exc)
    yield settings.model_copy(update={"broker_url": AMQP_URL, "queue_type": "quorum"})
    with Connection(AMQP_URL, connect_timeout=3) as conn:
        conn.default_channel.queue_delete(settings.queue)


def queue_type(queue: str) -> str:
    """Declaring the queue again with each type: RabbitMQ refuses the one it is not."""
    for kind in ("quorum", "classic"):
        with Connection(AMQP_URL, connect_timeout=3) as conn:
            try:
                conn.default_channel.queue_declare(
                    queue, durable=True, auto_delete=False, arguments={"x-queue-type": kind}
                )
                return kind
            except amqp.exceptions.PreconditionFailed:
                continue
    raise AssertionError(f"queue {queue} is neither quorum nor classic")


def test_a_saga_runs_on_a_quorum_queue(quorum: Settings, procs: ProcessGroup) -> None:
    procs.relay(quorum)
    worker = procs.worker(quorum, "quorum")
    with SagaClient(quorum) as client:
        run_id = client.start(sagas.ten, {"n": 2})
        assert client.result(run_id, timeout=90)["trail"] == list(range(1, 11))
    assert queue_type(quorum.queue) == "quorum"
    assert "NOT_IMPLEMENTED" not in worker.log()  # global QoS, which quorum queues refuse
