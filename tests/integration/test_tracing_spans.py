"""The spans of what is not a plain step attempt: compensations, steps read back from the journal
(a workflow resumed by another worker, a duplicate delivery), durable sleeps and event waits. Real
worker, relay and CLI processes export to the test's OTLP receiver."""

from __future__ import annotations

import json
import subprocess
import sys
from collections import Counter
from typing import Any

import psycopg

from saga.client import SagaClient
from saga.messages import step_message
from saga.settings import Settings
from saga.workers.app import create_app
from saga.workers.publish import CeleryPublisher
from saga_dev.otlp_receiver import OTLPReceiver, ReceivedSpan
from tests import coordinator_sagas as cs
from tests import sagas
from tests.processes import ROOT, ProcessGroup, wait_until
from tests.traces import assert_one_trace, by, run_spans, step_spans, wait_for_trace

Conn = psycopg.Connection[Any]


def replayed(spans: list[ReceivedSpan]) -> list[ReceivedSpan]:
    return [s for s in by(spans, "step ") if s.attributes["saga.step.replayed"]]


def key_of(span: ReceivedSpan) -> str:
    """The step key of a step span (its idempotency key is ``<run_id>:<step_key>``)."""
    return str(span.attributes["saga.step.idempotency_key"]).split(":", 1)[1]


def test_compensations_of_a_failed_run_are_spans_of_its_trace(
    receiver: OTLPReceiver, settings: Settings, procs: ProcessGroup, client: SagaClient
) -> None:
    procs.relay(settings)
    procs.worker(settings, "w1")
    run_id = client.start(cs.trip, {"city": "Lisbon", "fail_payment": True})
    assert client.wait(run_id, timeout=60).state == "compensated"
    wait_for_trace(receiver, run_id, 5)
    wait_for_trace(receiver, run_id, 3, prefix="compensate ")

    root = assert_one_trace(client, receiver, run_id)  # every span descends from the root
    assert root.status == "ERROR" and root.attributes["saga.run.state"] == "compensated"
    # The exception's type, not its message (SAGA_TRACE_EXCEPTION_DETAILS exports that).
    exception = dict(root.events)["exception"]
    assert exception["exception.message"] == "redacted; see the journal"
    assert exception["exception.type"] == "tests.coordinator_sagas.PaymentDeclined"
    spans = run_spans(receiver, run_id)
    (payment,) = step_spans(spans, "payment")
    assert payment.status == "ERROR"
    compensations = by(spans, "compensate ")
    assert sorted(s.name for s in compensations) == [
        "compensate car",
        "compensate flight",
        "compensate hotel",
    ]
    deliveries = {s.span_id: s for s in by(spans, "process ")}
    for undo in compensations:
        step = undo.attributes["saga.step"]
        assert undo.attributes["saga.compensation"] is True
        assert undo.attributes["saga.step.replayed"] is False
        assert undo.attributes["saga.step.idempotency_key"] == f"{run_id}:compensate:{step}"
        assert undo.status == "UNSET"
        assert undo.start_ns >= payment.end_ns, "compensations start once the failure is known"
        delivery = deliveries[undo.parent_span_id]
        assert delivery.attributes["saga.step"] == step
        assert delivery.attributes["saga.step.outcome"] == "completed"


def test_workflow_resumed_by_another_worker_shows_the_steps_it_read_back(
    receiver: OTLPReceiver,
    settings: Settings,
    procs: ProcessGroup,
    client: SagaClient,
    db: Conn,
) -> None:
    procs.relay(settings)
    doomed = procs.worker(settings, "doomed")
    run_id = client.start(cs.agent_loop, {"iterations": 8, "block": "think#5"})

    def exported_deliveries() -> int:
        spans = by(run_spans(receiver, run_id), "process ")
        return sum(s.attributes["saga.step.outcome"] == "completed" for s in spans)

    # think#1-4 done and exported (their whole deliveries), think#5 hangs: kill its worker.
    wait_until(lambda: exported_deliveries() >= 4, 60, "think#1-4 exported")
    wait_until(
        lambda: db.execute(
            "SELECT 1 FROM saga_steps WHERE run_id = %s AND step_key = 'think#5' "
            "AND state = 'running' AND attempt = 1",
            (run_id,),
        ).fetchone(),
        60,
        "think#5 to start",
    )
    doomed.kill()
    survivor = procs.worker(settings, "survivor")
    assert client.result(run_id, timeout=90) == {"iterations": 8, "seen": list(range(8))}
    # 8 steps run, think#5's lost attempt, and think#1-4 read back.
    wait_for_trace(receiver, run_id, 13)

    assert_one_trace(client, receiver, run_id)
    spans = run_spans(receiver, run_id)
    # A replay runs in an outcome transaction, under its delivery's span; a replayed span under
    # a send span is a duplicate delivery instead (a message re-dispatched while one waited).
    deliveries = {s.span_id: s for s in by(spans, "process ")}
    sends = {s.span_id for s in by(spans, "send ")}
    read_back = [s for s in replayed(spans) if s.parent_span_id in deliveries]
    assert all(s.parent_span_id in sends for s in replayed(spans) if s not in read_back)
    per_process = Counter((s.resource["process.pid"], key_of(s)) for s in read_back)
    assert set(per_process.values()) == {1}, f"a step read back twice by one process: {per_process}"
    assert set(per_process) == {(survivor.pid, f"think#{i}") for i in range(1, 5)}
    attempts = {s.step_key: s.attempt for s in client.steps(run_id)}
    for span in read_back:
        assert span.attributes["saga.step.attempt"] == attempts[key_of(span)]
        assert span.attributes["saga.step"] == "think"
    # They were read back by the replay that followed think#5's completion on the survivor.
    (delivery,) = {s.parent_span_id for s in read_back}
    ran = [s for s in by(spans, "step ") if s.parent_span_id == delivery and s not in read_back]
    assert [key_of(s) for s in ran] == ["think#5"]
    assert deliveries[delivery].resource["process.pid"] == survivor.pid
    # And not run again: each think ran to success exactly once.
    assert sagas.calls(db, run_id) == Counter({f"think#{i}": 1 for i in range(1, 9)})


def test_duplicate_delivery_of_a_completed_step_is_a_replayed_span(
    receiver: OTLPReceiver,
    settings: Settings,
    procs: ProcessGroup,
    client: SagaClient,
    db: Conn,
) -> None:
    procs.relay(settings)
    procs.worker(settings, "w1")
    run_id = client.start(sagas.two, {})
    assert client.result(run_id, timeout=60)["trail"] == [1, 2]
    wait_for_trace(receiver, run_id, 2)
    root = assert_one_trace(client, receiver, run_id)

    # The same message again, as a broker redelivery would bring it (headers: the run's).
    stored = client.store.trace_context(run_id)
    assert stored is not None
    CeleryPublisher(create_app(settings)).publish(
        [step_message(settings.queue, run_id, "step1", stored[1])]
    )

    def duplicates() -> list[ReceivedSpan]:
        spans = replayed(run_spans(receiver, run_id))
        return [s for s in spans if s.parent_span_id == root.span_id]

    wait_until(duplicates, 30, "the duplicate delivery's span")
    (span,) = duplicates()
    assert span.name == "step step1" and span.trace_id == root.trace_id
    assert span.attributes["saga.step.attempt"] == 1
    assert span.attributes["saga.step.idempotency_key"] == f"{run_id}:step1"
    assert span.attributes["saga.compensation"] is False
    assert span.resource["service.name"] == "saga-worker"
    assert sagas.calls(db, run_id) == Counter({"step1": 1, "step2": 1}), "nothing ran again"


def send_event(settings: Settings, run_id: str, payload: Any) -> str:
    """``saga send-event`` in a process of its own, which exports what it traces."""
    argv = ["send-event", run_id, "approval", "--payload", json.dumps(payload)]
    done = subprocess.run(
        [sys.executable, "-m", "saga", *argv],
        env=settings.child_env(),
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert done.returncode == 0, done.stdout + done.stderr
    return done.stdout.strip()


def test_durable_sleep_and_event_waits_are_spans_under_the_root(
    receiver: OTLPReceiver,
    settings: Settings,
    procs: ProcessGroup,
    client: SagaClient,
    db: Conn,
) -> None:
    sleeper = client.start(cs.parallel_sleep, 2)
    delivered = client.start(cs.approval, {"item": "laptop"})
    timed_out = client.start(cs.approval, {"item": "car", "timeout": 0.5})
    early = client.start(cs.approval, {"item": "desk"})
    assert send_event(settings, early, "early") == "kept until the run waits for it"
    procs.relay(settings)
    procs.worker(settings, "w1")
    wait_until(
        lambda: db.execute(
            "SELECT 1 FROM saga_steps WHERE run_id = %s AND kind = 'event' AND state = 'waiting'",
            (delivered,),
        ).fetchone(),
        60,
        "the approval wait",
    )
    assert send_event(settings, delivered, "yes") == "delivered"
    assert client.result(sleeper, timeout=60) == [0, 1]
    assert client.result(delivered, timeout=60)["decision"] == "yes"
    assert client.result(early, timeout=60)["decision"] == "early"
    assert client.wait(timed_out, timeout=60).state == "compensated"

    def wait_span(run_id: str, kind: str, steps: int) -> tuple[ReceivedSpan, list[ReceivedSpan]]:
        wait_for_trace(receiver, run_id, steps)
        wait_for_trace(receiver, run_id, 1, prefix="wait ")
        root = assert_one_trace(client, receiver, run_id)
        spans = run_spans(receiver, run_id)
        (wait,) = by(spans, f"wait {kind}")
        assert wait.parent_span_id == root.span_id
        assert wait.attributes["saga.wait.kind"] == kind
        assert [s.name for s in by(spans, "wait ")] == [wait.name], "no other wait"
        return wait, spans

    # The sleep: from its scheduling (it cannot be over before its 0.3 s) until the worker took
    # it; what follows it in the code starts after.
    wait, spans = wait_span(sleeper, "sleep", 4)
    assert wait.attributes["saga.step.key"] == "sleep#3"
    assert wait.end_ns - wait.start_ns >= 300_000_000
    assert all(s.start_ns >= wait.end_ns for s in step_spans(spans, "square"))

    # Delivered: recorded by the process that delivered the event (the CLI), between the step
    # before the wait and the one after it.
    for run_id in (delivered, early):
        wait, spans = wait_span(run_id, "event", 2)
        assert wait.attributes["saga.step"] == "approval"
        assert wait.attributes["saga.step.key"] == "approval#2"
        (reserve,) = step_spans(spans, "reserve")
        (after,) = step_spans(spans, "echo")
        assert reserve.end_ns <= wait.start_ns <= wait.end_ns <= after.start_ns
        assert "error.type" not in wait.attributes
    wait, _ = wait_span(delivered, "event", 2)
    assert wait.resource["service.name"] == "saga-cli"
    # Sent before the run waited: the run did not wait at all.
    wait, _ = wait_span(early, "event", 2)
    assert wait.resource["service.name"] == "saga-worker"
    assert wait.start_ns == wait.end_ns

    # Timed out: recorded by the worker that failed the wait, before the compensation ran.
    wait, spans = wait_span(timed_out, "event", 1)
    assert wait.attributes["error.type"] == "EventTimeout"
    assert wait.end_ns - wait.start_ns >= 500_000_000
    (undo,) = by(spans, "compensate ")
    assert wait.end_ns <= undo.start_ns
