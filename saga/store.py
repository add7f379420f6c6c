"""The Postgres seam: runs and the step journal. psycopg errors become ``StoreError`` here.

Every outcome of a step (its result or error, the run's state change, and the outbox rows it
causes) commits in one transaction that takes the run's row lock first.
"""

from __future__ import annotations

import contextlib
import datetime as dt
import json
import time
from collections.abc import Callable, Iterator, Mapping, Sequence
from dataclasses import dataclass
from typing import Any, TypeVar

import psycopg
from psycopg.rows import dict_row
from psycopg.types.json import Jsonb
from psycopg_pool import ConnectionPool

from outbox.message import OutboxMessage
from outbox.writer import add_messages, mark_published
from saga import queries as q
from saga.errors import RunConflictError, RunNotFoundError, StoreError, WaitTimeoutError

FINAL_RUN_STATES = frozenset(
    {"completed", "compensated", "failed", "compensation_failed", "cancelled"}
)

T = TypeVar("T")


@dataclass(frozen=True)
class NewStep:
    """A step to schedule: its journal row, created together with its dispatch message."""

    step_key: str
    step_name: str
    max_attempts: int
    idempotency_key: str
    input_json: str
    kind: str = "action"


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
    run_input: Any
    saga_ref: str
    saga_name: str
    trace_context: dict[str, str]


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


@contextlib.contextmanager
def _translated(action: str) -> Iterator[None]:
    try:
        yield
    except psycopg.Error as exc:
        raise StoreError(f"Postgres failed while {action}: {exc}") from exc


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


class PostgresStore:
    def __init__(self, pool: ConnectionPool, *, dispatch_timeout: float) -> None:
        self._pool = pool
        self._dispatch_timeout = dispatch_timeout

    def close(self) -> None:
        self._pool.close()

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
        first_steps: Sequence[NewStep],
        messages: Sequence[OutboxMessage],
    ) -> bool:
        """Create a run with its first steps and their messages; False if the id exists already
        for the same saga and input (the call is idempotent), RunConflictError if not."""
        with _translated(f"creating run {run_id!r}"), self._pool.connection() as conn:
            with conn.transaction():
                conn.execute("SET LOCAL synchronous_commit TO on")
                created = conn.execute(
                    q.INSERT_RUN,
                    {
                        "run_id": run_id,
                        "saga_name": saga_name,
                        "saga_ref": saga_ref,
                        "saga_version": saga_version,
                        "input": input_json,
                        "trace_context": Jsonb(dict(trace_context)),
                    },
                ).fetchone()
                if created:
                    with conn.cursor() as cur:
                        for s in first_steps:
                            self._insert_step(cur, run_id, s)
                        add_messages(cur, messages)
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

    def claim_step(self, run_id: str, step_key: str, *, owner: str, lease: float) -> Claim | None:
        """Take one attempt of the step, or None if it is not claimable (already running,
        completed, failed, its run has ended, or it does not exist)."""
        with (
            _translated(f"claiming step {step_key!r} of run {run_id!r}"),
            self._pool.connection() as conn,
        ):
            row = conn.execute(
                q.CLAIM_STEP,
                {"run_id": run_id, "step_key": step_key, "owner": owner, "lease": lease},
            ).fetchone()
        if row is None:
            return None
        attempt, name, kind, max_attempts, key, input_, run_input, ref, saga_name, trace = row
        return Claim(
            run_id,
            step_key,
            name,
            kind,
            attempt,
            max_attempts,
            key,
            input_,
            run_input,
            ref,
            saga_name,
            trace or {},
        )

    def step_state(self, run_id: str, step_key: str) -> tuple[str, int, str] | None:
        """(step state, attempt, run state), for explaining why a claim was refused."""
        with _translated("reading a step's state"), self._pool.connection() as conn:
            row = conn.execute(q.SELECT_STEP_STATE, (run_id, step_key)).fetchone()
        return None if row is None else (row[0], row[1], row[2])

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
        *,
        next_steps: Sequence[NewStep],
        messages: Sequence[OutboxMessage],
        run_result_json: str | None,
        fast_path_delay: float,
    ) -> list[int]:
        """Journal the step's result with what it causes, in one transaction.

        Schedules ``next_steps`` with their ``messages`` (left to the caller's fast path for
        ``fast_path_delay`` seconds), or completes the run with ``run_result_json``. Returns the
        outbox row ids. Raises Fenced when the attempt lost its lease or the run moved on.
        """

        def body(conn: psycopg.Connection[Any]) -> list[int]:
            with conn.cursor() as cur:
                ok = cur.execute(
                    q.COMPLETE_STEP,
                    {
                        "run_id": claim.run_id,
                        "step_key": claim.step_key,
                        "attempt": claim.attempt,
                        "result": result_json,
                    },
                ).fetchone()
                if not ok:
                    raise Fenced
                for s in next_steps:
                    self._insert_step(cur, claim.run_id, s)
                ids = add_messages(cur, messages, delay_seconds=fast_path_delay)
                if run_result_json is not None:
                    self._finish_run(cur, claim.run_id, "completed", result=run_result_json)
            return ids

        return self._outcome(claim, "journaling the result of", body)

    def fail_attempt(
        self, claim: Claim, error: Mapping[str, Any], *, retry_in: float | None
    ) -> None:
        """Record a failed attempt: retried after ``retry_in`` seconds, or (None) failed for
        good, which fails the run in the same transaction."""

        def body(conn: psycopg.Connection[Any]) -> None:
            with conn.cursor() as cur:
                ok = cur.execute(
                    q.FAIL_ATTEMPT,
                    {
                        "run_id": claim.run_id,
                        "step_key": claim.step_key,
                        "attempt": claim.attempt,
                        "retry": retry_in is not None,
                        "delay": retry_in or 0.0,
                        "error": Jsonb(dict(error)),
                    },
                ).fetchone()
                if not ok:
                    raise Fenced
                if retry_in is None:
                    self._finish_run(cur, claim.run_id, "failed", error=error)

        self._outcome(claim, "journaling a failure of", body)

    def _outcome(
        self, claim: Claim, action: str, body: Callable[[psycopg.Connection[Any]], T]
    ) -> T:
        with (
            _translated(f"{action} step {claim.step_key!r} of run {claim.run_id!r}"),
            self._pool.connection() as conn,
            conn.transaction(),
        ):
            conn.execute("SET LOCAL synchronous_commit TO on")
            run = conn.execute(q.LOCK_RUN, (claim.run_id,)).fetchone()
            expected = "running" if claim.kind == "action" else "compensating"
            if run is None or run[0] != expected:
                raise Fenced
            return body(conn)

    def mark_published(self, ids: Sequence[int]) -> None:
        with _translated("marking outbox rows published"), self._pool.connection() as conn:
            mark_published(conn, ids)

    # -- recovery -----------------------------------------------------------------------------

    def expire_leases(self, limit: int = 100) -> list[tuple[str, str, str]]:
        """Attempts whose worker died: back to pending (retried now) or failed when out of
        attempts, which fails the run. Returns (run_id, step_key, new state) for each."""
        expired: list[tuple[str, str, str]] = []
        with _translated("expiring leases"), self._pool.connection() as conn:
            for run_id, step_key, attempt in conn.execute(
                q.SELECT_EXPIRED_LEASES, (limit,)
            ).fetchall():
                error = {
                    "type": "LeaseExpired",
                    "attempt": attempt,
                    "retryable": True,
                    "message": f"attempt {attempt} of step {step_key!r} lost its worker "
                    f"(lease expired)",
                }
                with conn.transaction(), conn.cursor() as cur:
                    conn.execute("SET LOCAL synchronous_commit TO on")
                    cur.execute(q.LOCK_RUN, (run_id,))
                    row = cur.execute(
                        q.EXPIRE_LEASE,
                        {
                            "run_id": run_id,
                            "step_key": step_key,
                            "attempt": attempt,
                            "error": Jsonb(error),
                        },
                    ).fetchone()
                    if row is None:
                        continue  # finished or renewed meanwhile
                    if row[0] == "failed":
                        self._finish_run(cur, run_id, "failed", error=error)
                    expired.append((run_id, step_key, row[0]))
        return expired

    def redispatch_due(
        self,
        make_message: Callable[[str, str, Mapping[str, str]], OutboxMessage],
        limit: int = 500,
    ) -> int:
        """Dispatch steps whose time has come (retries, lost messages); returns how many."""
        with (
            _translated("dispatching due steps"),
            self._pool.connection() as conn,
            conn.transaction(),
            conn.cursor() as cur,
        ):
            conn.execute("SET LOCAL synchronous_commit TO on")
            rows = cur.execute(
                q.REDISPATCH_DUE, {"limit": limit, "dispatch_timeout": self._dispatch_timeout}
            ).fetchall()
            add_messages(cur, [make_message(r, k, t or {}) for r, k, t in rows])
            return len(rows)

    def seconds_until_next_due(self) -> float | None:
        with _translated("reading the next due step"), self._pool.connection() as conn:
            row = conn.execute(q.NEXT_DUE).fetchone()
        return None if row is None or row[0] is None else max(0.0, float(row[0]))

    def trace_context(self, run_id: str) -> tuple[str, dict[str, str]] | None:
        """(saga name, trace context) of a run, for tracing a change made without a claim."""
        with _translated(f"reading run {run_id!r}"), self._pool.connection() as conn:
            row = conn.execute(q.SELECT_TRACE_CONTEXT, (run_id,)).fetchone()
        return None if row is None else (row[0], row[1] or {})

    # -- helpers ------------------------------------------------------------------------------

    def _insert_step(self, cur: psycopg.Cursor[Any], run_id: str, s: NewStep) -> None:
        cur.execute(
            q.INSERT_STEP,
            {
                "run_id": run_id,
                "step_key": s.step_key,
                "step_name": s.step_name,
                "kind": s.kind,
                "max_attempts": s.max_attempts,
                "idempotency_key": s.idempotency_key,
                "input": s.input_json,
                "dispatch_timeout": self._dispatch_timeout,
            },
        )

    @staticmethod
    def _finish_run(
        cur: psycopg.Cursor[Any],
        run_id: str,
        state: str,
        *,
        result: str | None = None,
        error: Mapping[str, Any] | None = None,
    ) -> None:
        cur.execute(
            q.FINISH_RUN,
            {
                "run_id": run_id,
                "state": state,
                "result": result,
                "error": None if error is None else Jsonb(dict(error)),
                "from_states": ["running"],
            },
        )
        if state != "running":
            cur.execute(q.CANCEL_OPEN_STEPS, (run_id,))
