"""The durable core end to end: real Postgres, Redis, worker and relay processes."""

from __future__ import annotations

import os
import signal
from collections import Counter
from typing import Any

import psycopg
import pytest
import redis

from saga.client import SagaClient
from saga.errors import RunConflictError, UnknownSagaError
from saga.messages import step_message
from saga.outbox.message import OutboxMessage
from saga.settings import Settings
from saga.workers.app import create_app
from saga.workers.publish import CeleryPublisher
from tests import sagas
from tests.processes import ProcessGroup, wait_until

Conn = psycopg.Connection[Any]


def calls(db: Conn, run_id: str) -> Counter[str]:
    rows = db.execute("SELECT step FROM test_calls WHERE run_id = %s", (run_id,)).fetchall()
    return Counter(r[0] for r in rows)


def attempt_calls(db: Conn, run_id: str, step: str) -> list[tuple[int, str]]:
    return [
        (r[0], r[1])
        for r in db.execute(
            "SELECT attempt, idempotency_key FROM test_calls WHERE run_id = %s AND step = %s "
            "ORDER BY id",
            (run_id, step),
        ).fetchall()
    ]


@pytest.fixture
def client(settings: Settings) -> Any:
    with SagaClient(settings) as c:
        yield c


def test_ten_step_saga_completes_across_two_workers(
    settings: Settings, procs: ProcessGroup, client: SagaClient, db: Conn
) -> None:
    procs.relay(settings)
    procs.worker(settings, "w1")
    procs.worker(settings, "w2")
    run_ids = [client.start(sagas.ten, {"n": i}) for i in range(6)]
    for i, run_id in enumerate(run_ids):
        assert client.result(run_id, timeout=60) == {"n": i, "trail": list(range(1, 11))}
        assert calls(db, run_id) == Counter({f"step{k}": 1 for k in range(1, 11)})
    pids = {r[0] for r in db.execute("SELECT DISTINCT pid FROM test_calls").fetchall()}
    assert len(pids) == 2, "both worker processes ran steps"
    steps = client.steps(run_ids[0])
    assert [s.state for s in steps] == ["completed"] * 10
    assert all(s.attempt == 1 for s in steps)
    assert len({s.idempotency_key for s in steps}) == 10


def test_kill_9_during_step_7_resumes_at_step_7(
    settings: Settings, procs: ProcessGroup, client: SagaClient, db: Conn
) -> None:
    procs.relay(settings)
    doomed = procs.worker(settings, "doomed")
    run_id = client.start(sagas.ten, {"block_at": 7})
    wait_until(lambda: calls(db, run_id)["step7"] == 1, 60, "step 7 to start")
    doomed.kill()
    procs.worker(settings, "survivor")
    assert client.result(run_id, timeout=60)["trail"] == list(range(1, 11))

    counted = calls(db, run_id)
    for k in (1, 2, 3, 4, 5, 6, 8, 9, 10):
        assert counted[f"step{k}"] == 1, f"step{k} ran {counted[f'step{k}']} times"
    step7 = attempt_calls(db, run_id, "step7")
    assert len(step7) == 2
    assert [a for a, _ in step7] == [1, 2]
    assert step7[0][1] == step7[1][1] == f"{run_id}:step7"
    error = next(s for s in client.steps(run_id) if s.step_name == "step7").error
    assert error is None  # the journal keeps the last outcome; the lost attempt is counted
    assert next(s for s in client.steps(run_id) if s.step_name == "step7").attempt == 2


def test_prefork_child_killed_mid_step_resumes(
    settings: Settings, procs: ProcessGroup, client: SagaClient, db: Conn
) -> None:
    procs.relay(settings)
    procs.prefork_worker(settings)
    run_id = client.start(sagas.two, {"block_at": 2})
    pid = wait_until(
        lambda: db.execute(
            "SELECT pid FROM test_calls WHERE run_id = %s AND step = 'step2'", (run_id,)
        ).fetchone(),
        60,
        "step 2 to start",
    )[0]  # type: ignore[index]
    os.kill(pid, signal.SIGKILL)  # the pool child only; the parent starts a new one
    assert client.result(run_id, timeout=60)["trail"] == [1, 2]
    assert calls(db, run_id) == Counter({"step1": 1, "step2": 2})


def test_same_message_published_twice_runs_once(
    settings: Settings, procs: ProcessGroup, client: SagaClient, db: Conn
) -> None:
    run_id = client.start(sagas.two, {})
    # No relay yet: publish the first step's message twice ourselves, then start a worker.
    message = step_message(settings.queue, run_id, "step1", {})
    publisher = CeleryPublisher(create_app(settings))
    publisher.publish([message, message])
    procs.worker(settings, "w1")
    procs.relay(settings)
    assert client.result(run_id, timeout=60)["trail"] == [1, 2]
    # And once more after completion: still nothing runs again.
    publisher.publish([message])
    procs.relay(settings, "relay2")  # a second relay must not publish anything twice either
    client.start(sagas.two, {}, run_id="probe")
    client.result("probe", timeout=60)
    assert calls(db, run_id) == Counter({"step1": 1, "step2": 1})


def test_fast_path_publishes_write_no_outbox_rows_and_nothing_is_sent_twice(
    settings: Settings, procs: ProcessGroup, client: SagaClient, db: Conn
) -> None:
    workers = [procs.worker(settings, "w1"), procs.worker(settings, "w2")]
    procs.relay(settings)
    run_id = client.start(sagas.ten, {})
    assert client.result(run_id, timeout=60)["trail"] == list(range(1, 11))
    # The client published step 1 and the workers steps 2-10 themselves, each message backed by
    # its journal row alone.
    assert db.execute("SELECT count(*) FROM saga_outbox").fetchone() == (0,)
    # Anything sent twice would be queued before this probe's message.
    client.result(client.start(sagas.two, {}), timeout=60)
    for worker in workers:
        assert "nothing to do" not in worker.log(), "a step message was delivered twice"
    assert sum(calls(db, run_id).values()) == 10


def test_a_start_that_cannot_reach_the_broker_goes_to_the_relay(
    settings: Settings, procs: ProcessGroup, db: Conn
) -> None:
    down = settings.model_copy(update={"broker_url": "redis://127.0.0.1:1/0"})  # nothing listens
    with SagaClient(down) as offline:
        run_id = offline.start(sagas.two, {})
    rows = db.execute("SELECT payload->>'run_id', published_at FROM saga_outbox").fetchall()
    assert rows == [(run_id, None)]
    procs.worker(settings, "w1")
    procs.relay(settings)
    with SagaClient(settings) as client:
        assert client.wait(run_id, timeout=60).state == "completed"


def test_a_fast_path_publish_that_fails_goes_to_the_relay(settings: Settings, db: Conn) -> None:
    from saga.workers.executor import StepExecutor

    class BrokerDown:
        def publish(self, messages: object) -> None:
            raise ConnectionError("broker down")

    executor = StepExecutor(settings, create_app(settings))
    executor.publisher = BrokerDown()  # type: ignore[assignment]
    message = step_message(settings.queue, "no-such-run", "s1", {})
    try:
        executor._publish_now([message])
    finally:
        executor.leases.stop()
        executor.store.close()
    row = db.execute(
        "SELECT task_name, published_at, available_at <= now() FROM saga_outbox"
        " WHERE message_id = %s",
        (message.message_id,),
    ).fetchone()
    assert row == (message.task_name, None, True)


def test_a_run_keeps_its_queue_whoever_dispatches_its_steps(
    settings: Settings, procs: ProcessGroup, client: SagaClient, db: Conn
) -> None:
    # Workers only on the run's queue; the sweeper (with the relay) and the operator's client
    # are configured for another queue, which nothing consumes.
    run_queue = settings.model_copy(update={"queue": f"{settings.queue}-gpu"})
    procs.worker(run_queue, "w-gpu")
    procs.relay(settings)
    with SagaClient(run_queue) as starter:
        # Step 2 fails until its 4 attempts run out; the sweeper dispatches its retries.
        run_id = starter.start(sagas.two, {"fail_at": [2], "fail_times": 4})
    wait_until(lambda: client.run(run_id).state == "failed", 60, "the run to fail")
    client.retry(run_id)  # the operator's retry: step 2's fifth attempt succeeds
    assert client.result(run_id, timeout=60)["trail"] == [1, 2]
    assert calls(db, run_id) == Counter({"step1": 1, "step2": 5})


@pytest.mark.parametrize("definition", [sagas.routed, sagas.routed_code], ids=["graph", "code"])
def test_a_step_routed_to_another_queue_runs_only_on_that_queues_workers(
    definition: Any, settings: Settings, procs: ProcessGroup, client: SagaClient, db: Conn
) -> None:
    main = procs.worker(settings, "w-main")
    gpu = procs.worker(settings.model_copy(update={"queue": sagas.GPU_QUEUE}), "w-gpu")
    procs.relay(settings)
    # Step 2 fails once: its retry, dispatched by the sweeper, must go to the gpu queue too.
    run_id = client.start(definition, {"fail_at": [2]})
    assert client.result(run_id, timeout=60)["trail"] == [1, 2, 3]
    ran_on = db.execute(
        "SELECT split_part(step, '#', 1), array_agg(DISTINCT pid), count(*) FROM test_calls "
        "WHERE run_id = %s GROUP BY 1 ORDER BY 1",
        (run_id,),
    ).fetchall()
    assert ran_on == [
        ("step1", [main.pid], 1),
        ("step2", [gpu.pid], 2),
        ("step3", [main.pid], 1),
    ]


def test_relay_killed_between_commit_and_publish(
    settings: Settings, procs: ProcessGroup, client: SagaClient, db: Conn
) -> None:
    procs.worker(settings, "w1")
    relay = procs.relay(settings)
    wait_until(lambda: "relay running" in relay.log(), 30, "the relay to start")
    os.killpg(relay.pid, signal.SIGSTOP)  # it can no longer publish anything
    with SagaClient(settings, publish=False) as through_the_outbox:
        run_id = through_the_outbox.start(sagas.ten, {})
    unpublished = db.execute(
        "SELECT count(*) FROM saga_outbox WHERE published_at IS NULL"
    ).fetchone()
    assert unpublished == (1,), "the start committed its message to the outbox"
    relay.kill()  # dies after the commit, before its publish
    procs.relay(settings, "relay-restarted")
    assert client.result(run_id, timeout=60)["trail"] == list(range(1, 11))
    assert sum(calls(db, run_id).values()) == 10


def test_broker_flushed_mid_run_every_run_completes(
    settings: Settings,
    procs: ProcessGroup,
    client: SagaClient,
    db: Conn,
    redis_client: redis.Redis,
) -> None:
    procs.relay(settings)
    procs.worker(settings, "w1")
    procs.worker(settings, "w2")
    run_ids = [client.start(sagas.ten, {"n": i, "sleep": 0.05}) for i in range(8)]
    wait_until(
        lambda: db.execute("SELECT count(*) FROM test_calls").fetchone()[0] >= 20,  # type: ignore[index]
        60,
        "the runs to get going",
    )
    redis_client.flushdb()  # every queued and unacked message is gone
    for run_id in run_ids:
        assert client.result(run_id, timeout=90)["trail"] == list(range(1, 11))
    for run_id in run_ids:
        counted = calls(db, run_id)
        assert set(counted) == {f"step{k}" for k in range(1, 11)}
        # A step can run twice only if it was mid-flight while its message vanished and the
        # lease ran out; completed steps never run again.
        assert all(n <= 2 for n in counted.values())


def test_retries_then_completes_with_backoff_in_postgres(
    settings: Settings, procs: ProcessGroup, client: SagaClient, db: Conn
) -> None:
    procs.relay(settings)
    procs.worker(settings, "w1")
    run_id = client.start(sagas.two, {"fail_at": [2], "fail_times": 2})
    assert client.result(run_id, timeout=60)["trail"] == [1, 2]
    assert [a for a, _ in attempt_calls(db, run_id, "step2")] == [1, 2, 3]
    assert calls(db, run_id)["step1"] == 1
    step2 = client.steps(run_id)[1]
    assert step2.attempt == 3 and step2.state == "completed"


def test_failures_fail_the_run_with_clear_errors(
    settings: Settings, procs: ProcessGroup, client: SagaClient, db: Conn
) -> None:
    procs.relay(settings)
    procs.worker(settings, "w1")
    not_json = client.start(sagas.not_json, None)
    too_big = client.start(sagas.too_big, 20_000)
    fatal = client.start(sagas.fatal, None)
    exhausts = client.start(sagas.exhausts, None)

    run = client.wait(not_json, timeout=60)
    assert run.state == "failed"
    assert "cannot be journaled" in run.error["message"]
    assert not_json in run.error["message"] and "returns_object" in run.error["message"]

    run = client.wait(too_big, timeout=60)
    assert run.state == "failed"
    assert "10000 bytes" in run.error["message"] and too_big in run.error["message"]
    assert "returns_text" in run.error["message"]

    run = client.wait(fatal, timeout=60)
    assert run.state == "failed" and run.error["type"] == "builtins.ValueError"
    assert calls(db, fatal)["fails_for_good"] == 1, "non-retryable errors are not retried"

    run = client.wait(exhausts, timeout=60)
    assert run.state == "failed" and run.error["attempt"] == 3
    assert calls(db, exhausts)["always_flaky"] == 3
    # A result that cannot be journaled is not retried either.
    assert calls(db, not_json)["returns_object"] == 1


def test_malformed_messages_are_rejected_and_worker_keeps_running(
    settings: Settings,
    procs: ProcessGroup,
    client: SagaClient,
    db: Conn,
    redis_client: redis.Redis,
) -> None:
    procs.relay(settings)
    worker = procs.worker(settings, "w1")
    publisher = CeleryPublisher(create_app(settings))
    publisher.publish(
        [
            OutboxMessage("saga.step", settings.queue, {"run": "x"}),
            OutboxMessage("saga.step", settings.queue, {"run_id": "nope", "step_key": "s"}),
        ]
    )
    # A pickle message: refused before any code of ours sees it.
    app = create_app(settings)
    app.conf.task_serializer = "pickle"
    app.send_task(
        "saga.step",
        kwargs={"run_id": "x", "step_key": "y"},
        queue=settings.queue,
        serializer="pickle",
    )
    run_id = client.start(sagas.two, {})
    assert client.result(run_id, timeout=60)["trail"] == [1, 2]
    assert worker.alive()
    log = worker.log()
    assert "rejected malformed task message" in log
    assert "does not exist; dropped" in log
    assert "pickle" in log.lower()


def test_start_is_idempotent_and_conflicts_are_errors(client: SagaClient) -> None:
    first = client.start(sagas.two, {"a": 1}, run_id="order-42")
    again = client.start(sagas.two, {"a": 1}, run_id="order-42")
    assert first == again == "order-42"
    assert len(client.steps("order-42")) == 1
    with pytest.raises(RunConflictError, match="order-42"):
        client.start(sagas.two, {"a": 2}, run_id="order-42")
    with pytest.raises(UnknownSagaError, match="nope"):
        client.start("tests.sagas:nope", {})
    with pytest.raises(UnknownSagaError, match="module:attribute"):
        client.start("tests.sagas", {})


def test_a_start_repeated_after_a_lost_reply_leaves_what_it_owes_to_the_sweeper(
    settings: Settings, db: Conn
) -> None:
    # A start whose commit's reply was lost published nothing; its retry finds the run there
    # and makes the run's dispatched steps due now, for the sweeper to send (a duplicate, if
    # the first message did go out, is fenced by the claim).
    patient = settings.model_copy(update={"dispatch_timeout_seconds": 600.0})
    with SagaClient(patient) as client:
        run_id = client.start(sagas.two, {}, run_id="lost-reply")
        due = "SELECT due_at > now() + interval '60 seconds' FROM saga_steps WHERE run_id = %s"
        assert db.execute(due, (run_id,)).fetchone() == (True,)
        assert client.start(sagas.two, {}, run_id="lost-reply") == run_id
        assert db.execute(due, (run_id,)).fetchone() == (False,)
