"""The Postgres seam: runs, the step journal and events, as ``PostgresStore``.

Every change to a run happens in one transaction that takes the run's row lock first
(``saga.run_transaction``): a step's outcome (its result or error), what the coordinator decides
from it (next steps, the run's state change) and the outbox rows it causes commit together, or
not at all. Records it returns are in ``saga.records``; its SQL is in ``saga.queries``.
"""

from __future__ import annotations

import contextlib
import datetime as dt
import json
import time
import uuid
from collections.abc import Callable, Iterator, Mapping, Sequence
from typing import TYPE_CHECKING, Any, LiteralString

import psycopg
from psycopg.rows import class_row, dict_row
from psycopg.types.json import Jsonb
from psycopg_pool import ConnectionPool

from saga import queries as q
from saga.coordinator import JournalRow, RunView
from saga.errors import (
    LimitReachedError,
    RunConflictError,
    RunNotFoundError,
    WaitTimeoutError,
)
from saga.failures import ErrorType, attempt_outcome, error_record
from saga.limits import gates_of, reported_units
from saga.messages import advance_message, step_message
from saga.outbox.message import OutboxMessage
from saga.outbox.writer import add_messages

# Re-exported (``X as X``): callers written before the records had a module import them here.
from saga.records import Claim as Claim
from saga.records import Fenced as Fenced
from saga.records import GatedClaim, KeptAttempt, RunEventRecord, StepSnapshot
from saga.records import OperatorError as OperatorError
from saga.records import RunRecord as RunRecord
from saga.records import StepRecord as StepRecord
from saga.run_transaction import (
    Advance,
    JournalCache,
    RunTransaction,
    Wait,
    journal_cursor,
    lock_run,
    pipelined_transaction,
    translated,
)
from saga.states import RunEventType, RunState, StepKind, StepState, may_journal_outcome


def pool_options(size: int, name: str) -> dict[str, Any]:
    """A pool of autocommit connections that commit synchronously, as Postgres does by default
    (the same for the sync pool and the async client's).

    A claim must be on disk before its step runs: a claim lost in a crash would hide an attempt
    that started, whose effect a compensating run must undo. Lease renewals and publish marks
    could do without the fsync, but they are few (a renewal every third of a lease, marks ride
    on the next claim); step outcomes say so themselves (``SET LOCAL synchronous_commit``)."""
    return {
        "min_size": 1,
        "max_size": max(1, size),
        # Said explicitly: a database or role set to commit asynchronously must not make claims
        # so.
        "kwargs": {
            "autocommit": True,
            "application_name": name,
            "options": "-c synchronous_commit=on",
        },
        "name": name,
    }


def open_pool(database_url: str, *, size: int, name: str = "saga") -> ConnectionPool:
    return ConnectionPool(database_url, open=True, **pool_options(size, name))


def listen_for(run: RunRecord, deadline: float | None, timeout: float | None) -> float | None:
    """For a wait on ``run`` (as just read): None if it has finished, else how long to listen
    for its end before reading it again (at least every few seconds, in case a NOTIFY was
    missed while reconnecting); WaitTimeoutError once ``deadline`` (monotonic) has passed."""
    if run.finished:
        return None
    remaining = None if deadline is None else deadline - time.monotonic()
    if remaining is not None and remaining <= 0:
        raise WaitTimeoutError(
            f"run {run.run_id!r} is still {run.state} after {timeout} s; it keeps running "
            f"(`saga show {run.run_id}` shows where it is)"
        )
    return 5.0 if remaining is None else min(5.0, remaining)


class PostgresStore:
    def __init__(
        self, pool: ConnectionPool, *, queue: str, dispatch_timeout: float, key_prefix: str = ""
    ) -> None:
        self._pool = pool
        self._queue = queue
        self._key_prefix = key_prefix  # for the runs this process creates (start, fork)
        self._dispatch_timeout = dispatch_timeout
        self._journals = JournalCache()

    def close(self) -> None:
        self._pool.close()

    @contextlib.contextmanager
    def _locked_run(self, run_id: str, action: str) -> Iterator[RunTransaction]:
        """A transaction holding the run's lock; commits its outbox messages with it."""
        with (
            translated(action),
            self._pool.connection() as conn,
            pipelined_transaction(conn) as cur,
        ):
            run = lock_run(conn, run_id).fetchone()
            if run is None:
                raise RunNotFoundError(f"no run has id {run_id!r}")
            tx = RunTransaction(
                cur,
                run,
                self._queue,
                self._dispatch_timeout,
                self._journals,
                key_prefix=self._key_prefix,
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
        fast_path: list[OutboxMessage] | None = None,
        priority: int = 0,
        run_gate: Mapping[str, Any] | None = None,
        replaced: list[str] | None = None,
    ) -> bool:
        """Create a run and let ``start`` schedule its first steps, in one transaction. False
        if the id exists already for the same saga and input (idempotent), RunConflictError if
        it exists otherwise. Given ``fast_path``, the messages go in that list for the caller
        to publish after the commit instead of outbox rows (see ``_outcome``). ``run_gate``:
        its definition limits its runs (saga.limits); with on_limit 'refuse' a run over the
        limit raises LimitReachedError and is not made, with 'cancel_oldest' the runs it
        replaces go in ``replaced`` (the caller cancels them)."""
        with translated(f"creating run {run_id!r}"), self._pool.connection() as conn:
            with pipelined_transaction(conn) as cur:
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
                        "key_prefix": self._key_prefix,
                        "priority": priority,
                        "run_gate": None if run_gate is None else run_gate["gate"],
                    },
                ).fetchone()
                if (
                    created
                    and run_gate is not None
                    and run_gate.get("on_limit", "queue") != "queue"
                ):
                    over = self._runs_over_limit(cur, run_id, run_gate)
                    if over and run_gate["on_limit"] == "refuse":
                        raise LimitReachedError(
                            f"run {run_id!r} refused: {run_gate['gate']!r} already has "
                            f"{run_gate['limit']} active run(s) (Concurrency on_limit='refuse'); "
                            f"start it again once one has finished"
                        )
                    if replaced is not None:
                        replaced.extend(over)
                if created:
                    run = RunView(
                        run_id=run_id,
                        state=RunState.RUNNING,
                        saga_name=saga_name,
                        saga_ref=saga_ref,
                        saga_version=saga_version,
                        input=json.loads(input_json),
                        error=None,
                        trace_context=trace_context,
                        queue=self._queue,
                        key_prefix=self._key_prefix,
                    )
                    tx = RunTransaction(cur, run, self._queue, self._dispatch_timeout)
                    start(tx)
                    if fast_path is None:
                        add_messages(cur, tx.messages)
                    else:
                        fast_path.extend(tx.messages)
                    created_tx = tx
            if created:
                created_tx.committed()
                return True
            cur = conn.cursor(row_factory=dict_row)
            row = cur.execute(q.SELECT_RUN_IDENTITY, (run_id,)).fetchone()
        assert row is not None
        if row["saga_name"] != saga_name or row["input"] != json.loads(input_json):
            raise RunConflictError(
                f"run id {run_id!r} is taken by a run of saga {row['saga_name']!r} with another "
                f"input; "
                f"choose a new run id, or pass the same saga and input to get the existing run"
            )
        return False

    @staticmethod
    def _runs_over_limit(
        cur: psycopg.Cursor[Any], run_id: str, run_gate: Mapping[str, Any]
    ) -> list[str]:
        """The oldest active runs of the gate beyond what leaves room for ``run_id``."""
        cur.execute(q.LOCK_GATE, (run_gate["gate"],))
        others = [
            r[0]
            for r in cur.execute(
                q.ACTIVE_RUNS_OF_GATE, {"gate": run_gate["gate"], "run_id": run_id}
            ).fetchall()
        ]
        return others[: max(0, len(others) - int(run_gate["limit"]) + 1)]

    def get_run(self, run_id: str) -> RunRecord:
        with translated(f"reading run {run_id!r}"), self._pool.connection() as conn:
            return self._read_run(conn, run_id)

    @staticmethod
    def _read_run(conn: psycopg.Connection[Any], run_id: str) -> RunRecord:
        row = conn.cursor(row_factory=class_row(RunRecord)).execute(q.SELECT_RUN, (run_id,))
        run = row.fetchone()
        if run is None:
            raise RunNotFoundError(f"no run has id {run_id!r}")
        return run

    def get_steps(self, run_id: str) -> list[StepRecord]:
        with translated(f"reading the steps of run {run_id!r}"), self._pool.connection() as conn:
            cur = conn.cursor(row_factory=class_row(StepRecord))
            return cur.execute(q.SELECT_STEPS, (run_id,)).fetchall()

    def run_events(self, run_id: str) -> list[RunEventRecord]:
        """The run's recorded events (saga_run_events), oldest first."""
        with translated(f"reading events of run {run_id!r}"), self._pool.connection() as conn:
            cur = conn.cursor(row_factory=class_row(RunEventRecord))
            return cur.execute(q.SELECT_RUN_EVENT_RECORDS, (run_id,)).fetchall()

    def kept_attempts(self, run_id: str) -> list[KeptAttempt]:
        """The attempts kept in saga_attempts (those that did not end their step)."""
        with translated(f"reading attempts of run {run_id!r}"), self._pool.connection() as conn:
            cur = conn.cursor(row_factory=class_row(KeptAttempt))
            return cur.execute(q.SELECT_KEPT_ATTEMPTS, (run_id,)).fetchall()

    def completed_results(self, run_id: str) -> dict[str, Any]:
        with translated(f"reading results of run {run_id!r}"), self._pool.connection() as conn:
            rows = conn.cursor(row_factory=dict_row).execute(q.SELECT_RESULTS, (run_id,))
            return {r["step_key"]: r["result"] for r in rows.fetchall()}

    def wait_for_run(self, run_id: str, timeout: float | None) -> RunRecord:
        """Block until the run reaches a final state (LISTEN/NOTIFY, no polling loop), on one
        pooled connection: it listens, and reads the run."""
        deadline = None if timeout is None else time.monotonic() + timeout
        with translated(f"waiting for run {run_id!r}"), self._pool.connection() as conn:
            conn.execute(q.LISTEN_RUN_FINISHED)
            try:
                while True:
                    run = self._read_run(conn, run_id)
                    wait = listen_for(run, deadline, timeout)
                    if wait is None:
                        return run
                    for notify in conn.notifies(timeout=wait):
                        if notify.payload == run_id:
                            break
            finally:
                with contextlib.suppress(psycopg.Error):  # a broken one leaves the pool anyway
                    conn.execute(q.UNLISTEN_RUN_FINISHED)  # back to the pool not listening

    # -- steps --------------------------------------------------------------------------------

    def claim_step(
        self,
        run_id: str,
        step_key: str,
        *,
        owner: str,
        lease: float,
    ) -> Claim | None:
        """Take one attempt of the step, or None if it is not claimable (already running,
        completed, failed, its run has ended, or it does not exist)."""
        params = {"run_id": run_id, "step_key": step_key, "owner": owner, "lease": lease}
        with (
            translated(f"claiming step {step_key!r} of run {run_id!r}"),
            self._pool.connection() as conn,
        ):
            # Committed synchronously (the pool's connections do): the claim is on disk before
            # the step runs.
            cur = conn.cursor(row_factory=class_row(Claim))
            return cur.execute(q.CLAIM_STEP, params).fetchone()

    def claim_gated_step(
        self, run_id: str, step_key: str, *, owner: str, lease: float
    ) -> GatedClaim | None:
        """Claim a step with limits (saga.limits): take its gates in order, under its row
        lock, then claim it; a gate that refuses puts it in line ('throttled', in Postgres:
        the gate's hand-over dispatches it again). None if the step is not claimable or has no
        limits (``claim_step`` decides those)."""
        key = {"run_id": run_id, "step_key": step_key, "owner": owner}
        with (
            translated(f"claiming step {step_key!r} of run {run_id!r}"),
            self._pool.connection() as conn,
            conn.transaction(),
        ):
            cur = conn.cursor(row_factory=dict_row)
            row = cur.execute(q.LOCK_GATED_STEP, key).fetchone()
            if row is None:
                return None
            waited: list[tuple[dict[str, Any], dt.datetime]] = []
            # A claim retried by the delivery whose reply was lost took its gates already:
            # taken again, a rate limit's budget would be booked twice (and refused, the step
            # put in line while it runs, left to its lease).
            for gate in [] if row["claimed"] else gates_of({"gates": row["gates"]}):
                took = cur.execute(
                    q.TAKE_GATE,
                    {
                        "gate": gate["gate"],
                        "kind": gate["kind"],
                        "limit": gate["limit"],
                        "period": gate.get("period"),
                        "units": gate.get("units", 1),
                        "run_id": run_id,
                        "step_key": step_key,
                        "run_level": bool(gate.get("run")),
                        "priority": row["priority"],
                        "fair": gate.get("fair", ""),
                        "ready_at": row["ready_at"],
                    },
                ).fetchone()
                assert took is not None
                if not took["taken"]:
                    cur.execute(q.THROTTLE_STEP, key)
                    return GatedClaim(None, gate, waited)
                if took["waited_since"] is not None:
                    waited.append((gate, took["waited_since"]))
            claim = (
                conn.cursor(row_factory=class_row(Claim))
                .execute(q.CLAIM_GATED_STEP, {**key, "lease": lease})
                .fetchone()
            )
            return GatedClaim(claim, None, waited)

    def pause_gates(self, options: Mapping[str, Any], seconds: float) -> list[str]:
        """A provider asked everyone to wait (429, Retry-After): the step's rate gates grant
        nothing for ``seconds``. Returns the gates paused."""
        rates = [g for g in gates_of(options) if g["kind"] == "rate"]
        with translated("pausing a rate limit"), self._pool.connection() as conn:
            for gate in rates:
                with conn.transaction():
                    conn.execute(
                        q.PAUSE_GATE,
                        {
                            "gate": gate["gate"],
                            "kind": "rate",
                            "limit": gate["limit"],
                            "period": gate["period"],
                            "seconds": seconds,
                        },
                    )
        return [g["gate"] for g in rates]

    def wake_gates(self, limit: int = 100) -> int:
        """Hand the gates whose time has come to their waiters (a rate gate's budget freed;
        a concurrency gate's periodic check, which heals a missed hand-over); the steps
        dispatched get outbox rows in the same transaction. Returns how many."""
        with translated("waking gates"), self._pool.connection() as conn:
            gates = [r[0] for r in conn.execute(q.DUE_GATES, (limit,)).fetchall()]
            woken = 0
            for gate in gates:
                with conn.transaction(), conn.cursor(row_factory=dict_row) as cur:
                    cur.execute(q.LOCK_GATE, (gate,))
                    rows = cur.execute(
                        q.GRANT_GATE, {"gate": gate, "dispatch_timeout": self._dispatch_timeout}
                    ).fetchall()
                    add_messages(
                        cur,
                        [
                            step_message(
                                r["queue"] or self._queue,
                                r["run_id"],
                                r["step_key"],
                                r["trace_context"],
                            )
                            for r in rows
                        ],
                    )
                    woken += len(rows)
        return woken

    def step_state(self, run_id: str, step_key: str) -> StepSnapshot | None:
        """The step and its run as they are, for explaining why a claim was refused."""
        with translated("reading a step's state"), self._pool.connection() as conn:
            cur = conn.cursor(row_factory=class_row(StepSnapshot))
            return cur.execute(q.SELECT_STEP_SNAPSHOT, (run_id, step_key)).fetchone()

    def renew_lease(self, claim: Claim, lease: float) -> bool:
        with translated("renewing a lease"), self._pool.connection() as conn:
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
        fast_path: bool,
        read_journal: bool = False,
        usage: Mapping[str, int] | None = None,
    ) -> list[OutboxMessage]:
        """Journal the step's result and what the coordinator decides from it, in one
        transaction; returns the messages it caused. With ``fast_path`` the caller publishes
        them itself after the commit, and they get no outbox rows (see ``_outcome``). Raises
        Fenced when the attempt lost its lease or the run moved on. ``read_journal``: the
        coordinator will read the journal (a workflow replays), so the read goes out with the
        run lock, saving a round trip."""

        def outcome(tx: RunTransaction, state: str) -> None:
            tx.completed = JournalRow(
                step_key=claim.step_key,
                step_name=claim.step_name,
                kind=claim.kind,
                state=StepState.COMPLETED,
                position=None,
                result=json.loads(result_json),
                error=None,
                completed_seq=None,
                compensation_ref=None,
                options=claim.options,
                attempt=claim.attempt,
                result_json=result_json,
            )
            if claim.kind == StepKind.TIMER:  # a durable sleep, over
                tx.wait_over(Wait("sleep", claim.step_key, claim.step_name, claim.scheduled_at))
            for gate, units in reported_units(claim.options, usage or {}):
                tx.correct_rate_grant(claim.step_key, gate, units)
            advance(tx)

        return self._outcome(
            claim,
            "journaling the result of",
            q.COMPLETE_STEP,
            {"result": result_json},
            outcome,
            fast_path,
            read_journal,
        )

    def fail_attempt(
        self,
        claim: Claim,
        error: Mapping[str, Any],
        *,
        retry_in: float | None,
        advance: Advance,
        fast_path: bool = False,
        read_journal: bool = False,
    ) -> list[OutboxMessage]:
        """Record a failed attempt: retried after ``retry_in`` seconds, or (None) failed for
        good, which the coordinator acts on in the same transaction."""

        def outcome(tx: RunTransaction, state: str) -> None:
            if claim.kind == StepKind.EVENT:  # dispatched only when the wait timed out
                waited = (claim.step_key, claim.step_name, claim.scheduled_at)
                tx.wait_over(Wait("event", *waited, error_type=str(error.get("type"))))
            if state == StepState.FAILED:
                advance(tx)

        return self._outcome(
            claim,
            "journaling a failure of",
            q.FAIL_ATTEMPT,
            {
                "retry": retry_in is not None,
                "delay": retry_in or 0.0,
                "error": Jsonb({**error, "retryable": retry_in is not None}),
                "outcome": attempt_outcome(str(error.get("type", ""))),
            },
            outcome,
            fast_path,
            read_journal and retry_in is None,
        )

    def _outcome(
        self,
        claim: Claim,
        action: str,
        fence_query: LiteralString,
        fence_params: dict[str, Any],
        body: Callable[[RunTransaction, str], None],
        fast_path: bool,
        read_journal: bool,
    ) -> list[OutboxMessage]:
        """The outcome transaction, pipelined: the run lock and the fenced step update go in
        one round trip, what the coordinator writes and the commit in another.

        Every message a run transaction causes is backed by a journal row committed with it: a
        dispatched step's ``due_at``, a run's ``advance_due_at``; the sweeper sends again what
        is not claimed by then. So a fast path (the worker publishing right after commit) needs
        no outbox row: the row would only be written, marked published and deleted, three row
        versions and a third of a step's WAL, for the rare publish that fails (which
        ``relay_later`` then hands to the relay) or a worker dying between commit and publish
        (the dispatched steps of the queues it read are sent again after a lease, any other
        after the dispatch timeout)."""
        where = f"{action} step {claim.step_key!r} of run {claim.run_id!r}"
        key = {"run_id": claim.run_id, "step_key": claim.step_key, "attempt": claim.attempt}
        try:
            with (
                translated(where),
                self._pool.connection() as conn,
                pipelined_transaction(conn) as run_cur,
                conn.cursor(row_factory=dict_row) as step_cur,
            ):
                lock_cur = lock_run(conn, claim.run_id)
                step_cur.execute(fence_query, {**key, **fence_params})
                prefetched = None
                if read_journal:  # after the lock and the fence, in the same round trip
                    seen = self._journals.seen(claim.run_id)
                    journal_cur = journal_cursor(conn)
                    journal_cur.execute(q.SELECT_JOURNAL, {"run_id": claim.run_id, "seen": seen})
                    prefetched = (seen, journal_cur)
                run, fenced = lock_cur.fetchone(), step_cur.fetchone()
                if run is None or fenced is None:
                    raise Fenced
                if not may_journal_outcome(claim.kind, run.state):
                    raise Fenced
                tx = RunTransaction(
                    run_cur,
                    run,
                    self._queue,
                    self._dispatch_timeout,
                    self._journals,
                    prefetched,
                )
                body(tx, fenced["state"])
                # Its slots go to the next in line, in this commit. After the coordinator: rows
                # are locked before gates in every transaction (a claim locks its step, then takes
                # gates), so a cancel of a step being claimed cannot deadlock with this.
                if "gates" in claim.options:
                    tx.release_gates(claim.step_key)
                if not fast_path:
                    add_messages(run_cur, tx.messages)
            tx.committed()
            return tx.messages
        except Fenced:
            if "gates" in claim.options:
                # If its run ended while it ran, the attempt is over though its outcome is not
                # journaled: its lease ends now (END_LEASE checks the run), so the sweeper
                # ends the step and hands its slots on at its next pass, not a lease later.
                with translated(where), self._pool.connection() as conn:
                    conn.execute(q.END_LEASE, key)
            raise

    def advance_run(self, run_id: str, advance: Advance) -> None:
        """Advance a run outside any step outcome (an advance task)."""
        with self._locked_run(run_id, f"advancing run {run_id!r}") as tx:
            tx.advancing()
            advance(tx)

    def messages_owed_now(self, run_id: str) -> None:
        """Make the run's owed messages due now (its dispatched steps, an advance it is owed),
        for the sweeper to send: a commit whose reply was lost left them unpublished. Any that
        did go out are duplicates, which the claim fences."""
        with translated("making a run's messages due"), self._pool.connection() as conn:
            conn.execute(q.MESSAGES_OWED_NOW, {"run_id": run_id})

    def relay_later(self, messages: Sequence[OutboxMessage]) -> None:
        """Outbox rows for messages a fast path could not publish: the relay sends them now."""
        with (
            translated("handing messages to the relay"),
            self._pool.connection() as conn,
            conn.transaction(),
            conn.cursor() as cur,
        ):
            add_messages(cur, messages)

    # -- events and operators -----------------------------------------------------------------

    # Each operator action is recorded in the run's history (saga_run_events) with ``actor``
    # (who and where from), in the action's own transaction.

    def send_event(self, run_id: str, name: str, payload: Any, *, actor: str | None = None) -> bool:
        """Deliver an event: it completes the step waiting for it (True), or is kept until the
        run waits for it (False)."""
        with self._locked_run(run_id, f"sending event {name!r} to run {run_id!r}") as tx:
            if tx.run.state != RunState.RUNNING:
                raise OperatorError(f"run {run_id!r} is {tx.run.state}; it takes no events")
            delivered = tx.deliver_event(name, payload)
            if delivered:
                tx.advance_later()
            detail = {"name": name, "delivered": delivered}
            tx.log_run_event(RunEventType.SEND_EVENT, actor=actor, detail=detail)
            return delivered

    def stop_run(
        self,
        run_id: str,
        stop: Advance,
        *,
        actor: str | None = None,
        event: RunEventType = RunEventType.CANCEL,
        detail: Mapping[str, Any] | None = None,
    ) -> None:
        with self._locked_run(run_id, f"stopping run {run_id!r}") as tx:
            if tx.run.state != RunState.RUNNING:
                raise OperatorError(
                    f"run {run_id!r} is {tx.run.state}; only a running run can be cancelled"
                )
            tx.log_run_event(event, actor=actor, detail=detail)
            stop(tx)

    def retry_run(self, run_id: str, *, actor: str | None = None) -> None:
        """Operator retry: a failed run resumes at its failed steps (or replays, after a code
        fix); a run whose compensation failed retries that compensation."""
        with self._locked_run(run_id, f"retrying run {run_id!r}") as tx:
            kinds: tuple[StepKind, ...]
            if tx.run.state == RunState.FAILED:
                kinds, state = (StepKind.ACTION, StepKind.TIMER, StepKind.EVENT), RunState.RUNNING
            elif tx.run.state == RunState.COMPENSATION_FAILED:
                kinds, state = (StepKind.COMPENSATION,), RunState.COMPENSATING
            else:
                raise OperatorError(
                    f"run {run_id!r} is {tx.run.state}; only failed or "
                    f"compensation_failed runs can be retried"
                )
            tx.log_run_event(RunEventType.RETRY, actor=actor, detail={"from_state": tx.run.state})
            tx.reopen(state, kinds)
            tx.advance_later()

    def fork_run(
        self,
        run_id: str,
        step_key: str,
        *,
        saga_version: str,
        new_run_id: str | None = None,
        actor: str | None = None,
    ) -> str:
        """A new run with this run's completed steps before ``step_key`` copied; that step and
        everything after it run again."""
        new_id = new_run_id or uuid.uuid4().hex
        with self._locked_run(run_id, f"forking run {run_id!r}") as tx:
            if not tx.fork(step_key, new_id, saga_version):
                raise OperatorError(
                    f"run {run_id!r} has no step {step_key!r} to fork from "
                    f"(`saga show {run_id}` lists its step keys)"
                )
            detail = {"step_key": step_key, "new_run_id": new_id}
            tx.log_run_event(RunEventType.FORK, actor=actor, detail=detail)
            detail = {"step_key": step_key, "run_id": run_id}
            tx.log_run_event(RunEventType.FORKED_FROM, actor=actor, detail=detail, run_id=new_id)
        return new_id

    # -- recovery -----------------------------------------------------------------------------

    def expire_leases(
        self, limit: int = 100, *, all_open: bool = False
    ) -> list[tuple[str, str, str]]:
        """Attempts whose worker died: back to pending (retried now), or failed when out of
        attempts, and then a worker advances the run. Returns (run_id, step_key, new state).

        A running step is looked for among the steps dispatched within this process's dispatch
        timeout (SELECT_EXPIRED_LEASES); ``all_open`` looks at every open step, for a step
        dispatched by a process whose timeout is longer."""
        expired: list[tuple[str, str, str]] = []
        with translated("reading expired leases"), self._pool.connection() as conn:
            cur = conn.cursor(row_factory=dict_row)
            rows = cur.execute(
                q.SELECT_EXPIRED_LEASES,
                {"limit": limit, "horizon": None if all_open else self._dispatch_timeout},
            ).fetchall()
        for r in rows:
            run_id, step_key, attempt = r["run_id"], r["step_key"], r["attempt"]
            error = error_record(
                ErrorType.LEASE_EXPIRED,
                f"attempt {attempt} of step {step_key!r} lost its worker (lease expired)",
                attempt=attempt,
            )
            with self._locked_run(run_id, "expiring a lease") as tx:
                state = tx.expire_lease(step_key, attempt, error)
                if state is None:
                    continue  # finished or renewed meanwhile
                if state == StepState.FAILED:
                    tx.advance_later()
                expired.append((run_id, step_key, state))
        return expired

    def overdue_runs(self, limit: int = 100) -> list[str]:
        with translated("reading overdue runs"), self._pool.connection() as conn:
            rows = conn.cursor(row_factory=dict_row).execute(q.SELECT_OVERDUE_RUNS, (limit,))
            return [r["run_id"] for r in rows.fetchall()]

    def redispatch_due(self, limit: int = 500) -> int:
        """Dispatch steps whose time has come (retries, timers, timed-out waits, lost
        messages), and advance tasks owed for longer than the dispatch timeout (lost with the
        broker, perhaps); returns how many messages."""
        with (
            translated("dispatching due steps"),
            self._pool.connection() as conn,
            pipelined_transaction(conn) as cur,
        ):
            due = conn.cursor(row_factory=dict_row).execute(
                q.REDISPATCH_DUE, {"limit": limit, "dispatch_timeout": self._dispatch_timeout}
            )
            rows = due.fetchall()
            owed = conn.cursor(row_factory=dict_row).execute(
                q.REDISPATCH_ADVANCES,
                {"limit": limit, "dispatch_timeout": self._dispatch_timeout},
            )
            advances = owed.fetchall()
            messages = [
                step_message(
                    r["queue"] or self._queue, r["run_id"], r["step_key"], r["trace_context"]
                )
                for r in rows
            ] + [
                advance_message(r["queue"] or self._queue, r["run_id"], r["trace_context"])
                for r in advances
            ]
            add_messages(cur, messages)
            return len(messages)

    # -- the worker registry ------------------------------------------------------------------

    def worker_heartbeat(self, owner: str, queues: Sequence[str], silence: float) -> None:
        """A worker process taking messages from ``queues`` is alive (registered at its first
        beat); silent for ``silence`` seconds, it is dead."""
        with translated("recording a worker's heartbeat"), self._pool.connection() as conn:
            conn.execute(
                q.WORKER_HEARTBEAT, {"owner": owner, "queues": list(queues), "silence": silence}
            )

    def deregister_worker(self, owner: str) -> None:
        """A worker process stops cleanly: it holds no message any more."""
        with translated("deregistering a worker"), self._pool.connection() as conn:
            conn.execute(q.DEREGISTER_WORKER, (owner,))

    def recover_dead_workers(self) -> list[str]:
        """Workers silent for longer than they said they would be are dead: removed, and the
        unclaimed steps of their queues made due now (one may be a message a dead worker took).
        Returns their owners."""
        with (
            translated("recovering from dead workers"),
            self._pool.connection() as conn,
            conn.transaction(),
        ):
            dead = conn.execute(q.REMOVE_DEAD_WORKERS).fetchall()
            queues = sorted({queue for _, qs in dead for queue in qs})
            if queues:
                conn.execute(q.RECOVER_UNCLAIMED, {"queues": queues, "default_queue": self._queue})
        return [owner for owner, _ in dead]

    def trace_context(self, run_id: str) -> tuple[str, dict[str, str]] | None:
        """(saga name, trace context) of a run, for tracing a change made without a claim."""
        with translated(f"reading run {run_id!r}"), self._pool.connection() as conn:
            cur = conn.cursor(row_factory=dict_row)
            row = cur.execute(q.SELECT_TRACE_CONTEXT, (run_id,)).fetchone()
        return None if row is None else (row["saga_name"], row["trace_context"])

    def seconds_until_next_due(self) -> float | None:
        with translated("reading the next due step"), self._pool.connection() as conn:
            row = conn.cursor(row_factory=dict_row).execute(q.NEXT_DUE).fetchone()
        if row is None or row["seconds"] is None:
            return None
        return max(0.0, float(row["seconds"]))


if TYPE_CHECKING:  # mypy checks here that PostgresStore is a store_protocol.Store
    from saga.store_protocol import Store

    def _is_a_store(store: PostgresStore) -> Store:
        return store
