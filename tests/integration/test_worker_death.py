"""A worker killed after the broker handed it a step's message, before it claimed the step:
the message stays unacknowledged in Redis (for its visibility timeout, an hour), and the step
would wait for its dispatch timeout. The worker registry notices the silent worker and the
sweeper dispatches the step again at once."""

from __future__ import annotations

from typing import Any

import psycopg

from saga import SagaClient, Settings
from tests import coordinator_sagas as cs
from tests import sagas
from tests.processes import ProcessGroup, wait_until

Conn = psycopg.Connection[Any]


def test_a_message_taken_by_a_worker_killed_before_its_claim_is_dispatched_again(
    settings: Settings, procs: ProcessGroup, db: Conn, database_url: str
) -> None:
    # Far beyond the test's own deadlines: only the dead-worker recovery can save the step.
    settings = settings.model_copy(update={"dispatch_timeout_seconds": 600.0})
    procs.relay(settings)
    with SagaClient(settings) as client:
        run_id = client.start(sagas.two, {})
    key = sagas.two.roots[0].name
    with psycopg.connect(database_url) as holder:  # holds the step's row: the claim must wait
        holder.execute(
            "SELECT 1 FROM saga_steps WHERE run_id = %s AND step_key = %s FOR UPDATE",
            (run_id, key),
        )
        doomed = procs.worker(settings, "doomed")
        waiting = wait_until(
            lambda: db.execute(
                "SELECT pid FROM pg_stat_activity WHERE application_name = 'saga-worker' "
                "AND wait_event_type = 'Lock'"
            ).fetchone(),
            60,
            "the worker's claim to wait on the held row",
        )
        doomed.kill()  # it has the message, unacknowledged, and has not claimed the step
        db.execute("SELECT pg_terminate_backend(%s)", (waiting[0],))  # type: ignore[index]
        holder.rollback()
    assert db.execute(
        "SELECT state FROM saga_steps WHERE run_id = %s AND step_key = %s", (run_id, key)
    ).fetchone() == ("dispatched",)
    procs.worker(settings, "rescuer")
    with SagaClient(settings) as client:
        assert client.wait(run_id, timeout=60).state == "completed"
    relay_log = procs.processes[0].log()
    assert "stopped beating" in relay_log


def test_an_advance_task_lost_with_the_broker_is_sent_again(
    settings: Settings, procs: ProcessGroup, db: Conn, redis_client: Any
) -> None:
    procs.relay(settings)
    worker = procs.worker(settings, "w1")
    with SagaClient(settings) as client:
        run_id = client.start(cs.approval, {"item": "x"})
        wait_until(
            lambda: db.execute(
                "SELECT 1 FROM saga_steps WHERE run_id = %s AND state = 'waiting'", (run_id,)
            ).fetchone(),
            60,
            "the workflow to wait for its event",
        )
        worker.stop()  # no one takes the advance task before the broker loses it
        assert client.send_event(run_id, "approval", {"ok": True}) is True
        wait_until(
            lambda: db.execute(
                "SELECT 1 FROM saga_outbox WHERE task_name = 'saga.advance' "
                "AND payload->>'run_id' = %s AND published_at IS NOT NULL",
                (run_id,),
            ).fetchone(),
            60,
            "the advance task to be published",
        )
        redis_client.flushdb()  # the broker restarted empty
        procs.worker(settings, "w2")
        run = client.wait(run_id, timeout=60)
    assert run.state == "completed", run
    assert run.result["decision"] == {"ok": True}
