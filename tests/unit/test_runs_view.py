"""saga.runs_view's pure parts: merging a step's attempts, outcomes, trace ids, model usage, the
list order a filter picks, a step's limits and what a throttled one waits for; saga.cli_runs'
time parsing and saga.run_text's lines for limits."""

from __future__ import annotations

import datetime as dt
from typing import Any

import pytest

from saga.cli_runs import parse_time
from saga.errors import InputError
from saga.run_text import _step_lines, limit_text
from saga.runs_view import (
    LimitView,
    RunFilter,
    _step_view,
    _usage,
    _waits,
    latest_outcome,
    limit_views,
    merge_attempts,
    order_of,
    throttled_by,
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


# -- limits (saga.limits): what a step declared, where it stands ---------------------------------

GATES = [
    {"gate": "r:llm:acme", "kind": "rate", "limit": 50, "period": 60.0, "units": 8, "fair": "acme"},
    {"gate": "c:tenant_runs:acme", "kind": "concurrency", "limit": 2, "fair": "acme", "run": True},
    {"gate": "c:ask:", "kind": "concurrency", "limit": 5, "fair": ""},
]


def slot(gate: str, step_key: str, state: str, **values: Any) -> dict[str, Any]:
    return {
        "gate": gate,
        "step_key": step_key,
        "state": state,
        "since": T,
        "place": None,
        "in_line": 0,
        "in_use": 1,
        "paused_until": None,
        **values,
    }


def test_a_steps_limits_are_read_in_the_order_it_takes_them_with_its_slots() -> None:
    slots = {
        ("c:tenant_runs:acme", ""): slot("c:tenant_runs:acme", "", "held", in_use=2),
        ("c:ask:", "ask#1"): slot("c:ask:", "ask#1", "waiting", place=3, in_line=4, in_use=5),
    }
    run_limit, own, rate = limit_views("ask#1", GATES, slots)
    # The run's slot, then the step's own concurrency, then rate budget.
    assert (run_limit.name, run_limit.key, run_limit.run_level, run_limit.status) == (
        "tenant_runs",
        "acme",
        True,
        "held",
    )
    assert (own.gate, own.status, own.place, own.in_line, own.in_use) == (
        "c:ask:",
        "waiting",
        3,
        4,
        5,
    )
    assert (own.key, own.period, own.units) == ("", None, None)
    assert (rate.kind, rate.limit, rate.period, rate.units, rate.status) == (
        "rate",
        50,
        60.0,
        8,
        None,
    )
    assert limit_views("ask#1", None, {}) == [] and limit_views("ask#1", "junk", {}) == []


def test_a_throttled_step_waits_for_the_gate_whose_line_it_is_in() -> None:
    slots = {("c:ask:", "ask#1"): slot("c:ask:", "ask#1", "waiting", place=1, in_line=1)}
    s = _step_view(step_row(step_key="ask#1", state="throttled", gates=GATES), [], slots)
    waiting = throttled_by(s)
    assert waiting is not None and waiting.gate == "c:ask:"
    # Its place not read (the line changed between the reads): the first gate it does not hold.
    unread = _step_view(step_row(step_key="ask#1", state="throttled", gates=GATES), [])
    first = throttled_by(unread)
    assert first is not None and first.gate == "c:tenant_runs:acme"
    assert throttled_by(_step_view(step_row(state="running", gates=GATES), [], slots)) is None
    [wait] = _waits([s], [])
    assert (wait.kind, wait.step_key, wait.name, wait.since) == ("limit", "ask#1", "c:ask:", T)


def test_show_prints_the_limits_of_steps_not_ended() -> None:
    paused = T + dt.timedelta(minutes=1)
    slots = {
        ("r:llm:acme", "ask#1"): slot(
            "r:llm:acme", "ask#1", "waiting", place=2, in_line=7, in_use=48, paused_until=paused
        ),
        ("c:tenant_runs:acme", ""): slot("c:tenant_runs:acme", "", "held", in_use=2),
    }
    s = _step_view(step_row(step_key="ask#1", state="throttled", gates=GATES), [], slots)
    lines = list(_step_lines(s, tracebacks=False))
    assert lines[0].split()[1:] == ["ask#1", "action", "throttled", "1"]
    assert (
        "       limit  concurrency 'tenant_runs' key 'acme' (per run): 2/2 in use; its run "
        "holds a slot" in lines
    )
    assert "       limit  concurrency 'ask': 5 at a time" in lines  # not taken yet: no slot row
    assert (
        "       limit  rate limit 'llm' key 'acme': 8 of 50 units per 60 s, 48 granted in the "
        "window; throttled, 2 of 7 in line since 2026-01-01 00:00:00; paused until "
        "2026-01-01 00:01:00 (the service asked)"
    ) in lines
    done = _step_view(step_row(step_key="ask#1", state="completed", gates=GATES), [], slots)
    assert not any("limit" in line for line in _step_lines(done, tracebacks=False))
    offered = LimitView("r:llm:", "rate", "llm", "", 50, 60.0, 1, status="offered")
    assert limit_text(offered).endswith("; budget freed for it: dispatched to take it")
