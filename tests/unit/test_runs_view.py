"""saga.runs_view's pure parts: merging a step's attempts, outcomes, trace ids, model usage, the
list order a filter picks; and saga.cli_runs' time parsing."""

from __future__ import annotations

import datetime as dt
from typing import Any

import pytest

from saga.cli_runs import parse_time
from saga.errors import InputError
from saga.runs_view import (
    RunFilter,
    _step_view,
    _usage,
    latest_outcome,
    merge_attempts,
    order_of,
    trace_id_of,
)

T = dt.datetime(2026, 1, 1, tzinfo=dt.UTC)


def step_row(**values: Any) -> dict[str, Any]:
    return {
        "step_key": "book",
        "step_name": "book",
        "kind": "action",
        "seq": 1,
        "position": None,
        "state": "completed",
        "attempt": 1,
        "max_attempts": 3,
        "idempotency_key": "r:book",
        "input": None,
        "result": None,
        "error": None,
        "lease_owner": "h:1:b:d",
        "due_at": None,
        "created_at": T,
        "started_at": T,
        "attempt_started_at": T,
        "finished_at": T,
        **values,
    }


def kept(attempt: int, outcome: str) -> dict[str, Any]:
    return {
        "attempt": attempt,
        "worker": f"h:{attempt}:b:d",
        "claimed_at": T,
        "finished_at": T,
        "outcome": outcome,
        "error_type": "E",
        "error_message": "m",
        "traceback": None,
    }


def test_the_step_rows_latest_attempt_follows_the_kept_ones() -> None:
    views = merge_attempts(step_row(attempt=3), [kept(2, "lost"), kept(1, "failed")])
    assert [(v.attempt, v.outcome) for v in views] == [(1, "failed"), (2, "lost"), (3, "completed")]
    assert views[2].worker == "h:1:b:d"


def test_a_step_waiting_for_its_retry_holds_no_attempt_of_its_own() -> None:
    row = step_row(state="pending", attempt=2, error={"type": "E", "message": "m"})
    assert [v.attempt for v in merge_attempts(row, [kept(1, "failed"), kept(2, "failed")])] == [
        1,
        2,
    ]
    assert merge_attempts(step_row(state="dispatched", attempt=0), []) == []


def test_a_running_attempt_has_no_end_yet() -> None:
    [running] = merge_attempts(step_row(state="running"), [])
    assert (running.outcome, running.finished_at) == ("running", None)


def test_a_running_retry_does_not_show_the_previous_attempts_error() -> None:
    # The claim leaves attempt 1's error on the row; attempt 2 has none of its own yet.
    row = step_row(state="running", attempt=2, error={"type": "ValueError", "message": "boom"})
    views = merge_attempts(row, [kept(1, "failed")])
    assert [(v.attempt, v.outcome, v.error_type) for v in views][1] == (2, "running", None)


@pytest.mark.parametrize(
    ("state", "error", "outcome"),
    [
        ("completed", None, "completed"),
        ("failed", {"type": "LeaseExpired"}, "lost"),
        ("failed", {"type": "saga.errors.StepTimeoutError"}, "timed_out"),
        ("failed", {"type": "builtins.ValueError"}, "failed"),
        ("cancelled", {"type": "builtins.ValueError"}, "failed"),
        ("cancelled", None, "unknown"),
    ],
)
def test_latest_outcome(state: str, error: Any, outcome: str) -> None:
    assert latest_outcome(state, error) == outcome


def test_trace_ids() -> None:
    tp = "00-0af7651916cd43dd8448eb211c80319c-b7ad6b7169203331-01"
    assert trace_id_of({"traceparent": tp}) == "0af7651916cd43dd8448eb211c80319c"
    assert trace_id_of({}) is None
    assert trace_id_of({"traceparent": "00-" + "0" * 32 + "-b7ad6b7169203331-01"}) is None
    assert trace_id_of(None) is None


def test_compensations_name_the_step_they_undo() -> None:
    undo = _step_view(step_row(step_key="compensate:book#2", kind="compensation"), [])
    assert undo.compensation_of == "book#2"
    assert _step_view(step_row(), []).compensation_of is None


def test_usage_sums_the_completions() -> None:
    completion = {
        "object": "saga.completion",
        "usage": {"prompt_tokens": 3, "completion_tokens": 2, "total_tokens": 5},
    }
    steps = [_step_view(step_row(step_key=f"decide#{i}", result=completion), []) for i in (1, 2)]
    usage = _usage(steps)
    assert usage is not None and usage["calls"] == 2 and usage["total"]["total_tokens"] == 10
    assert _usage([_step_view(step_row(result={"x": 1}), [])]) is None


def test_the_list_order_follows_the_most_selective_filter() -> None:
    assert order_of(RunFilter()) == "created"
    assert order_of(RunFilter(states=("failed",), saga="s")) == "created"
    assert order_of(RunFilter(finished_until=T)) == "finished"
    assert order_of(RunFilter(finished_since=T, run_id_prefix="a")) == "run_id"


def test_times_ago_and_iso() -> None:
    before = dt.datetime.now(dt.UTC)
    assert before - dt.timedelta(hours=2, seconds=5) < parse_time("--since", "2h") < before
    assert parse_time("--since", "2026-01-01T00:00:00+00:00") == T
    assert parse_time("--since", "2026-01-01T00:00").tzinfo is not None  # the machine's zone
    with pytest.raises(InputError, match="is not a time"):
        parse_time("--since", "yesterday")
