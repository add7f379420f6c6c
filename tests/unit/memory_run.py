"""An in-memory twin of the Postgres store, for coordinator tests without services.

``MemoryRunTx`` mirrors ``saga.run_transaction.RunTransaction`` (the real
``coordinator.RunTx``) over Python dicts, statement for statement:

- ``schedule`` inserts journal rows numbered after the run's last (``seq``), in the state the
  ``NewStep`` asks for (dispatched | pending | waiting), ``ON CONFLICT (run_id, step_key) DO
  NOTHING``; a dispatched step's task message is queued even when its row existed already (the
  claim fences the duplicate), and ``idempotency_key`` is unique across all runs, as in the
  schema (a clash raises, as the INSERT would).
- ``finish`` sets the run's state (a transition ``saga.states`` does not allow raises
  RunTransitionError, as the guarded FINISH_RUN does; the error is kept when none is given) and
  cancels its open non-compensation steps (pending, dispatched, waiting, throttled). It does not
  change ``tx.run``, just as the store does not.
- ``begin_compensation`` moves running -> compensating with the error, cancels open steps and
  updates ``tx.run``.
- ``consume_event`` takes the oldest unconsumed event of that name; ``record_event`` journals an
  event received during a replay as a completed event step with a new ``completed_seq``.
- ``journal`` reads the rows in ``seq`` order (cached until the transaction writes steps), with
  values round-tripped through JSON as jsonb would. Its ``replay`` flag only matters to tracing,
  which the twin does not do.

``MemoryStore`` is the twin of ``PostgresStore`` itself (``saga.store_protocol.Store``), with an
explicit clock (``MemoryDB.clock``) for due times and leases. ``tests/contract`` runs the same
cases against it and against Postgres, so what this module claims to mirror is checked. It
models no flow-control gates (migration 0010): a run keeps its ``priority`` and a step's
options the ``gates`` the coordinator journaled, but ``claim_step`` claims a step with limits
as if it held them (the Postgres store takes them first, in ``claim_gated_step``).

``Sim`` plays the workers, the sweeper and the client on one run, through a ``MemoryStore``:
``start`` (create_run + advance, as ``SagaClient.start``), ``claim`` (CLAIM_STEP),
``complete`` / ``fail`` (complete_step / fail_attempt: the fenced row update, then
``coordinator.advance`` in the same transaction, with ``tx.completed`` set for completions),
``fire_timer`` and ``time_out_event`` (what the sweeper and executor do when a timer or an event
wait falls due), ``send_event`` (send_event, then the advance task it queues), ``cancel``
(stop_run + ``coordinator.stop``), ``retry`` (retry_run, then its advance task), ``expire_lease``
(expire_leases for one step) and ``advance`` (an advance task). Every call is one transaction:
when it raises, the in-memory state is rolled back (the completion sequence, like a Postgres
sequence, is not). Nothing here calls a step function: tests decide each step's outcome.
"""

from __future__ import annotations

import copy
import datetime as dt
import json
import math
import uuid
from collections.abc import Callable, Iterator, Mapping, Sequence
from contextlib import contextmanager
from dataclasses import dataclass, field
from typing import Any

from saga import coordinator
from saga.coordinator import JournalRow, NewStep, RunView
from saga.errors import RunConflictError, RunNotFoundError
from saga.failures import ErrorType, attempt_outcome, error_record
from saga.loader import Definition
from saga.messages import STEP_TASK, advance_message, step_message
from saga.outbox.message import OutboxMessage
from saga.records import (
    Claim,
    Fenced,
    KeptAttempt,
    OperatorError,
    RunEventRecord,
    RunRecord,
    RunTransitionError,
    StepRecord,
)
from saga.states import (
    CANCELLABLE_STEP_STATES,
    FINAL_RUN_STATES,
    INITIAL_STEP_STATE,
    OPEN_STEP_STATES,
    AttemptOutcome,
    RunEventType,
    RunState,
    StepKind,
    StepState,
    claim_run_state,
    may_claim,
    may_journal_outcome,
    run_may_become,
)


def _jsonb(value: Any) -> Any:
    """What a jsonb column gives back for ``value``."""
    return None if value is None else json.loads(json.dumps(value))


def _transition(run: RunRow, state: RunState) -> None:
    """A guarded run transition (FINISH_RUN, BEGIN_COMPENSATION, REOPEN_RUN): one the state
    machine does not allow raises, as saga_run_transition_refused does in Postgres."""
    if not run_may_become(run.state, state):
        raise RunTransitionError(f"run {run.run_id!r} is {run.state}; it cannot become {state}")
    run.state = state


class IntegrityError(Exception):
    """A constraint Postgres would enforce (here: idempotency_key UNIQUE, step primary key)."""


class Refused(Exception):
    """A claim the store would refuse (CLAIM_STEP returns no row): the worker drops it."""


@dataclass
class RunRow:
    run_id: str
    saga_name: str
    saga_ref: str
    saga_version: str
    input: Any
    state: str = RunState.RUNNING
    result: Any = None
    error: Any = None
    trace_context: dict[str, str] = field(default_factory=dict)
    advance_due_at: float | None = None  # an advance task owed, due again then
    key_prefix: str = ""  # of the process that started it
    priority: int = 0  # its steps' place in line for a limit (saga_runs.priority, 0010)

    @property
    def finished(self) -> bool:
        return self.state in FINAL_RUN_STATES


@dataclass
class StepRow:
    run_id: str
    step_key: str
    step_name: str
    kind: str
    seq: int
    position: int | None
    state: str
    fn_ref: str | None
    compensation_ref: str | None
    options: dict[str, Any]
    max_attempts: int
    idempotency_key: str
    input: Any
    due_in: float  # seconds after scheduling when it falls due (math.inf: never)
    due_at: float = 0.0  # on MemoryDB.clock
    lease_expires_at: float | None = None
    created_at: float = 0.0
    attempt_started_at: float | None = None
    finished_at: float | None = None
    attempt: int = 0
    result: Any = None
    error: Any = None
    completed_seq: int | None = None
    lease_owner: str | None = None

    def journal_row(self) -> JournalRow:
        """As SELECT_JOURNAL reads it (result_json is not selected)."""
        return JournalRow(
            self.step_key,
            self.step_name,
            self.kind,
            self.state,
            self.position,
            _jsonb(self.result),
            _jsonb(self.error),
            self.completed_seq,
            self.compensation_ref,
            _jsonb(self.options),
            self.attempt,
        )


@dataclass
class EventRow:
    run_id: str
    name: str
    payload: Any
    consumed_by: str | None = None


@dataclass
class MemoryDB:
    """The tables: saga_runs, saga_steps, saga_events, saga_outbox, saga_workers and
    saga_completion_seq."""

    runs: dict[str, RunRow] = field(default_factory=dict)
    steps: dict[tuple[str, str], StepRow] = field(default_factory=dict)
    events: list[EventRow] = field(default_factory=list)
    outbox: list[OutboxMessage] = field(default_factory=list)
    completion_seq: int = 0
    clock: float = 0.0  # seconds; what now() is to the twin (tests move it on explicitly)
    # owner -> queues, seen at, silence limit
    workers: dict[str, tuple[list[str], float, float]] = field(default_factory=dict)
    # saga_run_events and saga_attempts (0006), by run id
    run_events: dict[str, list[RunEventRecord]] = field(default_factory=dict)
    attempts: dict[str, list[KeptAttempt]] = field(default_factory=dict)

    def log_run_event(
        self, run_id: str, event: str, actor: str | None, detail: Mapping[str, Any] | None
    ) -> None:
        """RECORD_RUN_EVENT."""
        record = RunEventRecord(event, actor, None if detail is None else _jsonb(dict(detail)))
        self.run_events.setdefault(run_id, []).append(record)

    def keep_attempt(self, row: StepRow, outcome: str, error: Any) -> None:
        """The INSERT INTO saga_attempts of FAIL_ATTEMPT, EXPIRE_LEASE, RETRY_FAILED_STEPS."""
        kept = self.attempts.setdefault(row.run_id, [])
        if any(a.step_key == row.step_key and a.attempt == row.attempt for a in kept):
            return  # ON CONFLICT DO NOTHING
        error_type = error.get("type") if isinstance(error, Mapping) else None
        kept.append(KeptAttempt(row.step_key, row.attempt, row.lease_owner, outcome, error_type))

    def next_completion(self) -> int:
        self.completion_seq += 1
        return self.completion_seq

    def rows(self, run_id: str) -> list[StepRow]:
        return sorted((r for r in self.steps.values() if r.run_id == run_id), key=lambda r: r.seq)

    def cancel_open_steps(self, run_id: str) -> None:
        """CANCEL_OPEN_STEPS."""
        for r in self.rows(run_id):
            if r.kind != StepKind.COMPENSATION and r.state in CANCELLABLE_STEP_STATES:
                r.state = StepState.CANCELLED

    def insert_step(self, row: StepRow) -> None:
        if (row.run_id, row.step_key) in self.steps:
            raise IntegrityError(f"duplicate step {row.step_key!r} of run {row.run_id!r}")
        if any(r.idempotency_key == row.idempotency_key for r in self.steps.values()):
            raise IntegrityError(f"duplicate idempotency_key {row.idempotency_key!r}")
        self.steps[(row.run_id, row.step_key)] = row

    def next_seq(self, run_id: str) -> int:
        return max((r.seq for r in self.steps.values() if r.run_id == run_id), default=0) + 1


class MemoryRunTx:
    """``coordinator.RunTx`` over a ``MemoryDB``; mirrors ``saga.store.RunTransaction``."""

    def __init__(
        self, db: MemoryDB, run: RunView, queue: str = "saga", dispatch_timeout: float = 30.0
    ) -> None:
        self._db = db
        self.run = run
        self._queue = queue
        self._dispatch_timeout = dispatch_timeout
        self.messages: list[OutboxMessage] = []
        self._journal: list[JournalRow] | None = None
        self.completed: JournalRow | None = None
        self.journal_reads = 0  # how often the journal was read (the fast path reads none)

    def journal(self, *, replay: bool = False) -> list[JournalRow]:
        if self._journal is None:
            self.journal_reads += 1
            self._journal = [r.journal_row() for r in self._db.rows(self.run.run_id)]
        return self._journal

    def schedule(self, steps: Sequence[NewStep]) -> None:
        self._journal = None
        for s in steps:
            if (self.run.run_id, s.step_key) not in self._db.steps:  # ON CONFLICT DO NOTHING
                if s.delay_seconds is None and s.state == StepState.WAITING:
                    due = math.inf
                else:
                    due = s.delay_seconds if s.delay_seconds is not None else self._dispatch_timeout
                self._db.insert_step(
                    StepRow(
                        run_id=self.run.run_id,
                        step_key=s.step_key,
                        step_name=s.step_name,
                        kind=s.kind,
                        seq=self._db.next_seq(self.run.run_id),
                        position=s.position,
                        state=s.state,
                        fn_ref=s.fn_ref,
                        compensation_ref=s.compensation_ref,
                        options=_jsonb(dict(s.options)),
                        max_attempts=s.max_attempts,
                        idempotency_key=s.idempotency_key,
                        input=json.loads(s.input_json),
                        due_in=due,
                        due_at=self._db.clock + due,
                        created_at=self._db.clock,
                    )
                )
            if s.state == StepState.DISPATCHED:
                queue = s.options.get("queue") or self._queue
                self.messages.append(
                    step_message(queue, self.run.run_id, s.step_key, self.run.trace_context)
                )

    def consume_event(self, name: str, step_key: str) -> tuple[bool, Any]:
        for e in self._db.events:
            if e.run_id == self.run.run_id and e.name == name and e.consumed_by is None:
                e.consumed_by = step_key
                return True, _jsonb(e.payload)
        return False, None

    def record_event(self, step: NewStep, payload: Any) -> None:
        self._journal = None
        self._db.insert_step(
            StepRow(
                run_id=self.run.run_id,
                step_key=step.step_key,
                step_name=step.step_name,
                kind=StepKind.EVENT,
                seq=self._db.next_seq(self.run.run_id),
                position=step.position,
                state=StepState.COMPLETED,
                fn_ref=None,
                compensation_ref=None,
                options={},
                max_attempts=1,
                idempotency_key=step.idempotency_key,
                input=None,
                due_in=0.0,
                result=_jsonb(payload),
                completed_seq=self._db.next_completion(),
            )
        )

    def finish(
        self,
        state: RunState,
        *,
        result_json: str | None = None,
        error: Mapping[str, Any] | None = None,
    ) -> None:
        run = self._db.runs[self.run.run_id]
        _transition(run, state)  # FINISH_RUN
        run.result = None if result_json is None else json.loads(result_json)
        if error is not None:
            run.error = _jsonb(dict(error))
        self._db.cancel_open_steps(self.run.run_id)
        self._journal = None

    def cancel_open_steps(self) -> None:
        self._db.cancel_open_steps(self.run.run_id)
        self._journal = None

    def begin_compensation(self, error: Mapping[str, Any]) -> None:
        run = self._db.runs[self.run.run_id]
        _transition(run, RunState.COMPENSATING)  # BEGIN_COMPENSATION
        run.error = _jsonb(dict(error))
        self._db.cancel_open_steps(self.run.run_id)
        detail = {"type": error.get("type"), "message": error.get("message")}
        self._db.log_run_event(self.run.run_id, RunEventType.COMPENSATION_BEGUN, None, detail)
        self.run = RunView(
            **{**vars(self.run), "state": RunState.COMPENSATING, "error": dict(error)}
        )
        self._journal = None

    def step_input(self, step_key: str) -> Any:
        return _jsonb(self._db.steps[(self.run.run_id, step_key)].input)

    def advance_later(self) -> None:
        """ADVANCE_REQUESTED, and the task's message."""
        run = self._db.runs[self.run.run_id]
        run.advance_due_at = self._db.clock + self._dispatch_timeout
        self.messages.append(advance_message(self._queue, self.run.run_id, self.run.trace_context))

    def advancing(self) -> None:
        """ADVANCE_DONE."""
        self._db.runs[self.run.run_id].advance_due_at = None


class Sim:
    """One run of ``definition``, with the test playing every worker. See the module docstring.

    ``fast_path=False`` leaves ``tx.completed`` unset on completions, so the coordinator always
    reads the journal (to compare with the chain fast path).
    """

    def __init__(
        self,
        definition: Definition,
        input: Any = None,
        *,
        run_id: str | None = None,
        saga_version: str | None = None,
        fast_path: bool = True,
        db: MemoryDB | None = None,
        key_prefix: str = "",
    ) -> None:
        self.key_prefix = key_prefix  # SAGA_KEY_PREFIX of the process starting the run
        self.definition = definition  # what the "workers" load; replace it to model a deploy
        self.input = input
        self.run_id = run_id or uuid.uuid4().hex
        self.saga_version = definition.version_tag if saga_version is None else saga_version
        self.fast_path = fast_path
        self.db = MemoryDB() if db is None else db
        self.transactions: list[MemoryRunTx] = []  # every committed transaction, in order
        self._claims: dict[str, Claim] = {}  # the latest claim of each step

    # -- reading ------------------------------------------------------------------------------

    @property
    def run(self) -> RunRow:
        return self.db.runs[self.run_id]

    def rows(self) -> list[StepRow]:
        return self.db.rows(self.run_id)

    def row(self, step_key: str) -> StepRow:
        try:
            return self.db.steps[(self.run_id, step_key)]
        except KeyError:
            raise KeyError(
                f"run has no step {step_key!r}; it has {[r.step_key for r in self.rows()]}"
            ) from None

    def step_keys(self, *states: str, kind: str | None = None) -> list[str]:
        """Step keys in seq order, optionally only in these states / of this kind."""
        return [
            r.step_key
            for r in self.rows()
            if (not states or r.state in states) and (kind is None or r.kind == kind)
        ]

    def open_steps(self) -> list[str]:
        """Keys of the dispatched steps (those a worker would now get a message for)."""
        return self.step_keys(StepState.DISPATCHED)

    def states(self) -> dict[str, str]:
        return {r.step_key: r.state for r in self.rows()}

    def step_messages(self) -> list[str]:
        return [
            m.payload["step_key"]
            for m in self.db.outbox
            if m.task_name == STEP_TASK and m.payload["run_id"] == self.run_id
        ]

    # -- transactions: each one a MemoryStore call, as PostgresStore does it --------------------

    @property
    def store(self) -> MemoryStore:
        return MemoryStore(self.db, transactions=self.transactions, key_prefix=self.key_prefix)

    def _load(self, ref: str) -> Definition:
        return self.definition

    def view(self) -> RunView:
        r = self.run
        return RunView(
            r.run_id,
            r.state,
            r.saga_name,
            r.saga_ref,
            r.saga_version,
            copy.deepcopy(r.input),
            copy.deepcopy(r.error),
            dict(r.trace_context),
            key_prefix=r.key_prefix,
        )

    def _advance(self, tx: MemoryRunTx) -> None:
        coordinator.advance(tx, self._load)

    # -- the client ---------------------------------------------------------------------------

    def start(self) -> Sim:
        """SagaClient.start: validate the input, create the run, advance it, one transaction."""
        if self.run_id in self.db.runs:
            return self
        self.store.create_run(
            run_id=self.run_id,
            saga_name=self.definition.name,
            saga_ref=f"memory:{self.definition.name}",
            saga_version=self.saga_version,
            input_json=self.definition.validate_input(self.input),
            trace_context={},
            timeout=None,
            start=self._advance,
        )
        return self

    def advance(self) -> None:
        """An advance task (store.advance_run)."""
        self.store.advance_run(self.run_id, self._advance)

    def send_event(self, name: str, payload: Any = None, *, run_advance: bool = True) -> bool:
        """store.send_event; when it completed a waiting step, the advance task it queued runs
        too (unless ``run_advance`` is False)."""
        delivered = self.store.send_event(self.run_id, name, payload)
        if delivered and run_advance:
            self.advance()
        return delivered

    def stop(self, error: Mapping[str, Any]) -> None:
        """store.stop_run with coordinator.stop (cancel, or the sweeper's deadline)."""
        self.store.stop_run(self.run_id, lambda tx: coordinator.stop(tx, error))

    def cancel(self, reason: str = "cancelled by an operator") -> None:
        """SagaClient.cancel."""
        self.stop(error_record(ErrorType.CANCELLED, reason))

    def retry(self, *, run_advance: bool = True) -> None:
        """store.retry_run (REOPEN_RUN, RETRY_FAILED_STEPS), then the advance task it queues."""
        self.store.retry_run(self.run_id)
        if run_advance:
            self.advance()

    # -- the workers --------------------------------------------------------------------------

    def claim(self, step_key: str) -> StepRow:
        """store.claim_step by a new worker; Refused when the store returns no claim."""
        row = self.row(step_key)
        claim = self.store.claim_step(
            self.run_id, step_key, owner=f"worker:{uuid.uuid4().hex[:8]}", lease=30.0
        )
        if claim is None:
            raise Refused(
                f"step {step_key!r} is {row.state} and the run is {self.run.state}; not claimable"
            )
        self._claims[step_key] = claim
        return self.row(step_key)

    def _claimed(self, step_key: str) -> Claim:
        """The claim of the step's running attempt, claiming the step first if it is not."""
        if self.row(step_key).state != StepState.RUNNING:
            self.claim(step_key)
        return self._claims[step_key]

    def complete(
        self, step_key: str, result: Any = None, *, result_json: str | None = None
    ) -> None:
        """A worker journals the step's result (claiming it first if it is dispatched):
        store.complete_step, which advances the run with ``tx.completed`` set (unset when the
        Sim was made with ``fast_path=False``)."""
        text = json.dumps(result) if result_json is None else result_json

        def advance(tx: MemoryRunTx) -> None:
            if not self.fast_path:
                tx.completed = None
            self._advance(tx)

        self.store.complete_step(self._claimed(step_key), text, advance, fast_path=False)

    def fail(
        self,
        step_key: str,
        error_type: str = "Error",
        message: str = "failed",
        *,
        retry_in: float | None = None,
    ) -> None:
        """A worker journals a failed attempt (claiming the step first if it is dispatched):
        store.fail_attempt, back to pending when retried (actions only while the run runs),
        else failed for good and the run advances."""
        claim = self._claimed(step_key)
        error = {"type": error_type, "message": message, "attempt": claim.attempt}
        self.store.fail_attempt(claim, error, retry_in=retry_in, advance=self._advance)

    # -- the sweeper --------------------------------------------------------------------------

    def redispatch(self, step_key: str) -> None:
        """REDISPATCH_DUE for one open step, as if its time had come."""
        r = self.row(step_key)
        if r.state not in OPEN_STEP_STATES or self.run.state != claim_run_state(r.kind):
            raise Refused(f"step {step_key!r} is {r.state}, run {self.run.state}; not due")
        r.state = StepState.DISPATCHED
        self.db.outbox.append(step_message("saga", self.run_id, step_key, {}))

    def expire_lease(self, step_key: str, *, run_advance: bool = True) -> None:
        """store.expire_leases once this running step's lease has run out (EXPIRE_LEASE): back
        to pending, or failed once its attempts are used up, and then (failed only) the advance
        task it queues runs too (unless ``run_advance`` is False)."""
        r = self.row(step_key)
        if r.state != StepState.RUNNING:
            raise Refused(f"step {step_key!r} is {r.state}; no lease to expire")
        r.lease_expires_at = self.db.clock - 1.0
        [(_, _, state)] = self.store.expire_leases()
        if state == StepState.FAILED and run_advance:
            self.advance()

    def fire_timer(self, step_key: str) -> None:
        """A sleep is over: the sweeper dispatches the timer step, a worker completes it."""
        assert self.row(step_key).kind == StepKind.TIMER, f"{step_key!r} is not a timer"
        self.redispatch(step_key)
        self.complete(step_key, result_json="null")

    def time_out_event(self, step_key: str) -> None:
        """An event wait timed out: dispatched by the sweeper, failed by a worker."""
        assert self.row(step_key).kind == StepKind.EVENT, f"{step_key!r} is not an event wait"
        self.redispatch(step_key)
        self.fail(
            step_key,
            ErrorType.EVENT_TIMEOUT,
            f"no event {self.row(step_key).step_name!r} arrived in time",
        )


# -- the store ----------------------------------------------------------------------------------

_EPOCH = dt.datetime(2026, 1, 1, tzinfo=dt.UTC)


def _at(seconds: float | None) -> dt.datetime | None:
    return None if seconds is None else _EPOCH + dt.timedelta(seconds=seconds)


class MemoryStore:
    """``saga.store_protocol.Store`` over a ``MemoryDB``, statement for statement as
    ``PostgresStore`` (the contract suite, tests/contract, runs the same cases on both). Time is
    ``db.clock``: nothing falls due or expires until a test moves it on."""

    def __init__(
        self,
        db: MemoryDB | None = None,
        *,
        queue: str = "saga",
        dispatch_timeout: float = 30.0,
        transactions: list[MemoryRunTx] | None = None,
        key_prefix: str = "",
    ) -> None:
        self.db = MemoryDB() if db is None else db
        self._key_prefix = key_prefix
        self._queue = queue
        self._dispatch_timeout = dispatch_timeout
        self.transactions = [] if transactions is None else transactions  # committed ones

    def _view(self, run_id: str) -> RunView:
        r = self.db.runs[run_id]
        return RunView(
            r.run_id,
            r.state,
            r.saga_name,
            r.saga_ref,
            r.saga_version,
            copy.deepcopy(r.input),
            copy.deepcopy(r.error),
            dict(r.trace_context),
            key_prefix=r.key_prefix,
        )

    @contextmanager
    def _locked(self, run_id: str) -> Iterator[MemoryRunTx]:
        """A transaction holding the run's lock (LOCK_RUN): rolled back if the body raises;
        its messages go to the outbox when it commits."""
        if run_id not in self.db.runs:
            raise RunNotFoundError(f"no run has id {run_id!r}")
        db = self.db
        saved = copy.deepcopy((db.runs, db.steps, db.events, db.run_events, db.attempts))
        tx = MemoryRunTx(self.db, self._view(run_id), self._queue, self._dispatch_timeout)
        try:
            yield tx
        except BaseException:
            db.runs, db.steps, db.events, db.run_events, db.attempts = saved
            raise
        self.db.outbox.extend(tx.messages)
        self.transactions.append(tx)

    def _step(self, run_id: str, step_key: str) -> StepRow | None:
        return self.db.steps.get((run_id, step_key))

    # -- runs -----------------------------------------------------------------------------------

    def create_run(
        self,
        *,
        run_id: str,
        saga_name: str,
        saga_ref: str,
        saga_version: str,
        input_json: str,
        trace_context: Mapping[str, str],
        timeout: float | None,
        start: Callable[[Any], None],
        fast_path: list[Any] | None = None,  # the twin keeps every message in its outbox
        priority: int = 0,  # only gated steps read it; the twin has no gates
        run_gate: Mapping[str, Any] | None = None,
        replaced: list[str] | None = None,
    ) -> bool:
        existing = self.db.runs.get(run_id)
        if existing is not None:  # INSERT_RUN ... ON CONFLICT DO NOTHING
            if existing.saga_name != saga_name or existing.input != json.loads(input_json):
                raise RunConflictError(
                    f"run id {run_id!r} is taken by a run of saga {existing.saga_name!r} with "
                    f"another input"
                )
            return False
        self.db.runs[run_id] = RunRow(
            run_id, saga_name, saga_ref, saga_version, json.loads(input_json),
            trace_context=dict(trace_context), key_prefix=self._key_prefix, priority=priority,
        )  # fmt: skip
        try:
            with self._locked(run_id) as tx:
                start(tx)
        except BaseException:
            del self.db.runs[run_id]
            raise
        return True

    def get_run(self, run_id: str) -> RunRecord:
        r = self.db.runs.get(run_id)
        if r is None:
            raise RunNotFoundError(f"no run has id {run_id!r}")
        now = _at(self.db.clock)
        assert now is not None
        return RunRecord(
            run_id=r.run_id,
            saga_name=r.saga_name,
            saga_ref=r.saga_ref,
            saga_version=r.saga_version,
            state=r.state,
            input=_jsonb(r.input),
            result=_jsonb(r.result),
            error=_jsonb(r.error),
            created_at=_EPOCH,
            updated_at=now,
            finished_at=now if r.finished else None,
        )

    def run_events(self, run_id: str) -> list[RunEventRecord]:
        """SELECT_RUN_EVENT_RECORDS."""
        return list(self.db.run_events.get(run_id, []))

    def kept_attempts(self, run_id: str) -> list[KeptAttempt]:
        """SELECT_KEPT_ATTEMPTS."""
        return sorted(self.db.attempts.get(run_id, []), key=lambda a: (a.step_key, a.attempt))

    def get_steps(self, run_id: str) -> list[StepRecord]:
        return [
            StepRecord(
                step_key=r.step_key,
                step_name=r.step_name,
                kind=r.kind,
                seq=r.seq,
                state=r.state,
                attempt=r.attempt,
                max_attempts=r.max_attempts,
                idempotency_key=r.idempotency_key,
                result=_jsonb(r.result),
                error=_jsonb(r.error),
                created_at=_EPOCH + dt.timedelta(seconds=r.created_at),
                started_at=_at(r.attempt_started_at),
                attempt_started_at=_at(r.attempt_started_at),
                finished_at=_at(r.finished_at),
            )
            for r in self.db.rows(run_id)
        ]

    # -- steps ----------------------------------------------------------------------------------

    def claim_step(
        self,
        run_id: str,
        step_key: str,
        *,
        owner: str,
        lease: float,
    ) -> Claim | None:
        """CLAIM_STEP: a dispatched step, a pending one whose time has come, or the same
        owner's running one, of a kind its run's state lets run."""
        r, run = self._step(run_id, step_key), self.db.runs.get(run_id)
        if r is None or run is None or not may_claim(r.kind, run.state):
            return None
        due = r.state == StepState.PENDING and r.due_at <= self.db.clock
        again = r.state == StepState.RUNNING and r.lease_owner == owner
        if not (r.state == StepState.DISPATCHED or due or again):
            return None
        r.state, r.attempt, r.lease_owner = StepState.RUNNING, r.attempt + 1, owner
        r.lease_expires_at = self.db.clock + lease
        r.attempt_started_at = self.db.clock
        error = r.error or {}
        return Claim(
            run_id=run_id,
            step_key=step_key,
            step_name=r.step_name,
            kind=r.kind,
            attempt=r.attempt,
            max_attempts=r.max_attempts,
            idempotency_key=r.idempotency_key,
            input=_jsonb(r.input),
            fn_ref=r.fn_ref,
            options=_jsonb(r.options),
            run_input=_jsonb(run.input),
            saga_name=run.saga_name,
            trace_context=dict(run.trace_context),
            scheduled_at=_EPOCH + dt.timedelta(seconds=r.created_at),
            saga_ref=run.saga_ref,
            previous_failed_at=error.get("failed_at"),
            previous_error_type=error.get("type"),
        )

    def _outcome(
        self,
        claim: Claim,
        update: Callable[[MemoryRunTx, StepRow], None],
        body: Callable[[MemoryRunTx, StepRow], None],
    ) -> list[OutboxMessage]:
        """store._outcome: the run lock, the fenced row update, the run-state check (Fenced
        rolls the update back), then the body in the same transaction."""
        with self._locked(claim.run_id) as tx:
            row = self._step(claim.run_id, claim.step_key)
            if row is None or row.state != StepState.RUNNING or row.attempt != claim.attempt:
                raise Fenced
            update(tx, row)
            if not may_journal_outcome(row.kind, tx.run.state):
                raise Fenced
            body(tx, row)
        return tx.messages

    def complete_step(
        self,
        claim: Claim,
        result_json: str,
        advance: Callable[[Any], None],
        *,
        fast_path: bool,
        read_journal: bool = False,
        usage: Mapping[str, int] | None = None,
    ) -> list[OutboxMessage]:
        def update(tx: MemoryRunTx, row: StepRow) -> None:  # COMPLETE_STEP
            row.state, row.result, row.error = StepState.COMPLETED, json.loads(result_json), None
            row.completed_seq = self.db.next_completion()
            row.lease_expires_at = None  # lease_owner stays: the latest attempt's worker
            row.finished_at = self.db.clock

        def body(tx: MemoryRunTx, row: StepRow) -> None:
            tx.completed = JournalRow(
                row.step_key,
                row.step_name,
                row.kind,
                StepState.COMPLETED,
                None,
                json.loads(result_json),
                None,
                None,
                None,
                options=_jsonb(row.options),
                attempt=row.attempt,
                result_json=result_json,
            )
            advance(tx)

        return self._outcome(claim, update, body)

    def fail_attempt(
        self,
        claim: Claim,
        error: Mapping[str, Any],
        *,
        retry_in: float | None,
        advance: Callable[[Any], None],
        fast_path: bool = False,
        read_journal: bool = False,
    ) -> list[OutboxMessage]:
        def update(tx: MemoryRunTx, row: StepRow) -> None:  # FAIL_ATTEMPT
            retried = retry_in is not None and (
                row.kind == StepKind.COMPENSATION or tx.run.state == RunState.RUNNING
            )
            row.state = StepState.PENDING if retried else StepState.FAILED
            row.error = _jsonb({**error, "retryable": retry_in is not None})
            row.due_at = self.db.clock + (retry_in or 0.0)
            row.finished_at = None if retried else self.db.clock
            row.lease_expires_at = None
            if retried:
                self.db.keep_attempt(row, attempt_outcome(str(error.get("type"))), error)

        def body(tx: MemoryRunTx, row: StepRow) -> None:
            if row.state == StepState.FAILED:
                advance(tx)

        return self._outcome(claim, update, body)

    def advance_run(self, run_id: str, advance: Callable[[Any], None]) -> None:
        with self._locked(run_id) as tx:
            tx.advancing()
            advance(tx)

    # -- events and operators -------------------------------------------------------------------

    def send_event(self, run_id: str, name: str, payload: Any, *, actor: str | None = None) -> bool:
        with self._locked(run_id) as tx:
            if tx.run.state != RunState.RUNNING:
                raise OperatorError(f"run {run_id!r} is {tx.run.state}; it takes no events")
            delivered = self._deliver(tx, run_id, name, payload)
            detail = {"name": name, "delivered": delivered}
            self.db.log_run_event(run_id, RunEventType.SEND_EVENT, actor, detail)
            return delivered

    def _deliver(self, tx: MemoryRunTx, run_id: str, name: str, payload: Any) -> bool:
        """DELIVER_EVENT, else STORE_EVENT."""
        waiting = [
            r
            for r in self.db.rows(run_id)
            if r.kind == StepKind.EVENT and r.step_name == name and r.state == StepState.WAITING
        ]
        if not waiting:  # STORE_EVENT
            self.db.events.append(EventRow(run_id, name, _jsonb(payload)))
            return False
        r = waiting[0]  # DELIVER_EVENT: the oldest wait
        r.state, r.result = StepState.COMPLETED, _jsonb(payload)
        r.completed_seq, r.finished_at = self.db.next_completion(), self.db.clock
        r.due_at = self.db.clock
        tx.advance_later()
        return True

    def stop_run(
        self,
        run_id: str,
        stop: Callable[[Any], None],
        *,
        actor: str | None = None,
        event: RunEventType = RunEventType.CANCEL,
        detail: Mapping[str, Any] | None = None,
    ) -> None:
        with self._locked(run_id) as tx:
            if tx.run.state != RunState.RUNNING:
                raise OperatorError(
                    f"run {run_id!r} is {tx.run.state}; only a running run can be cancelled"
                )
            self.db.log_run_event(run_id, event, actor, detail)
            stop(tx)

    def retry_run(self, run_id: str, *, actor: str | None = None) -> None:
        """REOPEN_RUN and RETRY_FAILED_STEPS, then an advance message."""
        kinds: tuple[StepKind, ...]
        with self._locked(run_id) as tx:
            if tx.run.state == RunState.FAILED:
                kinds, state = (StepKind.ACTION, StepKind.TIMER, StepKind.EVENT), RunState.RUNNING
            elif tx.run.state == RunState.COMPENSATION_FAILED:
                kinds, state = (StepKind.COMPENSATION,), RunState.COMPENSATING
            else:
                raise OperatorError(
                    f"run {run_id!r} is {tx.run.state}; only failed or "
                    f"compensation_failed runs can be retried"
                )
            run = self.db.runs[run_id]
            detail = {"from_state": run.state}
            self.db.log_run_event(run_id, RunEventType.RETRY, actor, detail)
            run.error = run.error if state == RunState.COMPENSATING else None
            _transition(run, state)
            for r in self.db.rows(run_id):
                if r.kind not in kinds:
                    continue
                if r.state == StepState.FAILED and r.attempt > 0:  # superseded: kept
                    outcome = attempt_outcome(str((r.error or {}).get("type")))
                    self.db.keep_attempt(r, outcome, r.error)
                if r.state == StepState.FAILED:
                    r.state, r.max_attempts = StepState.DISPATCHED, r.attempt + r.max_attempts
                elif r.state == StepState.CANCELLED and r.kind != StepKind.COMPENSATION:
                    r.state = INITIAL_STEP_STATE[StepKind(r.kind)]
                else:
                    continue
                r.error, r.finished_at = None, None
                if r.state == StepState.DISPATCHED:
                    r.due_at = self.db.clock + self._dispatch_timeout
                    tx.messages.append(
                        step_message(
                            r.options.get("queue") or self._queue,
                            run_id,
                            r.step_key,
                            tx.run.trace_context,
                        )
                    )
            tx.advance_later()

    # -- recovery -------------------------------------------------------------------------------

    def expire_leases(
        self, limit: int = 100, *, all_open: bool = False
    ) -> list[tuple[str, str, str]]:
        """SELECT_EXPIRED_LEASES, then EXPIRE_LEASE for each under its run's lock (this model
        has no index: every open step is looked at)."""
        expired: list[tuple[str, str, str]] = []
        lost = sorted(
            (
                r
                for r in self.db.steps.values()
                if r.state == StepState.RUNNING
                and r.lease_expires_at is not None
                and r.lease_expires_at < self.db.clock
            ),
            key=lambda r: r.lease_expires_at or 0.0,
        )[:limit]
        for run_id, step_key, attempt in [(r.run_id, r.step_key, r.attempt) for r in lost]:
            with self._locked(run_id) as tx:
                r = self.db.steps[(run_id, step_key)]
                undoing = tx.run.state != RunState.RUNNING and r.kind != StepKind.COMPENSATION
                failed = r.attempt >= r.max_attempts or undoing
                r.state = StepState.FAILED if failed else StepState.PENDING
                r.error = dict(
                    error_record(
                        ErrorType.LEASE_EXPIRED,
                        f"attempt {attempt} of step {step_key!r} lost its worker (lease expired)",
                        attempt=attempt,
                    )
                )
                r.due_at, r.lease_expires_at = self.db.clock, None
                r.finished_at = self.db.clock if failed else None
                if not failed:
                    self.db.keep_attempt(r, AttemptOutcome.LOST, r.error)
                if failed:
                    tx.advance_later()
                expired.append((run_id, step_key, r.state))
        return expired

    def worker_heartbeat(self, owner: str, queues: Sequence[str], silence: float) -> None:
        """WORKER_HEARTBEAT: registered at the first beat, kept alive by the next ones."""
        self.db.workers[owner] = (list(queues), self.db.clock, silence)

    def deregister_worker(self, owner: str) -> None:
        self.db.workers.pop(owner, None)

    def recover_dead_workers(self) -> list[str]:
        """REMOVE_DEAD_WORKERS, then RECOVER_UNCLAIMED for their queues."""
        dead = [
            o for o, (_, seen, limit) in self.db.workers.items() if seen < self.db.clock - limit
        ]
        queues = {q for o in dead for q in self.db.workers.pop(o)[0]}
        for r in self.db.steps.values():
            queue = r.options.get("queue") or self._queue
            if r.state == StepState.DISPATCHED and r.due_at > self.db.clock and queue in queues:
                r.due_at = self.db.clock
        return dead

    def redispatch_due(self, limit: int = 500) -> int:
        """REDISPATCH_DUE: open steps whose time has come, of a kind their run's state runs."""
        due = sorted(
            (
                r
                for r in self.db.steps.values()
                if r.state in OPEN_STEP_STATES
                and r.due_at <= self.db.clock
                and self.db.runs[r.run_id].state == claim_run_state(r.kind)
            ),
            key=lambda r: r.due_at,
        )[:limit]
        for r in due:
            r.state, r.due_at = StepState.DISPATCHED, self.db.clock + self._dispatch_timeout
            run = self.db.runs[r.run_id]
            self.db.outbox.append(
                step_message(
                    r.options.get("queue") or self._queue, r.run_id, r.step_key, run.trace_context
                )
            )
        owed = [
            run
            for run in self.db.runs.values()
            if run.advance_due_at is not None
            and run.advance_due_at <= self.db.clock
            and run.state in (RunState.RUNNING, RunState.COMPENSATING)
        ][:limit]
        for run in owed:  # REDISPATCH_ADVANCES
            run.advance_due_at = self.db.clock + self._dispatch_timeout
            self.db.outbox.append(advance_message(self._queue, run.run_id, run.trace_context))
        return len(due) + len(owed)
