"""Advances a run: decides, from the journal, what to schedule next, when the run ends, and
which compensations run in what order.

``advance`` runs inside the transaction of the outcome that caused it, holding the run's row
lock, so parallel branches finishing together advance the run exactly once. It reads and writes
only through ``RunTx``, which the store implements.
"""

from __future__ import annotations

import copy
import json
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any, Protocol

from saga.definition import GraphStep, Saga, StepOptions
from saga.errors import SagaError
from saga.outbox.message import OutboxMessage
from saga.retry import RetryPolicy
from saga.states import INITIAL_STEP_STATE, RunState, StepKind, StepState
from saga.workflow import (
    Call,
    JournalEntry,
    NonDeterminismError,
    Workflow,
    WorkflowContext,
)

STEP_TASK = "saga.step"
ADVANCE_TASK = "saga.advance"
COMPENSATION_RETRY = RetryPolicy(
    max_attempts=10, initial_backoff_seconds=1.0, max_backoff_seconds=60.0
)
EVENT_TIMEOUT = "EventTimeout"
# Steps a failure or a stop undoes: completed ones, and ones in flight (they may complete).
_UNDOABLE = (StepState.COMPLETED, StepState.RUNNING)
CANCELLED = "Cancelled"


class DefinitionChangedError(SagaError):
    """The definition a run started with is not the one the workers have now."""


def idempotency_key(run_id: str, step_key: str) -> str:
    """Stable for every attempt of one step of one run; unique across runs."""
    return f"{run_id}:{step_key}"


@dataclass(frozen=True)
class NewStep:
    """A journal row to create; 'dispatched' rows get their task message in the same commit."""

    step_key: str
    step_name: str
    kind: str
    fn_ref: str | None
    input_json: str
    options: Mapping[str, Any]
    max_attempts: int
    idempotency_key: str
    compensation_ref: str | None = None
    position: int | None = None
    state: str = StepState.DISPATCHED  # dispatched | pending (timer) | waiting (event)
    delay_seconds: float | None = None  # when a pending step falls due, or a wait times out


@dataclass(frozen=True)
class RunView:
    run_id: str
    state: str
    saga_name: str
    saga_ref: str
    saga_version: str
    input: Any
    error: Any
    trace_context: Mapping[str, str]
    queue: str | None = None  # its steps' broker queue; None: the dispatching process's


@dataclass(frozen=True)
class JournalRow:
    step_key: str
    step_name: str
    kind: str
    state: str
    position: int | None
    result: Any
    error: Any
    completed_seq: int | None
    compensation_ref: str | None
    options: Mapping[str, Any] = field(default_factory=dict)
    attempt: int = 0  # the latest attempt (for a completed step, the one that completed it)
    result_json: str | None = None  # the result as journaled, when at hand


class RunTx(Protocol):
    """The run, locked, inside an open transaction."""

    run: RunView
    completed: JournalRow | None  # the step whose completion is being journaled, if any

    def journal(self, *, replay: bool = False) -> list[JournalRow]:
        """The run's steps in the order scheduled. ``replay``: a workflow replay reads them
        back (the store traces what it had to fetch as replayed steps)."""
        ...

    def schedule(self, steps: Sequence[NewStep]) -> None: ...
    def consume_event(self, name: str, step_key: str) -> tuple[bool, Any]: ...
    def record_event(self, step: NewStep, payload: Any) -> None: ...
    def finish(
        self,
        state: RunState,
        *,
        result_json: str | None = None,
        error: Mapping[str, Any] | None = None,
    ) -> None: ...
    def begin_compensation(self, error: Mapping[str, Any]) -> None: ...


def step_message(
    queue: str, run_id: str, step_key: str, trace_context: Mapping[str, str]
) -> OutboxMessage:
    """The task message that makes a worker run one attempt of a step."""
    return OutboxMessage(
        task_name=STEP_TASK,
        destination=queue,
        payload={"run_id": run_id, "step_key": step_key},
        headers=dict(trace_context),
    )


def advance_message(queue: str, run_id: str, trace_context: Mapping[str, str]) -> OutboxMessage:
    """The task message that makes a worker advance a run (after an event, or an operator)."""
    return OutboxMessage(
        task_name=ADVANCE_TASK,
        destination=queue,
        payload={"run_id": run_id},
        headers=dict(trace_context),
    )


def error_of(exc: BaseException, **extra: Any) -> dict[str, Any]:
    return {
        "type": f"{type(exc).__module__}.{type(exc).__qualname__}",
        "message": str(exc)[:4000],
        **extra,
    }


Loader = Callable[[str], Saga | Workflow[Any, Any]]


def advance(tx: RunTx, load: Loader) -> None:
    """Move the run on as far as the journal allows."""
    run = tx.run
    if run.state == RunState.COMPENSATING:
        _advance_compensation(tx)
        return
    if run.state != RunState.RUNNING:
        return
    try:
        definition = load(run.saga_ref)
        if definition.version_tag != run.saga_version:
            raise DefinitionChangedError(
                f"run {run.run_id!r} started with version {run.saga_version!r} of "
                f"{run.saga_name!r}; the workers have version {definition.version_tag!r}. "
                f"Deploy the old version to finish it, or fork it onto the new one"
            )
    except SagaError as exc:
        tx.finish(RunState.FAILED, error=error_of(exc))
        return
    if isinstance(definition, Workflow):
        _advance_workflow(tx, definition)
    else:
        _advance_graph(tx, definition)


# -- graphs -----------------------------------------------------------------------------------


def first_steps(saga: Saga, run_id: str, input_json: str) -> list[NewStep]:
    return [_graph_step(run_id, s, s.name, input_json) for s in saga.roots]


def _graph_step(run_id: str, s: GraphStep, key: str, input_json: str) -> NewStep:
    return NewStep(
        step_key=key,
        step_name=s.name,
        kind=StepKind.ACTION,
        fn_ref=s.function.ref,
        input_json=input_json,
        options=s.options.to_json(),
        max_attempts=s.options.retry.max_attempts,
        idempotency_key=idempotency_key(run_id, key),
        compensation_ref=None if s.compensation is None else s.compensation.ref,
    )


class _GraphState:
    """The journal of a graph run, read in terms of the definition."""

    def __init__(self, saga: Saga, rows: list[JournalRow]) -> None:
        self.saga = saga
        self.rows = {r.step_key: r for r in rows}

    def branches(self, s: GraphStep) -> int | None:
        """How many branches a mapped step has, once its list is known."""
        assert s.map_over is not None
        if not self.done(self.saga.get_step(s.map_over)):
            return None
        items = self.result(self.saga.get_step(s.map_over))
        return len(items) if isinstance(items, list) else None

    def done(self, s: GraphStep) -> bool:
        if s.map_over is None:
            row = self.rows.get(s.name)
            return row is not None and row.state == StepState.COMPLETED
        n = self.branches(s)
        return n is not None and all(
            (r := self.rows.get(f"{s.name}[{i}]")) is not None and r.state == StepState.COMPLETED
            for i in range(n)
        )

    def result(self, s: GraphStep) -> Any:
        if s.map_over is None:
            return self.rows[s.name].result
        n = self.branches(s) or 0
        return [self.rows[f"{s.name}[{i}]"].result for i in range(n)]

    def scheduled(self, s: GraphStep) -> bool:
        if s.map_over is None:
            return s.name in self.rows
        return self.done(self.saga.get_step(s.map_over)) and (
            self.branches(s) == 0 or f"{s.name}[0]" in self.rows
        )

    def input_of(self, s: GraphStep, run_input: Any) -> Any:
        deps = [d for d in s.after if d != s.map_over]
        if not deps:
            return run_input
        if len(deps) == 1:
            return self.result(self.saga.get_step(deps[0]))
        return {d: self.result(self.saga.get_step(d)) for d in deps}


def _advance_graph(tx: RunTx, saga: Saga) -> None:
    if _advance_chain(tx, saga):
        return
    rows = tx.journal()
    failed = [r for r in rows if r.kind == StepKind.ACTION and r.state == StepState.FAILED]
    if failed:
        _fail(tx, rows, failed[0].error or {"message": f"step {failed[0].step_name!r} failed"})
        return
    state = _GraphState(saga, rows)
    run = tx.run
    new: list[NewStep] = []
    for s in saga.steps:
        if state.scheduled(s) or not all(state.done(saga.get_step(d)) for d in s.after):
            continue
        value = state.input_of(s, run.input)
        if s.map_over is None:
            new.append(_graph_step(run.run_id, s, s.name, json.dumps(value)))
            continue
        items = state.result(saga.get_step(s.map_over))
        if not isinstance(items, list):
            tx.finish(
                RunState.FAILED,
                error={
                    "type": "TypeError",
                    "message": f"step {s.name!r} maps over the result of {s.map_over!r}, "
                    f"which is a {type(items).__name__}, not a list",
                },
            )
            return
        new.extend(
            _graph_step(run.run_id, s, f"{s.name}[{i}]", json.dumps(item))
            for i, item in enumerate(items)
        )
    if new:
        tx.schedule(new)
    elif all(state.done(s) for s in saga.steps):
        sinks = saga.sinks
        result = (
            state.result(sinks[0]) if len(sinks) == 1 else {s.name: state.result(s) for s in sinks}
        )
        tx.finish(RunState.COMPLETED, result_json=json.dumps(result))


def _advance_chain(tx: RunTx, saga: Saga) -> bool:
    """The common case without reading the journal: a step completed whose successors depend
    on it alone. Their input is its result, and nothing else can be ready because of it."""
    done = tx.completed
    if done is None or done.kind != StepKind.ACTION or done.step_key != done.step_name:
        return False
    following = saga.successors(done.step_name)
    if not following or any(s.after != (done.step_name,) or s.map_over for s in following):
        return False
    result_json = done.result_json or json.dumps(done.result)
    tx.schedule([_graph_step(tx.run.run_id, s, s.name, result_json) for s in following])
    return True


# -- workflows --------------------------------------------------------------------------------


def _call_step(run_id: str, call: Call) -> NewStep:
    options = call.options.to_json()
    return NewStep(
        step_key=call.step_key,
        step_name=call.name,
        kind=call.kind,
        fn_ref=None if call.function is None else call.function.ref,
        input_json=json.dumps(call.input),
        options=options,
        max_attempts=call.options.retry.max_attempts if call.kind == StepKind.ACTION else 1,
        idempotency_key=idempotency_key(run_id, call.step_key),
        compensation_ref=None if call.compensation is None else call.compensation.ref,
        position=call.position,
        state=INITIAL_STEP_STATE[StepKind(call.kind)],
        delay_seconds=call.delay_seconds,
    )


def _private(value: Any) -> Any:
    return copy.deepcopy(value) if isinstance(value, dict | list) else value


def _advance_workflow(tx: RunTx, wf: Workflow[Any, Any]) -> None:
    run = tx.run
    rows = tx.journal(replay=True)
    journal = {
        # A copy: workflow code may mutate what a step returned, and journal rows are cached
        # across replays (store.JournalCache), so it must never see the cached objects.
        r.position: JournalEntry(
            r.position, r.step_key, r.step_name, r.kind, r.state, _private(r.result), r.error
        )
        for r in rows
        if r.position is not None
    }
    ctx = WorkflowContext(
        run_id=run.run_id,
        workflow=wf.name,
        input=run.input,
        journal=journal,
        consume_event=tx.consume_event,
    )
    outcome = wf.replay(ctx)
    for position, name, payload in outcome.received:
        key = f"{name}#{position}"
        tx.record_event(
            NewStep(
                key,
                name,
                StepKind.EVENT,
                None,
                "null",
                {},
                1,
                idempotency_key(run.run_id, key),
                position=position,
            ),
            payload,
        )
    if not outcome.finished:
        tx.schedule([_call_step(run.run_id, c) for c in outcome.scheduled])
        return
    if isinstance(outcome.error, NonDeterminismError):
        # A code problem, not a business failure: leave the journal as it is for the operator.
        tx.finish(RunState.FAILED, error=error_of(outcome.error))
    elif outcome.error is not None:
        _fail(tx, rows, error_of(outcome.error))
    else:
        try:
            result_json = wf.input_info.output_adapter.dump_json(outcome.result).decode()
        except Exception as exc:
            tx.finish(
                RunState.FAILED,
                error=error_of(
                    exc,
                    message=(
                        f"workflow {wf.name!r} returned a value that is not "
                        f"JSON-serialisable: {exc}"
                    ),
                ),
            )
            return
        tx.finish(RunState.COMPLETED, result_json=result_json)


# -- failure and compensation -----------------------------------------------------------------


def _fail(tx: RunTx, rows: list[JournalRow], error: Mapping[str, Any]) -> None:
    """A step failed for good: compensate what completed, unless the pivot was passed."""
    if any(r.state == StepState.COMPLETED and r.options.get("pivot") for r in rows):
        tx.finish(RunState.FAILED, error={**error, "pivot_passed": True})
        return
    compensable = [
        r for r in rows if r.kind == StepKind.ACTION and r.compensation_ref and r.state in _UNDOABLE
    ]
    if not compensable:
        tx.finish(RunState.FAILED, error=error)
        return
    tx.begin_compensation(error)
    _advance_compensation(tx)


def stop(tx: RunTx, error: Mapping[str, Any]) -> None:
    """Stop a running run from outside (cancelled, or out of time): its open steps stop, its
    completed steps are compensated, even past the pivot."""
    rows = tx.journal()
    if any(r.kind == StepKind.ACTION and r.compensation_ref and r.state in _UNDOABLE for r in rows):
        tx.begin_compensation(error)
        _advance_compensation(tx)
    else:
        tx.finish(
            RunState.CANCELLED if error.get("type") == CANCELLED else RunState.FAILED, error=error
        )


def _advance_compensation(tx: RunTx) -> None:
    rows = tx.journal()
    if any(r.kind == StepKind.ACTION and r.state == StepState.RUNNING for r in rows):
        return  # steps in flight finish (or their lease expires) before anything is undone
    compensations = {r.step_key: r for r in rows if r.kind == StepKind.COMPENSATION}
    if any(c.state == StepState.FAILED for c in compensations.values()):
        tx.finish(RunState.COMPENSATION_FAILED)
        return
    if any(
        c.state not in (StepState.COMPLETED, StepState.CANCELLED) for c in compensations.values()
    ):
        return  # one at a time, in reverse order of completion
    todo = sorted(
        (
            r
            for r in rows
            if r.kind == StepKind.ACTION
            and r.state == StepState.COMPLETED
            and r.compensation_ref
            and f"compensate:{r.step_key}" not in compensations
        ),
        key=lambda r: r.completed_seq or 0,
        reverse=True,
    )
    if todo:
        target = todo[0]
        key = f"compensate:{target.step_key}"
        undo = target.options.get("compensate_retry")
        retry = RetryPolicy.from_json(undo) if undo else COMPENSATION_RETRY
        tx.schedule(
            [
                NewStep(
                    step_key=key,
                    step_name=target.step_name,
                    kind=StepKind.COMPENSATION,
                    fn_ref=target.compensation_ref,
                    input_json=json.dumps(target.result),
                    options=StepOptions(retry=retry, queue=target.options.get("queue")).to_json(),
                    max_attempts=retry.max_attempts,
                    idempotency_key=idempotency_key(tx.run.run_id, key),
                )
            ]
        )
        return
    error = tx.run.error or {}
    tx.finish(RunState.CANCELLED if error.get("type") == CANCELLED else RunState.COMPENSATED)
