"""One transaction on one run, holding the run's row lock: ``coordinator.RunTx`` over Postgres,
the journal cache that spares a workflow's replay the rows it has read before, and the pipelined
transaction both run in. psycopg errors become StoreError (or RunTransitionError) here.

Statements whose results are not read cost no round trip in pipeline mode, so writes are sent
and not read back; run transitions check themselves in SQL (``saga.queries``, FINISH_RUN).
"""

from __future__ import annotations

import collections
import contextlib
import datetime as dt
import time
from collections.abc import Callable, Iterator, Mapping, Sequence
from dataclasses import dataclass
from typing import Any

import psycopg
from psycopg.rows import class_row, dict_row
from psycopg.types.json import Jsonb

from saga import queries as q
from saga import tracing
from saga.coordinator import JournalRow, NewStep, RunView
from saga.errors import StoreError, StoreRejectedError
from saga.keys import idempotency_key
from saga.messages import advance_message, step_message
from saga.outbox.message import OutboxMessage
from saga.records import RunTransitionError
from saga.states import RunEventType, RunState, StepKind, StepState

# Raised by saga_run_transition_refused (migration 0003) when a run transition matched no row.
TRANSITION_REFUSED = "SG001"


# Errors another try may cure: the connection or server went away, a serialization failure or
# deadlock, a pool timeout (all OperationalError), a connection that reached a primary demoted
# to read-only in a failover, or a session the server timed out.
_OUTAGES = (
    psycopg.OperationalError,
    psycopg.InterfaceError,
    psycopg.errors.ReadOnlySqlTransaction,
    psycopg.errors.IdleInTransactionSessionTimeout,
)


@contextlib.contextmanager
def translated(action: str) -> Iterator[None]:
    """The seam: psycopg errors become StoreError (an outage: retry), StoreRejectedError (the
    data or statement refused: retrying cannot help), or RunTransitionError."""
    try:
        yield
    except psycopg.Error as exc:
        if exc.sqlstate == TRANSITION_REFUSED:
            hint = exc.diag.message_hint
            raise RunTransitionError(
                f"{exc.diag.message_primary} (while {action}); {hint}"
            ) from exc
        if isinstance(exc, _OUTAGES):
            # The connection or the server went away, a serialization failure, a deadlock, a
            # pool timeout: another try may succeed.
            raise StoreError(f"Postgres failed while {action}: {exc}") from exc
        raise StoreRejectedError(
            f"Postgres refused what was written while {action}: {exc}"
        ) from exc


@contextlib.contextmanager
def pipelined_transaction(conn: psycopg.Connection[Any]) -> Iterator[psycopg.Cursor[Any]]:
    """A transaction with a synchronous commit, sent in pipeline mode: statements whose results
    are not read cost no round trip, and BEGIN ... COMMIT end with a single Sync. (psycopg's
    ``conn.transaction()`` syncs at BEGIN, at COMMIT and again on leaving the pipeline.) A
    block that raises is rolled back before the connection goes back to its pool."""
    try:
        with conn.pipeline(), conn.cursor() as cur:
            cur.execute(q.BEGIN)
            cur.execute(q.SYNCHRONOUS_COMMIT_ON)
            yield cur
            cur.execute(q.COMMIT)
    except BaseException:
        if conn.info.transaction_status != psycopg.pq.TransactionStatus.IDLE:
            with contextlib.suppress(psycopg.Error):
                conn.rollback()
        raise


def journal_cursor(conn: psycopg.Connection[Any]) -> psycopg.Cursor[JournalRow]:
    return conn.cursor(row_factory=class_row(JournalRow))


def lock_run(conn: psycopg.Connection[Any], run_id: str) -> psycopg.Cursor[RunView]:
    """Send LOCK_RUN (its row, read by name into a RunView, is fetched by the caller)."""
    return conn.cursor(row_factory=class_row(RunView)).execute(q.LOCK_RUN, (run_id,))


@dataclass(frozen=True)
class Wait:
    """A durable sleep or event wait that ended in a transaction: traced once it commits."""

    kind: str  # sleep | event
    step_key: str
    step: str
    start: dt.datetime | int
    end: int | None = None  # None: the commit
    error_type: str | None = None


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
        prefetched: tuple[int, psycopg.Cursor[JournalRow]] | None = None,
        key_prefix: str = "",
    ) -> None:
        self._cur = cur
        self._cache = cache or JournalCache(0)
        # (seen, cursor) of a journal read sent with the run lock, before the coordinator asks.
        self._prefetched = prefetched
        self._cache_update: tuple[int, dict[str, JournalRow]] | None = None
        self.run = run
        self._default_queue = queue
        self._dispatch_timeout = dispatch_timeout
        self._key_prefix = key_prefix  # this process's, for the runs it creates (a fork)
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
        self._waits: list[Wait] = []

    @property
    def queue(self) -> str:
        """Where this run's messages go: its own queue, else this process's."""
        return self.run.queue or self._default_queue

    def _named(self) -> psycopg.Cursor[dict[str, Any]]:
        """A cursor of the transaction's connection whose rows are read by column name."""
        return self._cur.connection.cursor(row_factory=dict_row)

    # -- coordinator.RunTx --------------------------------------------------------------------

    def journal(self, *, replay: bool = False) -> list[JournalRow]:
        self._replaying = self._replaying or replay
        if self._journal is None:
            seen, completed = self._cache.get(self.run.run_id)
            if self._prefetched is not None and self._prefetched[0] == seen:
                cur = self._prefetched[1]
            else:
                cur = journal_cursor(self._cur.connection).execute(
                    q.SELECT_JOURNAL, {"run_id": self.run.run_id, "seen": seen}
                )
            self._prefetched = None  # what the transaction writes next, it must read afresh
            fresh = cur.fetchall()
            traced = tracing.enabled()
            for r in fresh:  # kept once (and only if) this transaction commits
                if r.state == StepState.COMPLETED and r.completed_seq:
                    completed[r.step_key] = r
                    if traced and r.kind == StepKind.ACTION and r.position is not None:
                        self._read_back[r.step_key] = r
            # Cached rows are at or below ``seen``: only the fresh ones can move it.
            done = (r.completed_seq or 0 for r in fresh if r.state == StepState.COMPLETED)
            self._cache_update = (max([seen, *done]), completed)
            rows = {**completed, **{r.step_key: r for r in fresh}}
            self._journal = list(rows.values())
        return self._journal

    def schedule(self, steps: Sequence[NewStep]) -> None:
        self._journal = None
        if not self.run.gated and any(s.options.get("gates") for s in steps):
            self._cur.execute(q.MARK_RUN_GATED, (self.run.run_id,))
            self.run = RunView(**{**vars(self.run), "gated": True})
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
            if s.state == StepState.DISPATCHED:
                self.messages.append(
                    step_message(
                        s.options.get("queue") or self.queue,
                        self.run.run_id,
                        s.step_key,
                        self.run.trace_context,
                    )
                )

    def consume_event(self, name: str, step_key: str) -> tuple[bool, Any]:
        row = (
            self._named()
            .execute(
                q.CONSUME_EVENT, {"run_id": self.run.run_id, "name": name, "step_key": step_key}
            )
            .fetchone()
        )
        return (False, None) if row is None else (True, row["payload"])

    def record_event(self, step: NewStep, payload: Any) -> None:
        """Journal an event that was sent before the run waited for it: a wait of no length."""
        self._journal = None
        now = time.time_ns()
        self.wait_over(Wait("event", step.step_key, step.step_name, now, now))
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
        self,
        state: RunState,
        *,
        result_json: str | None = None,
        error: Mapping[str, Any] | None = None,
    ) -> None:
        # Guarded in SQL: a run in no state to finish aborts the transaction at its commit.
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
        if self.run.gated:
            self.release_gates(None)

    def cancel_open_steps(self) -> None:
        self._cur.execute(q.CANCEL_OPEN_STEPS, (self.run.run_id,))
        self._journal = None  # what it cancelled, and what a claim took first, read afresh
        if self.run.gated:
            self.release_gates(None)

    def correct_rate_grant(self, step_key: str, gate: str, units: int) -> None:
        """The step reported what it used of a rate limit: its grant takes that instead of the
        estimate (later steps wait for the budget it really took)."""
        self._cur.execute(
            q.CORRECT_RATE_GRANT,
            {"gate": gate, "run_id": self.run.run_id, "step_key": step_key, "units": units},
        )

    def release_gates(self, step_key: str | None) -> None:
        """Give back the gates (saga.limits) of ``step_key``, whose attempt ended, or (None) of
        the run's steps that no longer run or wait; and the run's own slot once it has ended
        and none of its attempts still runs. The waiters they go to are dispatched in this
        transaction; their messages go with its own."""
        rows = self._named().execute(
            q.RELEASE_GATES,
            {
                "run_id": self.run.run_id,
                "step_key": step_key,
                "dispatch_timeout": self._dispatch_timeout,
            },
        )
        self.messages.extend(
            step_message(
                r["queue"] or self._default_queue, r["run_id"], r["step_key"], r["trace_context"]
            )
            for r in rows.fetchall()
        )

    def begin_compensation(self, error: Mapping[str, Any]) -> None:
        # Guarded in SQL, as finish.
        self._cur.execute(
            q.BEGIN_COMPENSATION, {"run_id": self.run.run_id, "error": Jsonb(dict(error))}
        )
        self._cur.execute(q.CANCEL_OPEN_STEPS, (self.run.run_id,))
        if self.run.gated:
            self.release_gates(None)
        detail = {"type": error.get("type"), "message": error.get("message")}
        self.log_run_event(RunEventType.COMPENSATION_BEGUN, detail=detail)
        self.run = RunView(
            **{**vars(self.run), "state": RunState.COMPENSATING, "error": dict(error)}
        )
        self._journal = None

    # -- what the store's own paths write ------------------------------------------------------

    def log_run_event(
        self,
        event: RunEventType,
        *,
        actor: str | None = None,
        detail: Mapping[str, Any] | None = None,
        run_id: str | None = None,
    ) -> None:
        """A run-level event for the run's history (saga_run_events), written with this
        transaction and not read back: no round trip of its own."""
        self._cur.execute(
            q.RECORD_RUN_EVENT,
            {
                "run_id": run_id or self.run.run_id,
                "event": event,
                "actor": actor,
                "detail": None if detail is None else Jsonb(dict(detail)),
            },
        )

    def step_input(self, step_key: str) -> Any:
        row = self._cur.execute(q.SELECT_STEP_INPUT, (self.run.run_id, step_key)).fetchone()
        return None if row is None else row[0]

    def advance_later(self, run_id: str | None = None) -> None:
        """Have a worker advance the run (it has the definitions; this process may not). The
        request is recorded on the run too: a lost task is sent again by the sweeper."""
        run_id = run_id or self.run.run_id
        self._cur.execute(
            q.ADVANCE_REQUESTED, {"run_id": run_id, "dispatch_timeout": self._dispatch_timeout}
        )
        self.messages.append(advance_message(self.queue, run_id, self.run.trace_context))

    def advancing(self) -> None:
        """An advance task runs in this transaction: no advance is owed any more."""
        self._cur.execute(q.ADVANCE_DONE, (self.run.run_id,))

    def wait_over(self, wait: Wait) -> None:
        """A sleep or an event wait ended in this transaction: traced once it commits."""
        if tracing.enabled():
            self._waits.append(wait)

    def deliver_event(self, name: str, payload: Any) -> bool:
        """Complete the oldest step waiting for event ``name`` (True), or keep the event until
        the run waits for it (False)."""
        params = {"run_id": self.run.run_id, "name": name, "payload": Jsonb(payload)}
        delivered = self._named().execute(q.DELIVER_EVENT, params).fetchone()
        if delivered is None:
            self._cur.execute(q.STORE_EVENT, (self.run.run_id, name, Jsonb(payload)))
            return False
        self.wait_over(Wait("event", delivered["step_key"], name, delivered["created_at"]))
        return True

    def reopen(self, state: RunState, kinds: Sequence[StepKind]) -> None:
        """Operator retry: the run back to ``state`` (guarded: from the state it is in now),
        its failed steps of ``kinds`` given new attempts, and the steps its failure cancelled
        reopened; the dispatched ones get their messages."""
        error = self.run.error if state == RunState.COMPENSATING else None
        self._cur.execute(
            q.REOPEN_RUN,
            {
                "run_id": self.run.run_id,
                "state": state,
                "error": None if error is None else Jsonb(error),
                "from_states": [self.run.state],
            },
        )
        reopened = (
            self._named()
            .execute(
                q.RETRY_FAILED_STEPS,
                {
                    "run_id": self.run.run_id,
                    "kinds": list(kinds),
                    "dispatch_timeout": self._dispatch_timeout,
                },
            )
            .fetchall()
        )
        for r in reopened:
            if r["state"] == StepState.DISPATCHED:
                self.messages.append(
                    step_message(
                        r["queue"] or self.queue,
                        self.run.run_id,
                        r["step_key"],
                        self.run.trace_context,
                    )
                )

    def fork(self, step_key: str, new_run_id: str, saga_version: str) -> bool:
        """A new run with this run's completed steps before ``step_key`` copied; False if the
        run has no such step."""
        run_id = self.run.run_id
        seq = self._named().execute(q.SELECT_STEP_SEQ, (run_id, step_key)).fetchone()
        if seq is None:
            return False
        self._cur.execute(
            q.FORK_RUN,
            {
                "new_run_id": new_run_id,
                "run_id": run_id,
                "saga_version": saga_version,
                "trace_context": Jsonb(dict(self.run.trace_context)),
                "key_prefix": self._key_prefix,
            },
        )
        self._cur.execute(
            q.FORK_STEPS,
            {
                "new_run_id": new_run_id,
                "run_id": run_id,
                "before_seq": seq["seq"],
                "key_head": idempotency_key(new_run_id, "", self._key_prefix),
            },
        )
        self.advance_later(new_run_id)
        return True

    def expire_lease(self, step_key: str, attempt: int, error: Mapping[str, Any]) -> str | None:
        """The attempt's lease ran out: its step's new state (pending or failed), or None if it
        finished or was renewed meanwhile."""
        row = (
            self._named()
            .execute(
                q.EXPIRE_LEASE,
                {
                    "run_id": self.run.run_id,
                    "step_key": step_key,
                    "attempt": attempt,
                    "error": Jsonb(dict(error)),
                    "undoing": self.run.state != RunState.RUNNING,
                },
            )
            .fetchone()
        )
        if row is not None and self.run.gated:
            self.release_gates(step_key)
        return None if row is None else str(row["state"])

    # -- after commit -------------------------------------------------------------------------

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
                idempotency_key=idempotency_key(run.run_id, row.step_key, run.key_prefix),
            )


Advance = Callable[[RunTransaction], None]
