"""The states of runs and steps, the kinds of steps, and which changes between them are allowed.

One vocabulary for Python and SQL: the schema's CHECK lists and the literals the statements in
``saga.queries`` use are checked against these enums by ``tests/unit/test_states.py``. They are
``StrEnum``s, so a state read back from Postgres as ``str`` compares equal to its member.

The state machines below are the schema's (first written as the header comment of migration
0001, which, applied, cannot change): every change is a guarded ``UPDATE ... WHERE state ...``.

Runs::

    running -> completed | failed                       (the coordinator finishes it)
    running -> compensating                             (a step failed for good, or it was stopped)
    running -> cancelled                                (stopped with nothing to undo)
    compensating -> compensated | cancelled | compensation_failed
    failed -> running, compensation_failed -> compensating           (operator retry)

Steps::

    pending -> dispatched -> running -> completed | failed
    pending -> running                                  (claimed once due, without a message)
    running -> running                                  (the same delivery retrying its claim)
    running -> pending                                  (a failed attempt, retried at due_at;
                                                         or a lease that expired)
    waiting -> completed                                (an event step: the event arrived)
    waiting | pending -> dispatched                     (its timeout came; a timer fell due)
    dispatched -> dispatched                            (its message was lost: sent again)
    pending | dispatched | waiting -> cancelled         (the run moved on)
    dispatched | pending -> throttled -> dispatched     (a limit refused its claim: it waits in
                                                         line, and goes when handed a slot)
    throttled -> cancelled                              (the run moved on)
    failed | cancelled -> dispatched | pending | waiting (operator retry)
"""

from __future__ import annotations

from enum import StrEnum


class RunState(StrEnum):
    RUNNING = "running"
    COMPENSATING = "compensating"
    COMPLETED = "completed"
    COMPENSATED = "compensated"
    FAILED = "failed"
    COMPENSATION_FAILED = "compensation_failed"
    CANCELLED = "cancelled"


class StepState(StrEnum):
    PENDING = "pending"  # waits for due_at (a retry's backoff, a timer)
    DISPATCHED = "dispatched"  # its task message is on its way
    RUNNING = "running"  # claimed: one attempt, fenced by its number, under a lease
    WAITING = "waiting"  # an event step: waits for the event (or its timeout)
    COMPLETED = "completed"
    FAILED = "failed"
    CANCELLED = "cancelled"
    THROTTLED = "throttled"  # waits in line for a concurrency slot or rate budget (0010)


class GateKind(StrEnum):
    """Flow-control gates (saga.limits, 0010): their kind, and the state of a slot row."""

    CONCURRENCY = "concurrency"
    RATE = "rate"


class GateSlotState(StrEnum):
    HELD = "held"  # a slot taken (by a step, or a run)
    WAITING = "waiting"  # a throttled step in line
    OFFERED = "offered"  # a rate waiter dispatched to take budget that freed


class StepKind(StrEnum):
    ACTION = "action"
    COMPENSATION = "compensation"
    TIMER = "timer"
    EVENT = "event"


FINAL_RUN_STATES = frozenset(
    {
        RunState.COMPLETED,
        RunState.COMPENSATED,
        RunState.FAILED,
        RunState.COMPENSATION_FAILED,
        RunState.CANCELLED,
    }
)
ACTIVE_RUN_STATES = frozenset({RunState.RUNNING, RunState.COMPENSATING})
FINAL_STEP_STATES = frozenset({StepState.COMPLETED, StepState.FAILED, StepState.CANCELLED})
# Steps that have not started: the sweeper dispatches them when due, a stopping run cancels them.
OPEN_STEP_STATES = frozenset({StepState.PENDING, StepState.DISPATCHED, StepState.WAITING})
# A stopping run cancels those and the throttled ones (which wait for a gate, not for a time).
CANCELLABLE_STEP_STATES = OPEN_STEP_STATES | {StepState.THROTTLED}

RUN_TRANSITIONS: dict[RunState, frozenset[RunState]] = {
    RunState.RUNNING: frozenset(
        {RunState.COMPLETED, RunState.FAILED, RunState.COMPENSATING, RunState.CANCELLED}
    ),
    RunState.COMPENSATING: frozenset(
        {RunState.COMPENSATED, RunState.CANCELLED, RunState.COMPENSATION_FAILED}
    ),
    RunState.FAILED: frozenset({RunState.RUNNING}),
    RunState.COMPENSATION_FAILED: frozenset({RunState.COMPENSATING}),
    RunState.COMPLETED: frozenset(),
    RunState.COMPENSATED: frozenset(),
    RunState.CANCELLED: frozenset(),
}

STEP_TRANSITIONS: dict[StepState, frozenset[StepState]] = {
    # A pending step whose time has come may be claimed without being dispatched again.
    StepState.PENDING: frozenset(
        {StepState.DISPATCHED, StepState.RUNNING, StepState.CANCELLED, StepState.THROTTLED}
    ),
    StepState.DISPATCHED: frozenset(
        {StepState.RUNNING, StepState.DISPATCHED, StepState.CANCELLED, StepState.THROTTLED}
    ),
    StepState.THROTTLED: frozenset({StepState.DISPATCHED, StepState.CANCELLED}),
    StepState.RUNNING: frozenset(
        {StepState.RUNNING, StepState.COMPLETED, StepState.FAILED, StepState.PENDING}
    ),
    StepState.WAITING: frozenset({StepState.COMPLETED, StepState.DISPATCHED, StepState.CANCELLED}),
    StepState.COMPLETED: frozenset(),
    StepState.FAILED: frozenset({StepState.DISPATCHED}),
    StepState.CANCELLED: frozenset({StepState.DISPATCHED, StepState.PENDING, StepState.WAITING}),
}


def run_may_become(old: str, new: str) -> bool:
    return RunState(new) in RUN_TRANSITIONS[RunState(old)]


def step_may_become(old: str, new: str) -> bool:
    return StepState(new) in STEP_TRANSITIONS[StepState(old)]


# The one rule of which steps may act in which run state: a step is claimed (and dispatched) only
# while its run is in the state its kind runs in; an outcome is journaled while its run is in one
# of ``OUTCOME_RUN_STATES`` (an action that finishes while the run is being undone is journaled,
# so the compensation sees it, but it gets no new attempt).
_CLAIM_RUN_STATE: dict[StepKind, RunState] = {
    StepKind.ACTION: RunState.RUNNING,
    StepKind.TIMER: RunState.RUNNING,
    StepKind.EVENT: RunState.RUNNING,
    StepKind.COMPENSATION: RunState.COMPENSATING,
}
_OUTCOME_RUN_STATES: dict[StepKind, frozenset[RunState]] = {
    StepKind.ACTION: ACTIVE_RUN_STATES,
    StepKind.TIMER: ACTIVE_RUN_STATES,
    StepKind.EVENT: ACTIVE_RUN_STATES,
    StepKind.COMPENSATION: frozenset({RunState.COMPENSATING}),
}


def claim_run_state(kind: str) -> RunState:
    """The run state in which a step of ``kind`` may be claimed or dispatched."""
    return _CLAIM_RUN_STATE[StepKind(kind)]


def may_claim(kind: str, run_state: str) -> bool:
    return run_state == _CLAIM_RUN_STATE[StepKind(kind)]


def may_journal_outcome(kind: str, run_state: str) -> bool:
    """Whether an attempt's outcome may be journaled while its run is in ``run_state``."""
    return run_state in _OUTCOME_RUN_STATES[StepKind(kind)]


# The state a step is scheduled in (and reopened in by an operator retry): an action or a
# compensation is dispatched at once, a timer waits for its due_at, an event step for its event.
INITIAL_STEP_STATE: dict[StepKind, StepState] = {
    StepKind.ACTION: StepState.DISPATCHED,
    StepKind.COMPENSATION: StepState.DISPATCHED,
    StepKind.TIMER: StepState.PENDING,
    StepKind.EVENT: StepState.WAITING,
}


class AttemptOutcome(StrEnum):
    """How one attempt of a step ended (saga.runs_view). Only the last three are ever rows of
    saga_attempts (migration 0006's CHECK list): an attempt that did not end its step."""

    RUNNING = "running"
    COMPLETED = "completed"
    UNKNOWN = "unknown"  # journaled before history was kept
    FAILED = "failed"
    TIMED_OUT = "timed_out"
    LOST = "lost"  # its worker died (the lease expired)


class RunEventType(StrEnum):
    """Run-level events saga_run_events records (0006); started, finished and waits are read
    from the runs' and steps' own rows instead."""

    COMPENSATION_BEGUN = "compensation_begun"
    DEADLINE_PASSED = "deadline_passed"  # the sweeper stopped a run past its timeout
    CANCEL = "cancel"
    RETRY = "retry"
    FORK = "fork"  # on the forked run: detail names the new run
    FORKED_FROM = "forked_from"  # on the new run: detail names the run and step
    SEND_EVENT = "send_event"
