"""What flow control shows in a tracing dashboard: a ``wait concurrency`` span for the time a
step waited in line, under its run's trace, and the metrics of limits (steps throttled, time
waited, slots in use and steps in line per limit and key)."""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from saga import SagaClient, Settings
from saga_dev import limit_sagas
from saga_dev.limit_service import URL_ENV, LimitService
from saga_dev.otlp_receiver import OTLPReceiver
from tests.processes import ProcessGroup, wait_until
from tests.traces import run_spans


@pytest.fixture
def service(monkeypatch: pytest.MonkeyPatch) -> Iterator[LimitService]:
    with LimitService() as svc:
        monkeypatch.setenv(URL_ENV, svc.url)
        yield svc


def test_a_wait_in_line_is_a_span_and_limits_have_metrics(
    receiver: OTLPReceiver,
    settings: Settings,
    procs: ProcessGroup,
    service: LimitService,
    tmp_path: Path,
) -> None:
    hold = tmp_path / "go"
    procs.relay(settings)
    procs.worker(settings, "w1", env={URL_ENV: service.url})
    procs.worker(settings, "w2", env={URL_ENV: service.url})
    with SagaClient(settings) as client:
        holder = client.start(
            limit_sagas.one_at_a_time, {"tenant": "t", "ms": 10, "hold": str(hold)}
        )
        wait_until(
            lambda: [s.state for s in client.steps(holder)] == ["running"],
            60,
            "the holder to hold the slot",
        )
        waiter = client.start(limit_sagas.one_at_a_time, {"tenant": "t", "ms": 10})

        def points(metric: str) -> list[Any]:
            return [p for p in receiver.points() if p.metric == metric]

        # While it waits, the relay's gauges show the slot in use and the step in line.
        wait_until(
            lambda: any(p.value == 1 for p in points("saga.limits.waiting")),
            60,
            "the gauge of steps in line",
        )
        in_use = points("saga.limits.in_use")
        assert any(p.value == 1 for p in in_use)
        assert {p.attributes["saga.limit.name"] for p in in_use} == {"single"}
        assert {p.attributes["saga.limit.kind"] for p in in_use} == {"concurrency"}
        hold.touch()
        for run_id in (holder, waiter):
            assert client.wait(run_id, timeout=60).state == "completed"

    def waits() -> list[Any]:
        return [s for s in run_spans(receiver, waiter) if s.name == "wait concurrency"]

    def steps() -> list[Any]:
        return [s for s in run_spans(receiver, waiter) if s.name.startswith("step ")]

    # The wait span ends before the step's span starts: a worker may export them in two batches.
    wait_until(lambda: waits() and steps(), 30, "the waiter's wait span and step span")
    (span,) = waits()
    assert span.attributes["saga.limit.gate"] == "c:single:"
    assert span.attributes["saga.step"] == "call_service"
    assert span.end_ns > span.start_ns
    # The step's own span starts when its wait ends.
    (step,) = steps()
    assert step.start_ns >= span.end_ns - 1_000_000  # the clocks of one machine, within 1 ms
    assert not [s for s in run_spans(receiver, holder) if s.name == "wait concurrency"]

    wait_until(
        lambda: any(p.metric == "saga.limits.wait" for p in receiver.points()),
        30,
        "the wait histogram",
    )
    throttled = [p for p in receiver.points() if p.metric == "saga.limits.throttled"]
    assert throttled and max(p.value for p in throttled) >= 1
    assert {p.attributes["saga.limit.name"] for p in throttled} == {"single"}
