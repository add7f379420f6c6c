"""Reading a run's spans back from the test OTLP receiver: what the tracing tests assert with."""

from __future__ import annotations

import pytest

from saga.client import SagaClient
from saga_dev.otlp_receiver import OTLPReceiver, ReceivedSpan
from tests.processes import wait_until

# The processes under test export with the SDK and OTLP exporter; the receiver decodes with the
# protobuf classes. Without them, every test module importing this one is skipped.
pytest.importorskip("opentelemetry.sdk")
pytest.importorskip("opentelemetry.exporter.otlp.proto.http")
pytest.importorskip("opentelemetry.proto")


def run_spans(receiver: OTLPReceiver, run_id: str) -> list[ReceivedSpan]:
    return [s for s in receiver.spans() if s.attributes.get("saga.run_id") == run_id]


def root_of(receiver: OTLPReceiver, run_id: str) -> ReceivedSpan | None:
    return next(
        (s for s in run_spans(receiver, run_id) if s.name.startswith("saga ")),
        None,
    )


def by(spans: list[ReceivedSpan], prefix: str) -> list[ReceivedSpan]:
    return [s for s in spans if s.name.startswith(prefix)]


def trace_complete(receiver: OTLPReceiver, run_id: str) -> bool:
    """The run's root has arrived, and the parent of every span of the run too (a parent ends,
    so is exported, after its children)."""
    root = root_of(receiver, run_id)
    if root is None:
        return False
    ids = {s.span_id for s in receiver.spans() if s.trace_id == root.trace_id}
    return all(not s.parent_span_id or s.parent_span_id in ids for s in run_spans(receiver, run_id))


def wait_for_trace(receiver: OTLPReceiver, run_id: str, steps: int, prefix: str = "step ") -> None:
    """Until the run's trace is complete with at least ``steps`` spans named ``prefix`` ..."""
    wait_until(
        lambda: (
            trace_complete(receiver, run_id)
            and len(by(run_spans(receiver, run_id), prefix)) >= steps
        ),
        30,
        f"the whole trace of run {run_id} ({steps} {prefix!r} spans)",
    )


def assert_one_trace(client: SagaClient, receiver: OTLPReceiver, run_id: str) -> ReceivedSpan:
    """Every span of the run is in the run's trace and descends from its root span, whose ids
    are the ones stored with the run."""
    root = root_of(receiver, run_id)
    assert root is not None, f"no root span for run {run_id}"
    stored = client.store.trace_context(run_id)
    assert stored is not None
    _, trace_id, span_id, _ = stored[1]["traceparent"].split("-")
    assert (root.trace_id, root.span_id, root.parent_span_id) == (trace_id, span_id, "")
    spans = run_spans(receiver, run_id)
    assert {s.trace_id for s in spans} == {trace_id}, "one trace id for the whole run"
    in_trace = {s.span_id: s for s in receiver.spans() if s.trace_id == trace_id}
    for s in spans:
        seen, at = set(), s
        while at.parent_span_id:
            assert at.span_id not in seen
            seen.add(at.span_id)
            parent = in_trace.get(at.parent_span_id)
            assert parent is not None, f"{s.name} ({s.attributes}): a parent was never exported"
            at = parent
        assert at.span_id == root.span_id, f"{s.name} does not descend from the run's root"
    return root


def step_spans(spans: list[ReceivedSpan], step: str) -> list[ReceivedSpan]:
    return sorted(
        (s for s in by(spans, "step ") if s.attributes["saga.step"] == step),
        key=lambda s: s.attributes["saga.step.attempt"],
    )
