"""The model adapter against the local model server (in a thread), and the agent's replay."""

from __future__ import annotations

import json
from collections.abc import Iterator
from typing import Any

import pytest

from saga.agent.llm import (
    ChatRequest,
    Completion,
    MalformedCompletion,
    ModelRateLimited,
    ModelRequestRejected,
    ModelSettings,
    ModelUnavailable,
    Usage,
    chat,
    run_usage,
)
from saga.retry import RetryPolicy
from saga.workflow import JournalEntry, WorkflowContext
from saga_dev.testing import model_server
from saga_dev.travel_agent import SPECS, TravelTask, first_messages, travel_agent


@pytest.fixture
def server() -> Iterator[Any]:
    srv = model_server.serve(timeout_seconds=1.0, retry_after_seconds=0.25)
    yield srv
    srv.shutdown()
    srv.server_close()


def settings(server: Any, timeout: float = 0.3) -> ModelSettings:
    return ModelSettings(base_url=f"{server.url}/v1", name="scripted", timeout_seconds=timeout)


def request(steps: int = 3) -> ChatRequest:
    return ChatRequest(messages=first_messages(TravelTask(trip="u-1", steps=steps)), tools=SPECS)


def test_a_completion_carries_tool_calls_usage_and_model(server: Any) -> None:
    done = chat(request(), idempotency_key="run:decide#1", settings=settings(server))
    assert [c.name for c in done.tool_calls] == ["lookup_flights"]
    assert done.tool_calls[0].arguments == {"destination": "Lisbon", "day": 1}
    assert done.usage.total_tokens == done.usage.prompt_tokens + done.usage.completion_tokens > 0
    assert done.model == "scripted" and done.answer is None
    assert server.app.stats({})["by_key"]["run:decide#1"]["ok"] == 1  # the key was sent


def test_the_last_step_answers_in_json(server: Any) -> None:
    done = chat(request(steps=1), settings=settings(server))
    assert done.tool_calls == [] and done.answer is not None
    assert done.answer["answer"].startswith("Trip u-1")


@pytest.mark.parametrize(
    ("fault", "error", "words"),
    [
        ("malformed", MalformedCompletion, "not JSON where a JSON object was asked for"),
        ("unknown_tool", MalformedCompletion, "unknown tool 'teleport'"),
        ("500", ModelUnavailable, "HTTP 500"),
        ("timeout", ModelUnavailable, "did not answer within 0.3 s"),
        ("429", ModelRateLimited, "rate-limited"),
    ],
)
def test_each_fault_is_one_failed_attempt_with_a_clear_error(
    server: Any, fault: str, error: type[Exception], words: str
) -> None:
    server.app.control({"force": {"k": [fault]}})
    with pytest.raises(error, match=words) as raised:
        chat(request(), idempotency_key="k", settings=settings(server))
    stats = server.app.stats({})
    assert stats["requests"] == 1, "the client's own retries are off"
    if fault == "429":
        assert getattr(raised.value, "retry_after_seconds", None) == 0.25
    # The next attempt, with the same key, gets its completion.
    assert chat(request(), idempotency_key="k", settings=settings(server)).tool_calls


def test_a_rejected_request_is_not_retryable(server: Any) -> None:
    wrong = ModelSettings(base_url=f"{server.url}/nowhere", timeout_seconds=1)
    with pytest.raises(ModelRequestRejected, match="HTTP 404"):
        chat(request(), settings=wrong)


def test_bad_tool_arguments_are_malformed(server: Any) -> None:
    tools = [SPECS[0].model_copy(update={"parameters": {"required": ["nope"]}})]
    with pytest.raises(MalformedCompletion, match=r"without \['nope'\]"):
        chat(ChatRequest(messages=request().messages, tools=tools), settings=settings(server))


def test_the_retry_policy_waits_at_least_as_long_as_the_provider_asks() -> None:
    policy = RetryPolicy(initial_backoff_seconds=0.1, jitter=0)
    assert policy.decide(1, ModelRateLimited("slow down", 7.5)).delay_seconds == 7.5
    assert policy.decide(1, ModelRateLimited("slow down", None)).delay_seconds == 0.1
    assert policy.decide(1, ModelRateLimited("slow down", 0.01)).delay_seconds == 0.1


class _Step:
    def __init__(self, key: str, state: str, result: Any) -> None:
        self.step_key, self.state, self.result = key, state, result


def test_usage_is_summed_over_a_runs_completed_completions() -> None:
    one = Completion(model="m", usage=Usage(prompt_tokens=10, completion_tokens=2, total_tokens=12))
    two = Completion(model="m", usage=Usage(prompt_tokens=20, completion_tokens=5, total_tokens=25))
    usage = run_usage(
        [
            _Step("decide#1", "completed", one.model_dump()),
            _Step("book_flight#2", "completed", {"booking_id": "BK-1"}),
            _Step("decide#3", "completed", two.model_dump()),
            _Step("decide#5", "running", None),
        ]
    )
    assert usage.calls == 2
    assert usage.total == Usage(prompt_tokens=30, completion_tokens=7, total_tokens=37)
    assert set(usage.by_step) == {"decide#1", "decide#3"}


def test_replay_returns_the_journaled_completion_without_asking_the_model(server: Any) -> None:
    task = TravelTask(trip="replayed", steps=3)
    journaled = chat(request(), settings=settings(server))  # what the model said, once
    before = server.app.stats({})["requests"]
    journal = {
        1: JournalEntry(
            1,
            "decide#1",
            "decide",
            "action",
            "completed",
            json.loads(journaled.model_dump_json()),
            None,
        ),
    }
    ctx = WorkflowContext(
        run_id="r",
        workflow="travel_agent",
        input=task.model_dump(),
        journal=journal,
        consume_event=lambda name: (False, None),
    )
    outcome = travel_agent.replay(ctx)
    assert [c.name for c in outcome.scheduled] == ["lookup_flights"]  # the journaled decision
    assert json.loads(outcome.scheduled[0].input_json) == {"destination": "Lisbon", "day": 1}
    assert server.app.stats({})["requests"] == before
