"""The state vocabulary (saga.states) against the SQL that spells it out: the schema's CHECK
lists and partial indexes, and the literals and the claim rule in saga.queries. A state added in
Python and not in SQL (or the other way round) fails here, not in production."""

from __future__ import annotations

import re

import pytest

from saga import queries
from saga.failures import attempt_outcome
from saga.migrate import available_migrations
from saga.states import (
    ACTIVE_RUN_STATES,
    CANCELLABLE_STEP_STATES,
    FINAL_RUN_STATES,
    INITIAL_STEP_STATE,
    OPEN_STEP_STATES,
    RUN_TRANSITIONS,
    STEP_TRANSITIONS,
    AttemptOutcome,
    GateKind,
    GateSlotState,
    RunState,
    StepKind,
    StepState,
    claim_run_state,
    may_claim,
    may_journal_outcome,
    run_may_become,
    step_may_become,
)

SCHEMA = "\n".join(m.sql for m in available_migrations())
VOCABULARY = {*RunState, *StepState, *StepKind, *GateKind, *GateSlotState}


def _quoted(text: str) -> set[str]:
    return set(re.findall(r"'([a-z_]+)'", text))


def _check_list(column: str) -> set[str]:
    match = re.search(
        rf"\b{column}\s+text NOT NULL.*?CHECK \({column} IN \((.*?)\)\)", SCHEMA, re.S
    )
    assert match, f"no CHECK list for {column} in the migrations"
    return _quoted(match[1])


def _statements() -> dict[str, str]:
    return {
        name: value
        for name, value in vars(queries).items()
        if name.isupper() and isinstance(value, str)
    }


def test_schema_check_lists_are_the_enums() -> None:
    # saga_runs.state, saga_steps.state and saga_steps.kind as 0001 creates them; a later
    # migration that changes a list is checked against the database by tests/migration
    # (test_check_constraints_are_the_state_enums reads pg_constraint).
    run_state = re.search(r"saga_runs \(.*?CHECK \(state IN \((.*?)\)\)", SCHEMA, re.S)
    step_state = re.search(r"saga_steps \(.*?CHECK \(state IN \((.*?)\)\)", SCHEMA, re.S)
    # 0010 widens the steps' list (throttled): the last constraint written is the one in force.
    widened = re.findall(r"saga_steps_state_check CHECK \(state IN \((.*?)\)\)", SCHEMA, re.S)
    assert run_state and step_state and widened
    assert _quoted(run_state[1]) == set(RunState)
    assert _quoted(widened[-1]) == set(StepState)
    assert _quoted(step_state[1]) == set(StepState) - {StepState.THROTTLED}
    assert _check_list("kind") == set(StepKind)


def test_schema_partial_indexes_and_triggers_use_the_state_sets() -> None:
    active = re.search(r"saga_runs_active .*? WHERE state IN \((.*?)\)", SCHEMA)
    finished = re.search(r"WHEN \(NEW\.state IN \((.*?)\)", SCHEMA)
    assert active and finished
    assert _quoted(active[1]) == ACTIVE_RUN_STATES
    assert _quoted(finished[1]) == FINAL_RUN_STATES


def test_the_steps_due_index_names_no_column_a_claim_changes() -> None:
    # 0011: a claim and a lease renewal stay HOT only if no index names what they set.
    index = re.search(r"CREATE INDEX .*?saga_steps_open_due ON saga_steps \((.*?)\) (.*?);", SCHEMA)
    assert index, "0011's index of open steps is gone"
    claimed = re.search(r"SET (.*?)\nFROM", _statements()["CLAIM_STEP"], re.S)
    renewed = re.search(r"SET (.*?)\nWHERE", _statements()["RENEW_LEASE"], re.S)
    assert claimed and renewed
    written = set(re.findall(r"(\w+) = ", claimed[1] + renewed[1]))
    assert {"state", "attempt", "lease_expires_at"} <= written
    named = set(re.findall(r"\b[a-z_]+\b", f"{index[1]} {index[2]}")) - {
        "where",
        "is",
        "null",
        "not",
    }
    assert named == {"due_at", "finished_at"}
    assert not written & named


def test_a_step_in_a_final_state_is_finished() -> None:
    # saga_steps_open_due holds the steps with no finished_at: each statement that ends a step
    # sets it (a final step left out of it would stay in the sweeper's scans until pruned).
    s = _statements()
    ending = [
        name
        for name, sql in s.items()
        if re.search(r"saga_steps\b", sql)
        and re.search(
            r"(?:state = |THEN |ELSE |VALUES \(.*?)'(?:completed|failed|cancelled)'", sql, re.S
        )
        and re.search(r"(?:UPDATE|INSERT INTO) saga_steps\b", sql)
    ]
    assert {"COMPLETE_STEP", "FAIL_ATTEMPT", "EXPIRE_LEASE", "CANCEL_OPEN_STEPS"} <= set(ending)
    assert {"DELIVER_EVENT", "INSERT_RECEIVED_EVENT", "FORK_STEPS"} <= set(ending)
    for name in ending:
        assert "finished_at" in s[name], f"{name} ends a step without setting finished_at"


@pytest.mark.parametrize("name", sorted(_statements()))
def test_every_state_or_kind_literal_in_a_statement_is_in_the_vocabulary(name: str) -> None:
    sql = _statements()[name]
    # Literals compared with, or assigned to, a state or kind column (s.state, r.kind, ...).
    compared = re.findall(
        r"\b(?:state|kind)\s*(?:=|<>|IN|WHEN)\s*\(?((?:'[a-z_]+'(?:\s*,\s*)?)+)", sql
    )
    literals = set().union(*(_quoted(c) for c in compared)) if compared else set()
    assert literals <= VOCABULARY, f"{name} uses {literals - VOCABULARY}"


def test_the_claim_rule_in_sql_is_the_one_in_python() -> None:
    # CLAIM_STEP and REDISPATCH_DUE encode "which kind runs in which run state" as a CASE.
    case = re.compile(r"r\.state = CASE s\.kind WHEN '(\w+)' THEN '(\w+)' ELSE '(\w+)' END")
    for name in ("CLAIM_STEP", "REDISPATCH_DUE"):
        match = case.search(_statements()[name])
        assert match, f"{name} lost its claim rule"
        kind, its_state, others = match.groups()
        assert claim_run_state(kind) == its_state
        assert {claim_run_state(k) for k in StepKind if k != kind} == {others}


def test_the_claim_and_outcome_rules() -> None:
    for kind in (StepKind.ACTION, StepKind.TIMER, StepKind.EVENT):
        assert may_claim(kind, RunState.RUNNING)
        assert not may_claim(kind, RunState.COMPENSATING)
        # An action finishing while its run is undone is journaled (the compensation sees it).
        assert may_journal_outcome(kind, RunState.COMPENSATING)
    assert may_claim(StepKind.COMPENSATION, RunState.COMPENSATING)
    assert not may_claim(StepKind.COMPENSATION, RunState.RUNNING)
    assert not may_journal_outcome(StepKind.COMPENSATION, RunState.RUNNING)
    for state in FINAL_RUN_STATES:
        assert not any(may_claim(k, state) or may_journal_outcome(k, state) for k in StepKind)


def test_transition_tables_cover_every_state() -> None:
    assert set(RUN_TRANSITIONS) == set(RunState)
    assert set(STEP_TRANSITIONS) == set(StepState)
    # Final run states change only by an operator retry (failed, compensation_failed).
    assert {s for s in FINAL_RUN_STATES if RUN_TRANSITIONS[s]} == {
        RunState.FAILED,
        RunState.COMPENSATION_FAILED,
    }
    assert run_may_become("running", "compensating")
    assert not run_may_become("completed", "running")
    assert step_may_become("running", "pending")
    assert not step_may_become("completed", "running")
    assert set(INITIAL_STEP_STATE) == set(StepKind)


def test_the_transitions_the_sql_makes_are_in_the_tables() -> None:
    s = _statements()
    assert "state = 'compensating'" in s["BEGIN_COMPENSATION"]
    assert "AND state = 'running'" in s["BEGIN_COMPENSATION"]
    assert run_may_become("running", "compensating")
    assert "state IN ('running', 'compensating')" in s["FINISH_RUN"]
    assert all(
        any(run_may_become(old, new) for new in FINAL_RUN_STATES) for old in ACTIVE_RUN_STATES
    )
    # CLAIM_STEP: dispatched, a due pending one, or the same owner's running one -> running.
    assert "SET state = 'running'" in s["CLAIM_STEP"]
    assert all(step_may_become(old, "running") for old in ("dispatched", "pending", "running"))
    # CANCEL_OPEN_STEPS and REDISPATCH_DUE act on the open steps.
    cancelled = _quoted(re.findall(r"state IN \((.*?)\)", s["CANCEL_OPEN_STEPS"])[0])
    assert cancelled == CANCELLABLE_STEP_STATES
    assert _quoted(re.findall(r"state IN \((.*?)\)", s["REDISPATCH_DUE"])[0]) == OPEN_STEP_STATES
    assert all(step_may_become(old, "cancelled") for old in CANCELLABLE_STEP_STATES)
    assert all(step_may_become(old, "dispatched") for old in OPEN_STEP_STATES)
    # COMPLETE_STEP, FAIL_ATTEMPT, EXPIRE_LEASE: from running only.
    for name in ("COMPLETE_STEP", "FAIL_ATTEMPT", "EXPIRE_LEASE"):
        assert re.search(r"\bstate = 'running'", s[name]), name
    assert {"completed", "failed", "pending"} <= STEP_TRANSITIONS[StepState.RUNNING]


def test_kept_attempt_outcomes_are_the_enum() -> None:
    """saga_attempts.outcome (0006) holds only attempts that did not end their step."""
    kept = {AttemptOutcome.FAILED, AttemptOutcome.TIMED_OUT, AttemptOutcome.LOST}
    assert _check_list("outcome") == kept
    # What the operator's retry writes for the attempt it supersedes, and FAIL_ATTEMPT's
    # outcome parameter (saga.failures.attempt_outcome), stay within that list.
    written = _quoted(queries.RETRY_FAILED_STEPS.split("FROM saga_steps")[0])
    assert written - {"type", "message", "traceback"} == kept  # less the error's keys
    for error_type in ("LeaseExpired", "saga.errors.StepTimeoutError", "builtins.ValueError"):
        assert attempt_outcome(error_type) in kept


def test_the_runs_list_spells_every_run_state() -> None:
    """A list by creation time has one branch per state (saga.queries._by_created)."""
    assert tuple(RunState) == queries._RUN_STATES
