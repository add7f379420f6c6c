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

from saga.definition import GraphStep, Saga, StepOptions, Undo
from saga.errors import SagaError
from saga.failures import ErrorType, error_record
from saga.keys import branch_key, compensation_key, idempotency_key, workflow_key
from saga.loader import Definition
from saga.retry import RetryPolicy
from saga.states import INITIAL_STEP_STATE, RunState, StepKind, StepState
from saga.workflow import (
    Call,
    JournalEntry,
    NonDeterminismError,
    Workflow,
    WorkflowContext,
)

COMPENSATION_RETRY = RetryPolicy(
    max_attempts=10, initial_backoff_seconds=1.0, max_backoff_seconds=60.0
)


class DefinitionChangedError(SagaError):
    """The definition a run started with is not the one the workers have now."""


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
    key_prefix: str = ""  # the deployment namespace its idempotency keys start with
    gated: bool = False  # it scheduled a step with limits: its end gives their slots back


def _run_key(run: RunView) -> tuple[str, str]:
    return run.run_id, run.key_prefix


def _key(run: RunView, step_key: str) -> str:
    """A step's idempotency key in ``run``: the run's own prefix, fixed when it started."""
    return idempotency_key(run.run_id, step_key, run.key_prefix)


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
    def cancel_open_steps(self) -> None:
        """Cancel the run's steps not yet claimed; the journal is read afresh after it."""
        ...

    def step_input(self, step_key: str) -> Any:
        """The input a step of this run was given (for its compensation)."""
        ...


Loader = Callable[[str], Definition]


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
        tx.finish(RunState.FAILED, error=error_record(exc))
        return
    if isinstance(definition, Workflow):
        _advance_workflow(tx, definition)
    else:
        _advance_graph(tx, definition)


# -- graphs -----------------------------------------------------------------------------------


def first_steps(saga: Saga, run_id: str, input_json: str, key_prefix: str = "") -> list[NewStep]:
    run_input = json.loads(input_json) if saga.concurrency or _limited(saga) else None
    return [
        _graph_step((run_id, key_prefix), saga, s, s.name, input_json, run_input)
        for s in saga.roots
    ]


def _limited(saga: Saga) -> bool:
    return any(s.options.limited for s in saga.steps)


def _with_gates(
    options: StepOptions,
    name: str,
    run_input: Any,
    input_json: str,
    where: str,
    definition: Saga | Workflow[Any, Any],
) -> dict[str, Any]:
    """The options a step's journal row carries, with its limits' gates for this run."""
    data = options.to_json()
    gates = options.gates(
        name, run_input, input_json, where, definition.concurrency, definition.name
    )
    if gates:
        data["gates"] = gates
    return data


def _graph_step(
    run: tuple[str, str], saga: Saga, s: GraphStep, key: str, input_json: str, run_input: Any
) -> NewStep:
    """A graph step to schedule; ``run`` is (run id, key prefix), its keys' beginning."""
    return NewStep(
        step_key=key,
        step_name=s.name,
        kind=StepKind.ACTION,
        fn_ref=s.function.ref,
        input_json=input_json,
        options=_with_gates(
            s.options, s.name, run_input, input_json, f"saga {saga.name!r}, step {s.name!r}", saga
        ),
        max_attempts=s.options.retry.max_attempts,
        idempotency_key=idempotency_key(run[0], key, run[1]),
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
            (r := self.rows.get(branch_key(s.name, i))) is not None
            and r.state == StepState.COMPLETED
            for i in range(n)
        )

    def result(self, s: GraphStep) -> Any:
        if s.map_over is None:
            return self.rows[s.name].result
        n = self.branches(s) or 0
        return [self.rows[branch_key(s.name, i)].result for i in range(n)]

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
    if _advance_chain(tx, saga) or _finish_one_step_run(tx, saga):
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
            new.append(_graph_step(_run_key(run), saga, s, s.name, json.dumps(value), run.input))
            continue
        items = state.result(saga.get_step(s.map_over))
        if not isinstance(items, list):
            tx.finish(
                RunState.FAILED,
                error=error_record(
                    ErrorType.TYPE_ERROR,
                    f"step {s.name!r} maps over the result of {s.map_over!r}, "
                    f"which is a {type(items).__name__}, not a list",
                ),
            )
            return
        new.extend(
            _graph_step(_run_key(run), saga, s, branch_key(s.name, i), json.dumps(item), run.input)
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
    tx.schedule(
        [
            _graph_step(_run_key(tx.run), saga, s, s.name, result_json, tx.run.input)
            for s in following
        ]
    )
    return True


def _finish_one_step_run(tx: RunTx, saga: Saga) -> bool:
    """The other common case without reading the journal: the one step of a one-step saga
    completed, so the run completes with its result, as the journal would have said. Only
    then: a later step of a bigger graph cannot tell alone that every other step is done (a run
    forked onto a definition of another shape may have started steps that come before it)."""
    done = tx.completed
    if done is None or done.kind != StepKind.ACTION or done.step_key != done.step_name:
        return False
    if len(saga.steps) != 1 or saga.steps[0].name != done.step_name:
        return False
    tx.finish(RunState.COMPLETED, result_json=done.result_json or json.dumps(done.result))
    return True


# -- workflows --------------------------------------------------------------------------------


def _call_step(run: RunView, call: Call, wf: Workflow[Any, Any]) -> NewStep:
    if call.kind == StepKind.ACTION:
        where = f"workflow {wf.name!r}, step {call.name!r}"
        options = _with_gates(call.options, call.name, run.input, call.input_json, where, wf)
    else:
        options = call.options.to_json()
    return NewStep(
        step_key=call.step_key,
        step_name=call.name,
        kind=call.kind,
        fn_ref=None if call.function is None else call.function.ref,
        input_json=call.input_json,
        options=options,
        max_attempts=call.options.retry.max_attempts if call.kind == StepKind.ACTION else 1,
        idempotency_key=_key(run, call.step_key),
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
        key = workflow_key(name, position)
        tx.record_event(
            NewStep(
                key,
                name,
                StepKind.EVENT,
                None,
                "null",
                {},
                1,
                _key(run, key),
                position=position,
            ),
            payload,
        )
    if not outcome.finished:
        tx.schedule([_call_step(run, c, wf) for c in outcome.scheduled])
        return
    if isinstance(outcome.error, NonDeterminismError):
        # A code problem, not a business failure: leave the journal as it is for the operator.
        tx.finish(RunState.FAILED, error=error_record(outcome.error))
    elif outcome.error is not None:
        _fail(tx, rows, error_record(outcome.error))
    else:
        try:
            result_json = wf.input_info.output_adapter.dump_json(outcome.result).decode()
        except Exception as exc:
            tx.finish(
                RunState.FAILED,
                error=error_record(
                    exc,
                    (f"workflow {wf.name!r} returned a value that is not JSON-serialisable: {exc}"),
                ),
            )
            return
        tx.finish(RunState.COMPLETED, result_json=result_json)


# -- failure and compensation -----------------------------------------------------------------


def _compensation(tx: RunTx, target: JournalRow) -> NewStep:
    """The step that undoes ``target``. Its value is the target's result when it completed, else
    None (its outcome is unknown); ``ctx.undo`` tells it which, with the target's key and input
    (journaled in its options, so the worker needs nothing else)."""
    key = compensation_key(target.step_key)
    completed = target.state == StepState.COMPLETED
    undo = Undo(
        step_key=target.step_key,
        idempotency_key=_key(tx.run, target.step_key),
        completed=completed,
        input=tx.step_input(target.step_key),
    )
    policy = target.options.get("compensate_retry")
    retry = RetryPolicy.from_json(policy) if policy else COMPENSATION_RETRY
    options = StepOptions(retry=retry, queue=target.options.get("queue"), undo=undo)
    return NewStep(
        step_key=key,
        step_name=target.step_name,
        kind=StepKind.COMPENSATION,
        fn_ref=target.compensation_ref,
        input_json=json.dumps(target.result if completed else None),
        options=options.to_json(),
        max_attempts=retry.max_attempts,
        idempotency_key=_key(tx.run, key),
    )


def _attempted(r: JournalRow) -> bool:
    """An action whose attempt started: its effect may be applied, whatever its state says.
    A failed attempt may have raised after the effect (an answer lost on the way back), a
    cut-off one may have got that far, a dead worker's too. Only a step never claimed is known
    to have done nothing."""
    return r.kind == StepKind.ACTION and r.attempt > 0


def _to_undo(rows: Sequence[JournalRow]) -> list[JournalRow]:
    """What a compensating run undoes: every attempted step with a compensation, completed or
    not, so that no effect is left behind whatever the timing of the failure."""
    return [r for r in rows if _attempted(r) and r.compensation_ref]


def _fail(tx: RunTx, rows: list[JournalRow], error: Mapping[str, Any]) -> None:
    """A step failed for good: undo what may have been done, unless the pivot was passed."""
    if any(r.state == StepState.COMPLETED and r.options.get("pivot") for r in rows):
        tx.finish(RunState.FAILED, error={**error, "pivot_passed": True})
        return
    if not _to_undo(_settled(tx)):
        tx.finish(RunState.FAILED, error=error)
        return
    tx.begin_compensation(error)
    _advance_compensation(tx)


def _settled(tx: RunTx) -> list[JournalRow]:
    """The journal once no step can start any more: open steps are cancelled first, then read
    again. A claim is not held off by the run's lock, so one may have taken a step since the
    journal was read; deciding on the older read would finish the run past a started step."""
    tx.cancel_open_steps()
    return tx.journal()


def stop(tx: RunTx, error: Mapping[str, Any]) -> None:
    """Stop a running run from outside (cancelled, or out of time): its open steps stop, what
    its steps may have done is undone, even past the pivot."""
    if _to_undo(_settled(tx)):
        tx.begin_compensation(error)
        _advance_compensation(tx)
    else:
        tx.finish(
            RunState.CANCELLED if error.get("type") == ErrorType.CANCELLED else RunState.FAILED,
            error=error,
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
    # Reverse order: steps whose outcome is unknown (the latest to act: they were in flight
    # or retrying when the run failed) newest first, then completed ones newest first.
    todo = [r for r in _to_undo(rows) if compensation_key(r.step_key) not in compensations]
    uncertain = [r for r in todo if r.state != StepState.COMPLETED]
    completed = sorted(
        (r for r in todo if r.state == StepState.COMPLETED), key=lambda r: r.completed_seq or 0
    )
    if todo:
        target = [*completed, *uncertain][-1]
        tx.schedule([_compensation(tx, target)])
        return
    error = tx.run.error or {}
    tx.finish(
        RunState.CANCELLED if error.get("type") == ErrorType.CANCELLED else RunState.COMPENSATED
    )
