"""The Postgres seam: runs, the step journal and events. psycopg errors become StoreError here.

Every change to a run happens in one transaction that takes the run's row lock first: a step's
outcome (its result or error), what the coordinator decides from it (next steps, the run's state
change) and the outbox rows it causes commit together, or not at all.
"""

from __future__ import annotations

import collections
import contextlib
import datetime as dt
import json
import time
import uuid
from collections.abc import Callable, Iterator, Mapping, Sequence
from dataclasses import dataclass
from typing import Any, TypeVar

import psycopg
from psycopg.rows import dict_row
from psycopg.types.json import Jsonb
from psycopg_pool import ConnectionPool

from saga import queries as q
from saga import tracing
from saga.coordinator import (
    FINAL_RUN_STATES,
    JournalRow,
    NewStep,
    RunView,
)
from saga.errors import RunConflictError, RunNotFoundError, SagaError, StoreError, WaitTimeoutError
from saga.failures import ErrorType, error_record
from saga.keys import idempotency_key
from saga.messages import advance_message, step_message
from saga.outbox.message import OutboxMessage
from saga.outbox.writer import add_messages, mark_published

T = TypeVar("T")


@dataclass(frozen=True)
class Claim:
    """One attempt of a step, owned by this worker until its lease runs out."""

    run_id: str
    step_key: str
    step_name: str
    kind: str
    attempt: int
    max_attempts: int
    idempotency_key: str
    input: Any
    fn_ref: str | None
    options: Mapping[str, Any]
    run_input: Any
    saga_name: str
    trace_context: dict[str, str]
    scheduled_at: dt.datetime  # when the step's row was made: a timer's or a wait's start
    saga_ref: str
    # The previous attempt's journaled failure, if it failed (a lost attempt has no time).
    previous_failed_at: str | None = None
    previous_error_type: str | None = None


@dataclass(frozen=True)
class StepState:
    """A step as a refused claim finds it: enough to explain the refusal and trace it."""

    state: str
    attempt: int
    run_state: str
    step_name: str
    kind: str
    idempotency_key: str
    saga_name: str
    trace_context: dict[str, str]


@dataclass(frozen=True)
class _Wait:
    """A durable sleep or event wait that ended in a transaction: traced once it commits."""

    kind: str  # sleep | event
    step_key: str
    step: str
    start: dt.datetime | int
    end: int | None = None  # None: the commit
    error_type: str | None = None


@dataclass(frozen=True)
class RunRecord:
    run_id: str
    saga_name: str
    saga_ref: str
    saga_version: str
    state: str
    input: Any
    result: Any
    error: Any
    created_at: dt.datetime
    updated_at: dt.datetime
    finished_at: dt.datetime | None

    @property
    def finished(self) -> bool:
        return self.state in FINAL_RUN_STATES


@dataclass(frozen=True)
class StepRecord:
    step_key: str
    step_name: str
    kind: str
    seq: int
    state: str
    attempt: int
    max_attempts: int
    idempotency_key: str
    result: Any
    error: Any
    created_at: dt.datetime
    started_at: dt.datetime | None
    attempt_started_at: dt.datetime | None
    finished_at: dt.datetime | None

    @property
    def duration_seconds(self) -> float | None:
        """Duration of the latest attempt, when it has finished."""
        if self.attempt_started_at and self.finished_at:
            return (self.finished_at - self.attempt_started_at).total_seconds()
        return None


class Fenced(Exception):
    """The attempt no longer owns its step (lease lost) or the run moved on; nothing written."""


class OperatorError(SagaError):
    """An operator action does not fit the run's state."""


@contextlib.contextmanager
def _translated(action: str) -> Iterator[None]:
    try:
        yield
    except psycopg.Error as exc:
        raise StoreError(f"Postgres failed while {action}: {exc}") from exc


@contextlib.contextmanager
def _pipelined_transaction(conn: psycopg.Connection[Any]) -> Iterator[psycopg.Cursor[Any]]:
    """A transaction with a synchronous commit, sent in pipeline mode: statements whose results
    are not read cost no round trip, and BEGIN ... COMMIT end with a single Sync. (psycopg's
    ``conn.transaction()`` syncs at BEGIN, at COMMIT and again on leaving the pipeline.) A
    block that raises is rolled back before the connection goes back to its pool."""
    try:
        with conn.pipeline(), conn.cursor() as cur:
            cur.execute("BEGIN")
            cur.execute("SET LOCAL synchronous_commit TO on")
            yield cur
            cur.execute("COMMIT")
    except BaseException:
        if conn.info.transaction_status != psycopg.pq.TransactionStatus.IDLE:
            with contextlib.suppress(psycopg.Error):
                conn.rollback()
        raise


def open_pool(database_url: str, *, size: int, name: str = "saga") -> ConnectionPool:
    """A connection pool whose connections commit asynchronously unless a transaction says not.

    Claims, lease renewals and publish marks need no fsync (losing one in a Postgres crash only
    re-runs an unjournaled attempt); every step outcome sets ``synchronous_commit`` back on.
    """
    return ConnectionPool(
        database_url,
        min_size=1,
        max_size=max(1, size),
        kwargs={
            "autocommit": True,
            "options": "-c synchronous_commit=off",
            "application_name": name,
        },
        name=name,
        open=True,
    )


class JournalCache:
    """Completed journal rows by run, per process: a workflow's replay then reads only what is
    new since this process last advanced the run, so replay cost does not grow with the run's
    length. Updated only after the reading transaction commits."""

    def __init__(self, max_runs: int = 256) -> None:
        self._runs: collections.OrderedDict[str, tuple[int, dict[str, JournalRow]]] = (
            collections.OrderedDict()
        )
        self._max_runs = max_runs

    def get(self, run_id: str) -> tuple[int, dict[str, JournalRow]]:
        seen, rows = self._runs.get(run_id, (0, {}))
        return seen, dict(rows)

    def seen(self, run_id: str) -> int:
        return self._runs.get(run_id, (0, {}))[0]

    def put(self, run_id: str, seen: int, rows: dict[str, JournalRow]) -> None:
        self._runs[run_id] = (seen, rows)
        self._runs.move_to_end(run_id)
        while len(self._runs) > self._max_runs:
            self._runs.popitem(last=False)


class RunTransaction:
    """``coordinator.RunTx`` over an open transaction holding the run's lock."""

    def __init__(
        self,
        cur: psycopg.Cursor[Any],
        run: RunView,
        queue: str,
        dispatch_timeout: float,
        cache: JournalCache | None = None,
        prefetched: tuple[int, psycopg.Cursor[Any]] | None = None,
    ) -> None:
        self._cur = cur
        self._cache = cache or JournalCache(0)
        # (seen, cursor) of a journal read sent with the run lock, before the coordinator asks.
        self._prefetched = prefetched
        self._cache_update: tuple[int, dict[str, JournalRow]] | None = None
        self.run = run
        self._default_queue = queue
        self._dispatch_timeout = dispatch_timeout
        self.messages: list[OutboxMessage] = []
        self._journal: list[JournalRow] | None = None
        # The step whose completion is being journaled, if any: lets the coordinator move a
        # chain on without reading the journal.
        self.completed: JournalRow | None = None
        self.finished: tuple[str, Mapping[str, Any] | None] | None = None  # final state set
        # Traced once committed, and only when tracing: workflow steps fetched from Postgres
        # (not this process's cache), and the waits that ended here.
        self._replaying = False
        self._read_back: dict[str, JournalRow] = {}
        self._waits: list[_Wait] = []

    @property
    def queue(self) -> str:
        """Where this run's messages go: its own queue, else this process's."""
        return self.run.queue or self._default_queue

    def journal(self, *, replay: bool = False) -> list[JournalRow]:
        self._replaying = self._replaying or replay
        if self._journal is None:
            seen, completed = self._cache.get(self.run.run_id)
            if self._prefetched is not None and self._prefetched[0] == seen:
                cur = self._prefetched[1]
            else:
                cur = self._cur.execute(q.SELECT_JOURNAL, {"run_id": self.run.run_id, "seen": seen})
            self._prefetched = None  # what the transaction writes next, it must read afresh
            fresh = [JournalRow(*r) for r in cur.fetchall()]
            traced = tracing.enabled()
            for r in fresh:  # kept once (and only if) this transaction commits
                if r.state == "completed" and r.completed_seq:
                    completed[r.step_key] = r
                    if traced and r.kind == "action" and r.position is not None:
                        self._read_back[r.step_key] = r
            # Cached rows are at or below ``seen``: only the fresh ones can move it.
            self._cache_update = (
                max([seen, *(r.completed_seq or 0 for r in fresh if r.state == "completed")]),
                completed,
            )
            rows = {**completed, **{r.step_key: r for r in fresh}}
            self._journal = list(rows.values())
        return self._journal

    def schedule(self, steps: Sequence[NewStep]) -> None:
        self._journal = None
        for s in steps:
            self._cur.execute(
                q.INSERT_STEP,
                {
                    "run_id": self.run.run_id,
                    "step_key": s.step_key,
                    "step_name": s.step_name,
                    "kind": s.kind,
                    "position": s.position,
                    "state": s.state,
                    "fn_ref": s.fn_ref,
                    "compensation_ref": s.compensation_ref,
                    "options": Jsonb(dict(s.options)),
                    "max_attempts": s.max_attempts,
                    "idempotency_key": s.idempotency_key,
                    "input": s.input_json,
                    "delay": s.delay_seconds,
                    "dispatch_timeout": self._dispatch_timeout,
                },
            )
            # Not read back (no round trip in pipeline mode): were the row there already, its
            # message is a duplicate, which the claim fences.
            if s.state == "dispatched":
                self.messages.append(
                    step_message(
                        s.options.get("queue") or self.queue,
                        self.run.run_id,
                        s.step_key,
                        self.run.trace_context,
                    )
                )

    def consume_event(self, name: str, step_key: str) -> tuple[bool, Any]:
        row = self._cur.execute(
            q.CONSUME_EVENT, {"run_id": self.run.run_id, "name": name, "step_key": step_key}
        ).fetchone()
        return (False, None) if row is None else (True, row[0])

    def record_event(self, step: NewStep, payload: Any) -> None:
        """Journal an event that was sent before the run waited for it: a wait of no length."""
        self._journal = None
        now = time.time_ns()
        self._wait_over(_Wait("event", step.step_key, step.step_name, now, now))
        self._cur.execute(
            q.INSERT_RECEIVED_EVENT,
            {
                "run_id": self.run.run_id,
                "step_key": step.step_key,
                "step_name": step.step_name,
                "position": step.position,
                "idempotency_key": step.idempotency_key,
                "result": Jsonb(payload),
            },
        )

    def finish(
        self, state: str, *, result_json: str | None = None, error: Mapping[str, Any] | None = None
    ) -> None:
        self._cur.execute(
            q.FINISH_RUN,
            {
                "run_id": self.run.run_id,
                "state": state,
                "result": result_json,
                "error": None if error is None else Jsonb(dict(error)),
            },
        )
        self._cur.execute(q.CANCEL_OPEN_STEPS, (self.run.run_id,))
        self._journal = None
        self.finished = (state, error if error is not None else self.run.error)

    def _wait_over(self, wait: _Wait) -> None:
        if tracing.enabled():
            self._waits.append(wait)

    def committed(self) -> None:
        """After commit: keep what was read in the journal cache; trace the steps a replay
        read back, the waits that ended, a final state."""
        if self._cache_update is not None:
            self._cache.put(self.run.run_id, *self._cache_update)
        if self._replaying and self._read_back:
            self._trace_read_back()
        run = self.run
        for wait in self._waits:
            failed = {} if wait.error_type is None else {tracing.ERROR_TYPE: wait.error_type}
            tracing.record_wait(
                run.trace_context,
                kind=wait.kind,
                saga_name=run.saga_name,
                run_id=run.run_id,
                start=wait.start,
                end=wait.end,
                step=wait.step,
                attributes={tracing.SAGA_STEP_KEY: wait.step_key, **failed},
            )
        if self.finished is not None:
            state, error = self.finished
            tracing.run_finished(
                self.run.trace_context,
                saga_name=self.run.saga_name,
                run_id=self.run.run_id,
                state=state,
                error=error,
            )

    def _trace_read_back(self) -> None:
        """Replayed spans for the workflow steps this process had not read before (the journal
        cache now holds them: once per step and process), except the one completing here."""
        run, done = self.run, self.completed
        for row in self._read_back.values():
            if done is not None and row.step_key == done.step_key:
                continue
            tracing.replayed_step(
                run.trace_context,
                saga_name=run.saga_name,
                run_id=run.run_id,
                step=row.step_name,
                attempt=row.attempt,
                idempotency_key=idempotency_key(run.run_id, row.step_key),
            )

    def begin_compensation(self, error: Mapping[str, Any]) -> None:
        self._cur.execute(
            q.BEGIN_COMPENSATION, {"run_id": self.run.run_id, "error": Jsonb(dict(error))}
        )
        self._cur.execute(q.CANCEL_OPEN_STEPS, (self.run.run_id,))
        self.run = RunView(**{**vars(self.run), "state": "compensating", "error": dict(error)})
        self._journal = None

    def step_input(self, step_key: str) -> Any:
        row = self._cur.execute(q.SELECT_STEP_INPUT, (self.run.run_id, step_key)).fetchone()
        return None if row is None else row[0]

    def advance_later(self) -> None:
        """Have a worker advance the run (it has the definitions; this process may not)."""
        self.messages.append(advance_message(self.queue, self.run.run_id, self.run.trace_context))


Advance = Callable[[RunTransaction], None]


class PostgresStore:
    def __init__(self, pool: ConnectionPool, *, queue: str, dispatch_timeout: float) -> None:
        self._pool = pool
        self._queue = queue
        self._dispatch_timeout = dispatch_timeout
        self._journals = JournalCache()

    def close(self) -> None:
        self._pool.close()

    @contextlib.contextmanager
    def _locked_run(self, run_id: str, action: str) -> Iterator[RunTransaction]:
        """A transaction holding the run's lock; commits its outbox messages with it."""
        with (
            _translated(action),
            self._pool.connection() as conn,
            _pipelined_transaction(conn) as cur,
        ):
            row = cur.execute(q.LOCK_RUN, (run_id,)).fetchone()
            if row is None:
                raise RunNotFoundError(f"no run has id {run_id!r}")
            tx = RunTransaction(
                cur, RunView(*row), self._queue, self._dispatch_timeout, self._journals
            )
            yield tx
            add_messages(cur, tx.messages)
        tx.committed()

    # -- runs ---------------------------------------------------------------------------------

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
        start: Advance,
    ) -> bool:
        """Create a run and let ``start`` schedule its first steps, in one transaction. False
        if the id exists already for the same saga and input (idempotent), RunConflictError if
        it exists otherwise."""
        with _translated(f"creating run {run_id!r}"), self._pool.connection() as conn:
            with _pipelined_transaction(conn) as cur:
                created = cur.execute(
                    q.INSERT_RUN,
                    {
                        "run_id": run_id,
                        "saga_name": saga_name,
                        "saga_ref": saga_ref,
                        "saga_version": saga_version,
                        "input": input_json,
                        "trace_context": Jsonb(dict(trace_context)),
                        "timeout": timeout,
                        "queue": self._queue,
                    },
                ).fetchone()
                if created:
                    run = RunView(
                        run_id,
                        "running",
                        saga_name,
                        saga_ref,
                        saga_version,
                        json.loads(input_json),
                        None,
                        trace_context,
                        self._queue,
                    )
                    tx = RunTransaction(cur, run, self._queue, self._dispatch_timeout)
                    start(tx)
                    add_messages(cur, tx.messages)
                    created_tx = tx
            if created:
                created_tx.committed()
                return True
            row = conn.execute(q.SELECT_RUN_IDENTITY, (run_id,)).fetchone()
        assert row is not None
        if row[0] != saga_name or row[1] != json.loads(input_json):
            raise RunConflictError(
                f"run id {run_id!r} is taken by a run of saga {row[0]!r} with another input; "
                f"choose a new run id, or pass the same saga and input to get the existing run"
            )
        return False

    def get_run(self, run_id: str) -> RunRecord:
        with _translated(f"reading run {run_id!r}"), self._pool.connection() as conn:
            row = conn.cursor(row_factory=dict_row).execute(q.SELECT_RUN, (run_id,)).fetchone()
        if row is None:
            raise RunNotFoundError(f"no run has id {run_id!r}")
        return RunRecord(**row)

    def get_steps(self, run_id: str) -> list[StepRecord]:
        with _translated(f"reading the steps of run {run_id!r}"), self._pool.connection() as conn:
            rows = conn.cursor(row_factory=dict_row).execute(q.SELECT_STEPS, (run_id,)).fetchall()
        return [StepRecord(**r) for r in rows]

    def completed_results(self, run_id: str) -> dict[str, Any]:
        with _translated(f"reading results of run {run_id!r}"), self._pool.connection() as conn:
            return dict(conn.execute(q.SELECT_RESULTS, (run_id,)).fetchall())

    def wait_for_run(self, run_id: str, timeout: float | None) -> RunRecord:
        """Block until the run reaches a final state (LISTEN/NOTIFY, no polling loop)."""
        deadline = None if timeout is None else time.monotonic() + timeout
        with (
            _translated(f"waiting for run {run_id!r}"),
            psycopg.connect(str(self._pool.conninfo), autocommit=True) as conn,
        ):
            conn.execute("LISTEN saga_run_finished")
            while True:
                run = self.get_run(run_id)
                if run.finished:
                    return run
                remaining = None if deadline is None else deadline - time.monotonic()
                if remaining is not None and remaining <= 0:
                    raise WaitTimeoutError(
                        f"run {run_id!r} is still {run.state} after {timeout} s; it keeps running "
                        f"(`saga show {run_id}` shows where it is)"
                    )
                # Wake on any finished run, and at least every few seconds in case a NOTIFY was
                # missed while reconnecting.
                wait = 5.0 if remaining is None else min(5.0, remaining)
                for notify in conn.notifies(timeout=wait):
                    if notify.payload == run_id:
                        break

    # -- steps --------------------------------------------------------------------------------

    def claim_step(
        self,
        run_id: str,
        step_key: str,
        *,
        owner: str,
        lease: float,
        published: Sequence[uuid.UUID] = (),
    ) -> Claim | None:
        """Take one attempt of the step, or None if it is not claimable (already running,
        completed, failed, its run has ended, or it does not exist). Outbox rows in
        ``published`` (sent earlier by this process) are marked published in the same round
        trip."""
        params = {"run_id": run_id, "step_key": step_key, "owner": owner, "lease": lease}
        with (
            _translated(f"claiming step {step_key!r} of run {run_id!r}"),
            self._pool.connection() as conn,
        ):
            if published:
                with conn.pipeline():  # both statements, one Sync; results read after it
                    mark_published(conn, published)
                    cur = conn.execute(q.CLAIM_STEP, params)
                row = cur.fetchone()
            else:
                row = conn.execute(q.CLAIM_STEP, params).fetchone()
        if row is None:
            return None
        attempt, name, kind, max_attempts, key, input_, fn, options = row[:8]
        run_input, saga, trace, created, ref, failed_at, error_type = row[8:]
        return Claim(
            run_id,
            step_key,
            name,
            kind,
            attempt,
            max_attempts,
            key,
            input_,
            fn,
            options or {},
            run_input,
            saga,
            trace or {},
            created,
            ref,
            failed_at,
            error_type,
        )

    def step_state(self, run_id: str, step_key: str) -> StepState | None:
        """The step and its run as they are, for explaining why a claim was refused."""
        with _translated("reading a step's state"), self._pool.connection() as conn:
            row = conn.execute(q.SELECT_STEP_STATE, (run_id, step_key)).fetchone()
        return None if row is None else StepState(*row)

    def renew_lease(self, claim: Claim, lease: float) -> bool:
        with _translated("renewing a lease"), self._pool.connection() as conn:
            row = conn.execute(
                q.RENEW_LEASE,
                {
                    "run_id": claim.run_id,
                    "step_key": claim.step_key,
                    "attempt": claim.attempt,
                    "lease": lease,
                },
            ).fetchone()
        return row is not None

    def complete_step(
        self,
        claim: Claim,
        result_json: str,
        advance: Advance,
        *,
        fast_path_delay: float,
        read_journal: bool = False,
    ) -> list[OutboxMessage]:
        """Journal the step's result and what the coordinator decides from it, in one
        transaction; returns the messages it caused. Their outbox rows are left to the caller's
        fast path for ``fast_path_delay`` seconds. Raises Fenced when the attempt lost its
        lease or the run moved on. ``read_journal``: the coordinator will read the journal (a
        workflow replays), so the read goes out with the run lock, saving a round trip."""

        def outcome(tx: RunTransaction, state: str) -> None:
            tx.completed = JournalRow(
                claim.step_key,
                claim.step_name,
                claim.kind,
                "completed",
                None,
                json.loads(result_json),
                None,
                None,
                None,
                options=claim.options,
                attempt=claim.attempt,
                result_json=result_json,
            )
            if claim.kind == "timer":  # a durable sleep, over
                tx._wait_over(_Wait("sleep", claim.step_key, claim.step_name, claim.scheduled_at))
            advance(tx)

        return self._outcome(
            claim,
            "journaling the result of",
            q.COMPLETE_STEP,
            {"result": result_json},
            outcome,
            fast_path_delay,
            read_journal,
        )

    def fail_attempt(
        self,
        claim: Claim,
        error: Mapping[str, Any],
        *,
        retry_in: float | None,
        advance: Advance,
        fast_path_delay: float = 0.0,
        read_journal: bool = False,
    ) -> list[OutboxMessage]:
        """Record a failed attempt: retried after ``retry_in`` seconds, or (None) failed for
        good, which the coordinator acts on in the same transaction."""

        def outcome(tx: RunTransaction, state: str) -> None:
            if claim.kind == "event":  # dispatched only when the wait timed out
                waited = (claim.step_key, claim.step_name, claim.scheduled_at)
                tx._wait_over(_Wait("event", *waited, error_type=str(error.get("type"))))
            if state == "failed":
                advance(tx)

        return self._outcome(
            claim,
            "journaling a failure of",
            q.FAIL_ATTEMPT,
            {
                "retry": retry_in is not None,
                "delay": retry_in or 0.0,
                "error": Jsonb({**error, "retryable": retry_in is not None}),
            },
            outcome,
            fast_path_delay,
            read_journal and retry_in is None,
        )

    def _outcome(
        self,
        claim: Claim,
        action: str,
        fence_query: str,
        fence_params: dict[str, Any],
        body: Callable[[RunTransaction, str], None],
        fast_path_delay: float,
        read_journal: bool,
    ) -> list[OutboxMessage]:
        """The outcome transaction, pipelined: the run lock and the fenced step update go in
        one round trip, what the coordinator writes and the commit in another."""
        where = f"{action} step {claim.step_key!r} of run {claim.run_id!r}"
        key = {"run_id": claim.run_id, "step_key": claim.step_key, "attempt": claim.attempt}
        with (
            _translated(where),
            self._pool.connection() as conn,
            _pipelined_transaction(conn) as run_cur,
            conn.cursor() as step_cur,
        ):
            run_cur.execute(q.LOCK_RUN, (claim.run_id,))
            step_cur.execute(fence_query, {**key, **fence_params})
            prefetched = None
            if read_journal:  # after the lock and the fence, in the same round trip
                seen = self._journals.seen(claim.run_id)
                journal_cur = conn.cursor()
                journal_cur.execute(q.SELECT_JOURNAL, {"run_id": claim.run_id, "seen": seen})
                prefetched = (seen, journal_cur)
            row, fenced = run_cur.fetchone(), step_cur.fetchone()
            if row is None or fenced is None:
                raise Fenced
            tx = RunTransaction(
                run_cur,
                RunView(*row),
                self._queue,
                self._dispatch_timeout,
                self._journals,
                prefetched,
            )
            allowed = (
                ("compensating",) if claim.kind == "compensation" else ("running", "compensating")
            )
            if tx.run.state not in allowed:
                raise Fenced
            body(tx, fenced[0])
            add_messages(run_cur, tx.messages, delay_seconds=fast_path_delay)
        tx.committed()
        return tx.messages

    def advance_run(self, run_id: str, advance: Advance) -> None:
        """Advance a run outside any step outcome (an advance task)."""
        with self._locked_run(run_id, f"advancing run {run_id!r}") as tx:
            advance(tx)

    def mark_published(self, message_ids: Sequence[uuid.UUID]) -> None:
        with _translated("marking outbox rows published"), self._pool.connection() as conn:
            mark_published(conn, message_ids)

    # -- events and operators -----------------------------------------------------------------

    def send_event(self, run_id: str, name: str, payload: Any) -> bool:
        """Deliver an event: it completes the step waiting for it (True), or is kept until the
        run waits for it (False)."""
        with self._locked_run(run_id, f"sending event {name!r} to run {run_id!r}") as tx:
            if tx.run.state != "running":
                raise OperatorError(f"run {run_id!r} is {tx.run.state}; it takes no events")
            cur = tx._cur
            delivered = cur.execute(
                q.DELIVER_EVENT, {"run_id": run_id, "name": name, "payload": Jsonb(payload)}
            ).fetchone()
            if delivered:
                tx._wait_over(_Wait("event", delivered[0], name, delivered[1]))
                tx.advance_later()
                return True
            cur.execute(q.STORE_EVENT, (run_id, name, Jsonb(payload)))
            return False

    def stop_run(self, run_id: str, stop: Advance) -> None:
        with self._locked_run(run_id, f"stopping run {run_id!r}") as tx:
            if tx.run.state != "running":
                raise OperatorError(
                    f"run {run_id!r} is {tx.run.state}; only a running run can be cancelled"
                )
            stop(tx)

    def retry_run(self, run_id: str) -> None:
        """Operator retry: a failed run resumes at its failed steps (or replays, after a code
        fix); a run whose compensation failed retries that compensation."""
        with self._locked_run(run_id, f"retrying run {run_id!r}") as tx:
            cur = tx._cur
            if tx.run.state == "failed":
                kinds, state = ["action", "timer", "event"], "running"
            elif tx.run.state == "compensation_failed":
                kinds, state = ["compensation"], "compensating"
            else:
                raise OperatorError(
                    f"run {run_id!r} is {tx.run.state}; only failed or "
                    f"compensation_failed runs can be retried"
                )
            error = tx.run.error if state == "compensating" else None
            cur.execute(
                q.REOPEN_RUN,
                {
                    "run_id": run_id,
                    "state": state,
                    "error": None if error is None else Jsonb(error),
                    "from_states": [tx.run.state],
                },
            )
            for key, state, step_queue in cur.execute(
                q.RETRY_FAILED_STEPS,
                {
                    "run_id": run_id,
                    "kinds": kinds,
                    "dispatch_timeout": self._dispatch_timeout,
                },
            ).fetchall():
                if state == "dispatched":
                    tx.messages.append(
                        step_message(step_queue or tx.queue, run_id, key, tx.run.trace_context)
                    )
            tx.advance_later()

    def fork_run(
        self, run_id: str, step_key: str, *, saga_version: str, new_run_id: str | None = None
    ) -> str:
        """A new run with this run's completed steps before ``step_key`` copied; that step and
        everything after it run again."""
        new_id = new_run_id or uuid.uuid4().hex
        with self._locked_run(run_id, f"forking run {run_id!r}") as tx:
            cur = tx._cur
            seq = cur.execute(q.SELECT_STEP_SEQ, (run_id, step_key)).fetchone()
            if seq is None:
                raise OperatorError(
                    f"run {run_id!r} has no step {step_key!r} to fork from "
                    f"(`saga show {run_id}` lists its step keys)"
                )
            cur.execute(
                q.FORK_RUN,
                {
                    "new_run_id": new_id,
                    "run_id": run_id,
                    "saga_version": saga_version,
                    "trace_context": Jsonb(dict(tx.run.trace_context)),
                },
            )
            cur.execute(
                q.FORK_STEPS, {"new_run_id": new_id, "run_id": run_id, "before_seq": seq[0]}
            )
            tx.messages.append(advance_message(tx.queue, new_id, tx.run.trace_context))
        return new_id

    # -- recovery -----------------------------------------------------------------------------

    def expire_leases(self, limit: int = 100) -> list[tuple[str, str, str]]:
        """Attempts whose worker died: back to pending (retried now), or failed when out of
        attempts, and then a worker advances the run. Returns (run_id, step_key, new state)."""
        expired: list[tuple[str, str, str]] = []
        with _translated("reading expired leases"), self._pool.connection() as conn:
            rows = conn.execute(q.SELECT_EXPIRED_LEASES, (limit,)).fetchall()
        for run_id, step_key, attempt in rows:
            error = error_record(
                ErrorType.LEASE_EXPIRED,
                f"attempt {attempt} of step {step_key!r} lost its worker (lease expired)",
                attempt=attempt,
            )
            with self._locked_run(run_id, "expiring a lease") as tx:
                row = tx._cur.execute(
                    q.EXPIRE_LEASE,
                    {
                        "run_id": run_id,
                        "step_key": step_key,
                        "attempt": attempt,
                        "error": Jsonb(error),
                        "undoing": tx.run.state != "running",
                    },
                ).fetchone()
                if row is None:
                    continue  # finished or renewed meanwhile
                if row[0] == "failed":
                    tx.advance_later()
                expired.append((run_id, step_key, row[0]))
        return expired

    def overdue_runs(self, limit: int = 100) -> list[str]:
        with _translated("reading overdue runs"), self._pool.connection() as conn:
            return [r[0] for r in conn.execute(q.SELECT_OVERDUE_RUNS, (limit,)).fetchall()]

    def redispatch_due(self, limit: int = 500) -> int:
        """Dispatch steps whose time has come (retries, timers, timed-out waits, lost
        messages); returns how many."""
        with (
            _translated("dispatching due steps"),
            self._pool.connection() as conn,
            _pipelined_transaction(conn) as cur,
        ):
            rows = cur.execute(
                q.REDISPATCH_DUE, {"limit": limit, "dispatch_timeout": self._dispatch_timeout}
            ).fetchall()
            add_messages(
                cur, [step_message(qu or self._queue, r, k, t or {}) for r, k, t, qu in rows]
            )
            return len(rows)

    def trace_context(self, run_id: str) -> tuple[str, dict[str, str]] | None:
        """(saga name, trace context) of a run, for tracing a change made without a claim."""
        with _translated(f"reading run {run_id!r}"), self._pool.connection() as conn:
            row = conn.execute(q.SELECT_TRACE_CONTEXT, (run_id,)).fetchone()
        return None if row is None else (row[0], row[1] or {})

    def seconds_until_next_due(self) -> float | None:
        with _translated("reading the next due step"), self._pool.connection() as conn:
            row = conn.execute(q.NEXT_DUE).fetchone()
        return None if row is None or row[0] is None else max(0.0, float(row[0]))
