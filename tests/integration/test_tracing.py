"""OpenTelemetry end to end: real worker and relay processes export OTLP/HTTP to a receiver that
the test runs on loopback, and the test reads the spans and metrics back."""

from __future__ import annotations

import subprocess
import sys
import textwrap
from pathlib import Path
from typing import Any

import psycopg
import pytest

from saga.client import SagaClient
from saga.settings import Settings
from saga_dev.otlp_receiver import OTLPReceiver
from tests import sagas
from tests.processes import ROOT, ProcessGroup, wait_until
from tests.traces import (
    assert_one_trace,
    by,
    run_spans,
    step_spans,
    wait_for_trace,
)

Conn = psycopg.Connection[Any]


def test_one_trace_per_run_across_workers_with_retries_and_metrics(
    receiver: OTLPReceiver, settings: Settings, procs: ProcessGroup, client: SagaClient
) -> None:
    procs.relay(settings)
    procs.worker(settings, "w1")
    procs.worker(settings, "w2")
    retried = client.start(sagas.ten, {"fail_at": [3], "fail_times": 2})
    plain = [client.start(sagas.ten, {"n": i}) for i in range(2)]
    failed = client.start(sagas.exhausts, None)
    for run_id in [retried, *plain]:
        assert client.result(run_id, timeout=60)["trail"] == list(range(1, 11))
    assert client.wait(failed, timeout=60).state == "failed"
    for run_id, steps in [(retried, 12), (plain[0], 10), (plain[1], 10), (failed, 3)]:
        wait_for_trace(receiver, run_id, steps)

    crossed = 0
    for run_id in [retried, *plain]:
        root = assert_one_trace(client, receiver, run_id)
        assert root.name == "saga ten" and root.status == "UNSET"
        assert root.attributes["saga.run.state"] == "completed"
        spans = run_spans(receiver, run_id)
        steps = by(spans, "step ")
        assert root.start_ns <= min(s.start_ns for s in spans)
        assert root.end_ns >= max(s.end_ns for s in steps)
        workers = {s.resource["service.instance.id"] for s in steps}
        crossed += len(workers) >= 2
        assert {s.resource["service.name"] for s in steps} == {"saga-worker"}
        # Every delivery: a CONSUMER span under the PRODUCER span that published it.
        sends = {s.span_id: s for s in by(spans, "send ")}
        for process in by(spans, "process "):
            if process.parent_span_id == root.span_id:
                # The run's first message, published by the client that started the run: this
                # test's client records no spans, so the delivery hangs from the run's root.
                assert process.attributes["saga.step"] == "step1"
                continue
            assert process.kind == "CONSUMER"
            assert process.attributes["messaging.operation.type"] == "process"
            assert process.attributes["messaging.system"] == "redis"
            assert process.attributes["messaging.destination.name"] == settings.queue
            send = sends[process.parent_span_id]
            assert send.kind == "PRODUCER"
            assert send.attributes["messaging.operation.type"] == "send"
            assert (
                send.attributes["messaging.message.id"]
                == process.attributes["messaging.message.id"]
            )
        assert {s.resource["service.name"] for s in sends.values()} <= {
            "saga-worker",  # the fast path
            "saga-relay",
        }
        if run_id == retried:  # its retries went out through the sweeper's outbox rows
            assert any(s.resource["service.name"] == "saga-relay" for s in sends.values())
        for step in steps:
            assert step.attributes["saga.step.replayed"] is False
            assert step.attributes["saga.compensation"] is False
            assert step.attributes["saga.step.idempotency_key"] == (
                f"{run_id}:{step.attributes['saga.step']}"
            )
    assert crossed >= 1, "at least one run ran on both workers"

    # Retried attempts are separate spans, failures recorded as exceptions with error status,
    # and each wait between attempts is a span of its own.
    spans = run_spans(receiver, retried)
    step3 = step_spans(spans, "step3")
    assert [s.attributes["saga.step.attempt"] for s in step3] == [1, 2, 3]
    assert [s.status for s in step3] == ["ERROR", "ERROR", "UNSET"]
    for failed_attempt in step3[:2]:
        exc = dict(failed_attempt.events)["exception"]
        assert exc["exception.type"] == "tests.sagas.Flaky"
        assert exc["exception.message"] == "redacted; see the journal"  # the journal has it
        assert "exception.stacktrace" not in exc
        assert failed_attempt.attributes["error.type"] == "tests.sagas.Flaky"
    attempts3 = sorted(
        (s for s in by(spans, "process ") if s.attributes["saga.step"] == "step3"),
        key=lambda s: s.attributes["saga.step.attempt"],
    )
    assert [s.attributes["saga.step.outcome"] for s in attempts3] == [
        "retry",
        "retry",
        "completed",
    ]
    waits = sorted(by(spans, "wait retry_backoff"), key=lambda s: s.start_ns)
    assert [w.attributes["saga.step.attempt"] for w in waits] == [2, 3]
    for wait, before, after in zip(waits, step3[:-1], step3[1:], strict=True):
        assert before.end_ns <= wait.start_ns <= wait.end_ns <= after.start_ns
    assert all(len(step_spans(spans, f"step{k}")) == 1 for k in (1, 2, 4, 5, 6, 7, 8, 9, 10))

    # A run that fails for good: its root carries the error.
    root = assert_one_trace(client, receiver, failed)
    assert root.status == "ERROR" and root.attributes["saga.run.state"] == "failed"
    assert dict(root.events)["exception"]["exception.type"] == "tests.sagas.Flaky"
    assert len(by(run_spans(receiver, failed), "step ")) == 3

    # Metrics, through OTLP from the workers and the relay. The active-runs gauge counts only
    # runs in flight, and the runs above may all have finished between two of the relay's
    # readings: this one is in flight while the metrics are read (its steps sleep 3 s each).
    client.start(sagas.two, {"sleep": 3})

    def metric_names() -> set[str]:
        return {p.metric for p in receiver.points()}

    wanted = {
        "saga.step.duration",
        "saga.step.attempts",
        "saga.step.queue_wait",
        "saga.runs.finished",
        "saga.outbox.lag",
        "saga.outbox.unpublished",
        "saga.runs.active",
        "saga.outbox.published",
    }

    def labels(metric: str, attribute: str) -> set[Any]:
        return {p.attributes[attribute] for p in receiver.points() if p.metric == metric}

    def missing() -> list[str]:
        outcomes = {"completed", "retry", "failed"} - labels(
            "saga.step.attempts", "saga.step.outcome"
        )
        states = {"completed", "failed"} ^ labels("saga.runs.finished", "saga.run.state")
        in_flight = {"two"} - labels("saga.runs.active", "saga.name")
        return [
            *sorted(wanted - metric_names()),
            *sorted(outcomes),
            *sorted(states),
            *sorted(in_flight),
        ]

    # Cumulative metrics, exported every half second: wait for the last outcomes to arrive.
    try:
        wait_until(lambda: not missing(), 30, "metrics of every outcome")
    except AssertionError as exc:
        raise AssertionError(f"{exc}; still missing: {missing()}") from None
    points = receiver.points()
    durations = [p for p in points if p.metric == "saga.step.duration"]
    assert all(p.kind == "histogram" and (p.count or 0) >= 1 for p in durations)
    lag = [p for p in points if p.metric == "saga.outbox.lag"]
    assert all(p.value is not None and p.value >= 0 for p in lag)
    assert all(p.resource["service.name"] == "saga-relay" for p in lag)


def test_run_resumed_after_kill_9_stays_one_trace(
    receiver: OTLPReceiver,
    settings: Settings,
    procs: ProcessGroup,
    client: SagaClient,
    db: Conn,
) -> None:
    procs.relay(settings)
    doomed = procs.worker(settings, "doomed")
    run_id = client.start(sagas.ten, {"block_at": 7})
    # Steps 1-6 are done and exported by the doomed worker, each delivery's span (which ends
    # after its step span: waiting for step spans alone left a parent unexported now and then);
    # step 7 hangs in it.
    wait_until(lambda: len(by(run_spans(receiver, run_id), "process ")) == 6, 60, "steps 1-6")
    wait_until(
        lambda: db.execute(
            "SELECT 1 FROM test_calls WHERE run_id = %s AND step = 'step7'", (run_id,)
        ).fetchone(),
        60,
        "step 7 to start",
    )
    doomed.kill()
    survivor = procs.worker(settings, "survivor")
    assert client.result(run_id, timeout=60)["trail"] == list(range(1, 11))
    wait_for_trace(receiver, run_id, 11)

    assert_one_trace(client, receiver, run_id)
    spans = run_spans(receiver, run_id)
    steps = by(spans, "step ")
    pids = {s.resource["process.pid"] for s in steps if not s.attributes.get("saga.step.lost")}
    assert pids == {doomed.pid, survivor.pid}, "the trace spans the killed worker and the next"
    # Attempt 1 died with its worker, its spans unexported: the sweeper recorded it as lost.
    lost, step7 = step_spans(spans, "step7")
    assert lost.attributes["saga.step.attempt"] == 1 and lost.attributes["saga.step.lost"]
    assert lost.status == "ERROR" and lost.resource["service.name"] == "saga-relay"
    assert step7.attributes["saga.step.attempt"] == 2
    assert step7.resource["process.pid"] == survivor.pid
    assert "saga.step.lost" not in step7.attributes


def test_prefork_children_recycled_after_each_task_lose_no_spans(
    receiver: OTLPReceiver,
    settings: Settings,
    procs: ProcessGroup,
    client: SagaClient,
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    procs.relay(settings)
    # Nothing is exported on a timer within the test: a child's spans arrive only if the child
    # flushes them as it exits.
    monkeypatch.setenv("OTEL_BSP_SCHEDULE_DELAY", "600000")
    monkeypatch.setenv("OTEL_METRIC_EXPORT_INTERVAL", "600000")
    procs.prefork_worker(settings, "--max-tasks-per-child", "1")
    run_id = client.start(sagas.two, {"fail_at": [2], "fail_times": 1})
    assert client.result(run_id, timeout=90)["trail"] == [1, 2]

    wait_for_trace(receiver, run_id, 3)
    assert_one_trace(client, receiver, run_id)
    spans = run_spans(receiver, run_id)
    assert len(by(spans, "process ")) == 3
    assert len(by(spans, "wait retry_backoff")) == 1
    pids = [s.resource["process.pid"] for s in by(spans, "process ")]
    assert len(set(pids)) == 3, "each attempt ran in a child of its own"

    # The metrics of every child were flushed too (the last child exits after its spans left).
    def attempts() -> set[Any]:
        return {
            p.resource["process.pid"] for p in receiver.points() if p.metric == "saga.step.attempts"
        }

    wait_until(lambda: attempts() >= set(pids), 60, "every child's metrics")
    assert attempts() == set(pids)


_BLOCK_SDK = """
import sys

class _NoOpenTelemetrySDK:
    def find_spec(self, name, path=None, target=None):
        if name.startswith(("opentelemetry.sdk", "opentelemetry.exporter")):
            raise ModuleNotFoundError(f"No module named {name!r} (blocked by the test)")
        return None

sys.meta_path.insert(0, _NoOpenTelemetrySDK())
"""


def test_works_without_the_sdk(
    receiver: OTLPReceiver,
    settings: Settings,
    procs: ProcessGroup,
    tmp_path: Path,
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    blocker = tmp_path / "nosdk"
    blocker.mkdir()
    (blocker / "sitecustomize.py").write_text(textwrap.dedent(_BLOCK_SDK))
    monkeypatch.setenv("PYTHONPATH", str(blocker))
    env = settings.child_env()
    probe = subprocess.run(
        [sys.executable, "-c", "import opentelemetry.sdk"], env=env, capture_output=True
    )
    assert probe.returncode != 0, "the SDK is blocked in child processes"

    procs.relay(settings)
    worker = procs.worker(settings, "w1")
    start = subprocess.run(
        [sys.executable, "-m", "saga", "start", "tests.sagas:two", "--input", "{}", "--wait", "60"],
        env=env,
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=90,
    )
    assert start.returncode == 0, start.stdout + start.stderr
    assert '"state": "completed"' in start.stdout
    assert "not installed" in worker.log()
    assert receiver.requests == 0
