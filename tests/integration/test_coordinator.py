"""Graphs, compensations and workflows written as code, on real workers."""

from __future__ import annotations

from collections import Counter
from collections.abc import Iterator
from typing import Any

import psycopg
import pytest

from saga import SagaClient, Settings
from tests import coordinator_sagas as cs
from tests import sagas
from tests.processes import ProcessGroup, wait_until

Conn = psycopg.Connection[Any]


def calls(db: Conn, run_id: str) -> Counter[str]:
    rows = db.execute("SELECT step FROM test_calls WHERE run_id = %s ORDER BY id", (run_id,))
    return Counter(r[0] for r in rows.fetchall())


def call_order(db: Conn, run_id: str) -> list[str]:
    rows = db.execute("SELECT step FROM test_calls WHERE run_id = %s ORDER BY id", (run_id,))
    return [r[0] for r in rows.fetchall()]


def completion_order(db: Conn, run_id: str, keys: set[str]) -> list[str]:
    rows = db.execute(
        "SELECT step_key FROM saga_steps WHERE run_id = %s AND state = 'completed' "
        "ORDER BY completed_seq",
        (run_id,),
    ).fetchall()
    return [r[0] for r in rows if r[0] in keys]


@pytest.fixture
def client(settings: Settings) -> Iterator[SagaClient]:
    with SagaClient(settings) as c:
        yield c


@pytest.fixture
def running(settings: Settings, procs: ProcessGroup) -> ProcessGroup:
    procs.relay(settings)
    procs.worker(settings, "w1")
    procs.worker(settings, "w2")
    return procs


BRANCHES = {"flight", "hotel", "car"}


def test_trip_books_in_parallel_and_confirms(
    running: ProcessGroup, client: SagaClient, db: Conn
) -> None:
    run_id = client.start(cs.trip, {"city": "Lisbon"})
    assert client.result(run_id, timeout=60) == "confirmed"
    assert calls(db, run_id) == Counter(["quote", "flight", "hotel", "car", "payment", "confirm"])


def test_payment_fails_for_good_compensates_in_reverse_completion_order(
    running: ProcessGroup, client: SagaClient, db: Conn
) -> None:
    run_id = client.start(cs.trip, {"city": "Lisbon", "fail_payment": True})
    run = client.wait(run_id, timeout=60)
    assert run.state == "compensated"
    assert "card declined" in run.error["message"]
    completed = completion_order(db, run_id, BRANCHES)
    undone = [
        k.removeprefix("compensate:") for k in call_order(db, run_id) if k.startswith("compensate:")
    ]
    assert undone == list(reversed(completed))
    assert calls(db, run_id)["payment"] == 1, "PaymentDeclined is not retried"
    assert "confirm" not in calls(db, run_id)


def test_kill_9_during_compensation_still_compensates_each_step_once(
    settings: Settings, procs: ProcessGroup, client: SagaClient, db: Conn
) -> None:
    procs.relay(settings)
    doomed = procs.worker(settings, "doomed")
    run_id = client.start(
        cs.trip, {"city": "Oslo", "fail_payment": True, "block": "compensate:hotel"}
    )
    wait_until(
        lambda: db.execute(
            "SELECT 1 FROM saga_steps WHERE run_id = %s AND step_key = 'compensate:hotel' "
            "AND state = 'running'",
            (run_id,),
        ).fetchone(),
        60,
        "the hotel's compensation to start",
    )
    doomed.kill()
    procs.worker(settings, "survivor")
    run = client.wait(run_id, timeout=60)
    assert run.state == "compensated"
    counted = calls(db, run_id)
    assert {k: counted[k] for k in counted if k.startswith("compensate:")} == {
        "compensate:flight": 1,
        "compensate:hotel": 1,
        "compensate:car": 1,
    }
    hotel = next(s for s in client.steps(run_id) if s.step_key == "compensate:hotel")
    assert hotel.attempt == 2 and hotel.idempotency_key == f"{run_id}:compensate:hotel"


def test_failure_after_the_pivot_is_not_compensated(
    running: ProcessGroup, client: SagaClient, db: Conn
) -> None:
    run_id = client.start(cs.trip, {"city": "Rome", "fail_confirm": True})
    run = client.wait(run_id, timeout=60)
    assert run.state == "failed" and run.error["pivot_passed"] is True
    assert not any(k.startswith("compensate:") for k in calls(db, run_id))


def test_fan_out_to_100_branches_fans_in_once_in_order(
    running: ProcessGroup, client: SagaClient, db: Conn
) -> None:
    run_id = client.start(cs.fan, 100)
    result = client.result(run_id, timeout=120)
    assert result == {"count": 100, "squares": [i * i for i in range(100)]}
    assert calls(db, run_id) == Counter({"total": 1})
    keys = {s.step_key for s in client.steps(run_id)}
    assert {f"square[{i}]" for i in range(100)} <= keys


def test_agent_loop_of_50_with_random_failures_and_a_kill(
    settings: Settings, procs: ProcessGroup, client: SagaClient, db: Conn
) -> None:
    procs.relay(settings)
    doomed = procs.worker(settings, "doomed")
    procs.worker(settings, "w2")
    run_id = client.start(cs.agent_loop, {"iterations": 50, "block": "think#25"})
    wait_until(
        lambda: db.execute(
            "SELECT 1 FROM saga_steps WHERE run_id = %s AND step_key = 'think#25' "
            "AND state = 'running' AND attempt = 1",
            (run_id,),
        ).fetchone(),
        120,
        "iteration 25",
    )
    holder = db.execute(
        "SELECT lease_owner FROM saga_steps WHERE run_id = %s AND step_key = 'think#25'", (run_id,)
    ).fetchone()[0]  # type: ignore[index]
    victim = doomed if f":{doomed.pid}:" in holder else procs.processes[-1]
    victim.kill()
    procs.worker(settings, "replacement")
    assert client.result(run_id, timeout=180) == {"iterations": 50, "seen": list(range(50))}
    succeeded = calls(db, run_id)
    assert succeeded == Counter({f"think#{i}": 1 for i in range(1, 51)})
    failed_attempts = sum(s.attempt - 1 for s in client.steps(run_id))
    assert failed_attempts > 0, "the random failures were retried"


def test_parallel_steps_and_durable_sleep_in_code(
    running: ProcessGroup, client: SagaClient, db: Conn
) -> None:
    run_id = client.start(cs.parallel_sleep, 4)
    assert client.result(run_id, timeout=60) == [0, 1, 4, 9]
    kinds = Counter(s.kind for s in client.steps(run_id))
    assert kinds == Counter({"action": 8, "timer": 1})
    assert calls(db, run_id) == Counter({f"echo#{i}": 1 for i in range(1, 5)})


def test_approval_wait_holds_no_worker_and_resumes_on_the_event(
    settings: Settings, procs: ProcessGroup, client: SagaClient, db: Conn
) -> None:
    procs.relay(settings)
    procs.worker(settings, "only")  # one worker: if the wait held it, nothing else could run
    run_id = client.start(cs.approval, {"item": "laptop"})
    wait_until(
        lambda: db.execute(
            "SELECT 1 FROM saga_steps WHERE run_id = %s AND kind = 'event' AND state = 'waiting'",
            (run_id,),
        ).fetchone(),
        60,
        "the approval wait",
    )
    other = client.start(sagas.two, {})
    assert client.result(other, timeout=60)["trail"] == [1, 2]
    assert client.send_event(run_id, "approval", {"approved": True}) is True
    result = client.result(run_id, timeout=60)
    assert result == {"held": f"{run_id}:reserve#1", "decision": {"approved": True}}


def test_event_sent_before_the_wait_is_kept(running: ProcessGroup, client: SagaClient) -> None:
    run_id = client.start(cs.approval, {"item": "desk", "block": "reserve#1"}, run_id="early")
    assert client.send_event(run_id, "approval", {"approved": "early"}) is False
    # reserve#1 blocks on attempt 1 only after the lease; the run gets there eventually.
    assert client.result(run_id, timeout=60)["decision"] == {"approved": "early"}


def test_approval_timeout_compensates(running: ProcessGroup, client: SagaClient, db: Conn) -> None:
    run_id = client.start(cs.approval, {"item": "car", "timeout": 0.5})
    run = client.wait(run_id, timeout=60)
    assert run.state == "compensated"
    assert run.error["type"] == "saga.workflow.EventTimeout"
    assert calls(db, run_id) == Counter({"reserve#1": 1, "compensate:reserve#1": 1})


def test_cancel_compensates_and_ends_cancelled(
    settings: Settings, procs: ProcessGroup, client: SagaClient, db: Conn
) -> None:
    procs.relay(settings)
    procs.worker(settings, "w1")
    run_id = client.start(cs.approval, {"item": "boat"})
    wait_until(
        lambda: db.execute(
            "SELECT 1 FROM saga_steps WHERE run_id = %s AND kind = 'event' AND state = 'waiting'",
            (run_id,),
        ).fetchone(),
        60,
        "the approval wait",
    )
    client.cancel(run_id, "changed my mind")
    run = client.wait(run_id, timeout=60)
    assert run.state == "cancelled" and run.error["message"] == "changed my mind"
    assert calls(db, run_id)["compensate:reserve#1"] == 1


def test_divergent_replay_stops_with_an_error_then_retry_after_the_fix(
    settings: Settings, procs: ProcessGroup, client: SagaClient, db: Conn
) -> None:
    procs.relay(settings)
    old = procs.worker(settings, "old-code")
    run_id = client.start(cs.diverging, {"block": "second#2"})
    wait_until(
        lambda: (
            calls(db, run_id)["first#1"] == 1
            and db.execute(
                "SELECT 1 FROM saga_steps WHERE run_id = %s AND step_key = 'second#2' "
                "AND state = 'running'",
                (run_id,),
            ).fetchone()
        ),
        60,
        "step 2 to start",
    )
    old.kill()
    diverging = procs.worker(settings, "diverging-code", env={"SAGA_TEST_DIVERGE": "1"})
    run = client.wait(run_id, timeout=60)
    assert run.state == "failed"
    message = run.error["message"]
    assert "NonDeterminismError" in run.error["type"]
    assert "'first'" in message and "'other_first'" in message and "call 1" in message

    diverging.stop()
    procs.worker(settings, "fixed-code")
    client.retry(run_id)
    assert client.result(run_id, timeout=60) == ["first", "second", "third"]
    assert calls(db, run_id)["first#1"] == 1

    # A fork re-runs the chosen step and what follows; the steps before it are copied.
    forked = client.fork(run_id, "echo#3")
    assert client.result(forked, timeout=60) == ["first", "second", "third"]
    assert calls(db, forked) == Counter({"echo#3": 1})


def test_failed_compensation_waits_for_the_operator_then_retries(
    running: ProcessGroup, client: SagaClient, db: Conn, tmp_path: Any
) -> None:
    marker = tmp_path / "fixed"
    run_id = client.start(
        cs.fragile_trip,
        {"city": "Bern", "fail_payment": True, "broken_undo": "car", "fixed_marker": str(marker)},
    )
    run = client.wait(run_id, timeout=60)
    assert run.state == "compensation_failed"
    undo_car = next(s for s in client.steps(run_id) if s.step_key == "compensate:car")
    assert undo_car.state == "failed" and "refuses cancellations" in undo_car.error["message"]
    assert "compensate:flight" not in calls(db, run_id), "nothing is undone past the failure"

    marker.touch()  # the operator fixes the car API
    client.retry(run_id)
    run = client.wait(run_id, timeout=60)
    assert run.state == "compensated"
    assert [k for k in call_order(db, run_id) if k.startswith("compensate:")] == [
        "compensate:car",
        "compensate:flight",
    ]


def test_step_timeout_interrupts_the_attempt_and_retries(
    running: ProcessGroup, client: SagaClient, db: Conn
) -> None:
    run_id = client.start(cs.timeouts, None)
    assert client.result(run_id, timeout=60) == "done"
    assert calls(db, run_id) == Counter({"slow_first_attempt": 2})


def test_run_timeout_stops_and_compensates(
    running: ProcessGroup, client: SagaClient, db: Conn
) -> None:
    run_id = client.start(cs.approval, {"item": "tent"}, timeout=20.0)
    wait_until(
        lambda: db.execute(
            "SELECT 1 FROM saga_steps WHERE run_id = %s AND kind = 'event' AND state = 'waiting'",
            (run_id,),
        ).fetchone(),
        20,
        "the approval wait, before the run's deadline",
    )
    run = client.wait(run_id, timeout=60)
    assert run.state == "compensated" and run.error["type"] == "RunTimeout"
    assert calls(db, run_id) == Counter({"reserve#1": 1, "compensate:reserve#1": 1})
