"""Read-only queries for operators: find runs (filters, keyset pages, counts per state) and read
one run's whole story (steps, every attempt, compensations, run events, waits, model usage, and
the limits its steps wait for or hold).

``saga list`` / ``saga show`` and the web dashboard are built on ``RunsView``. Its connections
are read-only sessions: nothing here can change a run. A step's attempts are the rows of
``saga_attempts`` (attempts that did not end the step: failed and retried, lost with their
worker, superseded by an operator's retry) plus the step row's latest attempt (migration 0006).
"""

from __future__ import annotations

import base64
import binascii
import datetime as dt
import json
from collections.abc import Mapping, Sequence
from dataclasses import asdict, dataclass, field, fields
from typing import Any

from psycopg.rows import dict_row
from psycopg_pool import ConnectionPool

from saga import queries as q
from saga.errors import InputError
from saga.failures import attempt_outcome
from saga.keys import COMPENSATION_PREFIX
from saga.limits import gates_of
from saga.run_transaction import translated
from saga.states import AttemptOutcome, GateKind, GateSlotState, RunState, StepKind, StepState

COUNT_CAP = 10_000  # count_by_state stops counting a state here: that count means "or more"
MAX_PAGE = 1_000
COMPLETION = "saga.completion"  # how saga.agent.llm marks a journaled completion


@dataclass(frozen=True)
class RunFilter:
    """Which runs to list; every field left empty matches all. Times: created_since <=
    created_at < created_until (finished likewise)."""

    states: tuple[str, ...] = ()
    saga: str | None = None
    created_since: dt.datetime | None = None
    created_until: dt.datetime | None = None
    finished_since: dt.datetime | None = None
    finished_until: dt.datetime | None = None
    error_type: str | None = None
    run_id_prefix: str | None = None

    def params(self) -> dict[str, Any]:
        unknown = set(self.states) - set(RunState)
        if unknown:
            raise InputError(
                f"unknown run state {sorted(unknown)[0]!r}: use one of {', '.join(RunState)}"
            )
        prefix = self.run_id_prefix
        return {
            "states": list(self.states),
            "saga": self.saga,
            "created_since": self.created_since,
            "created_until": self.created_until,
            "finished_since": self.finished_since,
            "finished_until": self.finished_until,
            "error_type": self.error_type,
            "run_id_like": None if not prefix else _like_prefix(prefix),
        }


def _like_prefix(prefix: str) -> str:
    escaped = prefix.replace("\\", "\\\\").replace("%", "\\%").replace("_", "\\_")
    return escaped + "%"


@dataclass(frozen=True)
class RunRow:
    run_id: str
    saga: str
    state: str
    created_at: dt.datetime
    updated_at: dt.datetime
    finished_at: dt.datetime | None
    error_type: str | None
    error_message: str | None

    def to_json(self) -> dict[str, Any]:
        return _plain_dict(asdict(self))


@dataclass(frozen=True)
class Page:
    runs: list[RunRow]
    next_cursor: str | None  # opaque; None when this is the last page


@dataclass(frozen=True)
class AttemptView:
    """One attempt of a step. outcome: running | completed | failed | timed_out | lost |
    unknown (an attempt journaled before history was kept)."""

    attempt: int
    worker: str | None
    claimed_at: dt.datetime | None
    finished_at: dt.datetime | None
    outcome: str
    error_type: str | None = None
    message: str | None = None
    traceback: str | None = None


@dataclass(frozen=True)
class LimitView:
    """A limit a step declared (``saga.limits``), as its journal row names it (its *gate*), with
    where the step, or its run, stands at it now (``saga_gate_slots``, migration 0010).

    status: ``held`` (a concurrency slot is the step's, or for a run-level limit the run's),
    ``waiting`` (in line: the step is throttled), ``offered`` (rate budget freed for it: it was
    dispatched to take it), or None (not taken now: the step has not been claimed yet, has given
    its slot back, or took rate budget, which is spent rather than held). place: where it
    stands in line (priority, then age; the grant also goes round-robin between fairness keys).
    in_use: slots held, or units granted in the current window, by everyone."""

    gate: str  # "c:<name>:<key>" (concurrency) or "r:<name>:<key>" (rate)
    kind: str  # concurrency | rate
    name: str
    key: str
    limit: int
    period: float | None = None  # rate limits: the window, in seconds
    units: int | None = None  # rate limits: what the step takes of the window
    run_level: bool = False  # the run's own limit (Saga / workflow concurrency=)
    status: str | None = None
    since: dt.datetime | None = None  # when it took the slot, or joined the line
    place: int | None = None
    in_line: int | None = None
    in_use: int | None = None
    paused_until: dt.datetime | None = None  # a rate limit a service's 429 paused


@dataclass(frozen=True)
class StepView:
    step_key: str
    name: str
    kind: str  # action | compensation | timer | event
    seq: int
    position: int | None
    state: str
    compensation_of: str | None  # for a compensation: the key of the step it undoes
    input: Any
    result: Any
    error: Any
    idempotency_key: str
    max_attempts: int
    due_at: dt.datetime | None  # an open step's next dispatch (a retry, a timer, a wait's timeout)
    created_at: dt.datetime
    started_at: dt.datetime | None
    finished_at: dt.datetime | None
    attempts: list[AttemptView] = field(default_factory=list)
    limits: list[LimitView] = field(default_factory=list)  # none for a step without limits


@dataclass(frozen=True)
class RunEvent:
    """A run-level event. Recorded ones (compensation_begun, retry, cancel, fork, send_event)
    come from saga_run_events; started, finished, wait_begun and wait_ended are read from the
    run's and its steps' rows (``recorded`` False)."""

    event: str
    at: dt.datetime
    actor: str | None = None
    detail: Any = None
    recorded: bool = True


@dataclass(frozen=True)
class PendingWait:
    """An event wait (due_at: its timeout, None for none), a timer (due_at: when it fires), an
    event sent before the run waited for it (kind "kept_event"), or a throttled step waiting
    in line for a limit (kind "limit", name: its gate; due_at: the end of a service's pause)."""

    kind: str  # event | timer | kept_event | limit
    step_key: str | None
    name: str
    since: dt.datetime
    due_at: dt.datetime | None


@dataclass(frozen=True)
class RunDetail:
    run_id: str
    saga: str
    saga_ref: str
    saga_version: str
    state: str
    input: Any
    result: Any
    error: Any
    queue: str | None
    deadline_at: dt.datetime | None
    created_at: dt.datetime
    updated_at: dt.datetime
    finished_at: dt.datetime | None
    trace_id: str | None  # from the run's W3C traceparent
    steps: list[StepView]
    events: list[RunEvent]
    waits: list[PendingWait]
    usage: dict[str, Any] | None  # saga.agent RunUsage as a dict, for runs with completions

    def to_json(self) -> dict[str, Any]:
        """Plain dicts, lists, strings and numbers (times as ISO 8601): ``json.dumps`` takes it."""
        return _plain_dict(asdict(self))


def _plain_dict(value: Mapping[str, Any]) -> dict[str, Any]:
    return {str(k): _plain(v) for k, v in value.items()}


def _plain(value: Any) -> Any:
    if isinstance(value, dt.datetime):
        return value.isoformat()
    if isinstance(value, Mapping):
        return _plain_dict(value)
    if isinstance(value, list | tuple):
        return [_plain(v) for v in value]
    return value


# -- cursors ------------------------------------------------------------------------------------


def order_of(flt: RunFilter) -> str:
    """Which key a list is in: the run id with a prefix, the finish time with a finished window,
    else the creation time. Each has its index, so a page never scans runs that do not match."""
    if flt.run_id_prefix:
        return "run_id"
    if flt.finished_since or flt.finished_until:
        return "finished"
    return "created"


def _encode_cursor(order: str, row: RunRow) -> str:
    at = {"created": row.created_at, "finished": row.finished_at, "run_id": None}[order]
    raw = json.dumps([order, None if at is None else at.isoformat(), row.run_id]).encode()
    return base64.urlsafe_b64encode(raw).decode().rstrip("=")


def _decode_cursor(cursor: str, order: str) -> tuple[dt.datetime | None, str]:
    try:
        raw = base64.urlsafe_b64decode(cursor + "=" * (-len(cursor) % 4))
        got, at, run_id = json.loads(raw)
        if got != order:
            raise ValueError(f"a cursor of a list by {got} for a list by {order}")
        return (None if at is None else dt.datetime.fromisoformat(at)), str(run_id)
    except (binascii.Error, ValueError, TypeError) as exc:
        raise InputError(
            f"cursor {cursor!r} is not one this list gave: pass the next cursor a page "
            f"printed with the same filters, or none for the first page"
        ) from exc


# -- attempts -------------------------------------------------------------------------------------


def latest_outcome(state: str, error: Any) -> str:
    """The outcome of the attempt a step row holds, from the step's state and error."""
    if state == StepState.RUNNING:
        return AttemptOutcome.RUNNING
    if state == StepState.COMPLETED:
        return AttemptOutcome.COMPLETED
    if isinstance(error, Mapping) and error.get("type"):
        return attempt_outcome(str(error["type"]))
    return AttemptOutcome.UNKNOWN


def merge_attempts(
    step: Mapping[str, Any], recorded: Sequence[Mapping[str, Any]]
) -> list[AttemptView]:
    """The step's attempts in order: those saga_attempts kept, then the row's latest one (unless
    a kept row is that attempt already: a retried step waiting for its next attempt)."""
    views = [
        AttemptView(
            attempt=r["attempt"],
            worker=r["worker"],
            claimed_at=r["claimed_at"],
            finished_at=r["finished_at"],
            outcome=r["outcome"],
            error_type=r["error_type"],
            message=r["error_message"],
            traceback=r["traceback"],
        )
        for r in recorded
    ]
    latest = step["attempt"]
    if latest > 0 and latest not in {v.attempt for v in views}:
        running = step["state"] == StepState.RUNNING
        # A claim leaves the previous attempt's error on the row (the retry's backoff span
        # reads it): it is this attempt's only once the attempt has ended.
        ended = step["state"] in (StepState.COMPLETED, StepState.FAILED, StepState.CANCELLED)
        error = step["error"] if ended and isinstance(step["error"], Mapping) else {}
        views.append(
            AttemptView(
                attempt=latest,
                worker=step["lease_owner"],
                claimed_at=step["attempt_started_at"],
                finished_at=None if running else step["finished_at"],
                outcome=latest_outcome(step["state"], step["error"]),
                error_type=error.get("type"),
                message=error.get("message"),
                traceback=error.get("traceback"),
            )
        )
    return sorted(views, key=lambda v: v.attempt)


def trace_id_of(trace_context: Any) -> str | None:
    """The trace id of a W3C ``traceparent`` (``00-<trace id>-<span id>-<flags>``)."""
    if not isinstance(trace_context, Mapping):
        return None
    parts = str(trace_context.get("traceparent", "")).split("-")
    if len(parts) == 4 and len(parts[1]) == 32 and parts[1] != "0" * 32:
        return parts[1]
    return None


# -- the view -------------------------------------------------------------------------------------


class RunsView:
    """Read-only operator queries over one database. Thread-safe (a connection pool).

    >>> view = RunsView(database_url)                                       # doctest: +SKIP
    >>> page = view.list_runs(RunFilter(states=("failed",)), limit=20)
    >>> view.list_runs(RunFilter(states=("failed",)), limit=20, cursor=page.next_cursor)
    """

    def __init__(self, database_url: str, *, pool_size: int = 2, timeout: float = 30.0) -> None:
        """``timeout``: seconds a query waits for a connection before StoreError."""
        self._pool = ConnectionPool(
            database_url,
            min_size=1,
            max_size=max(1, pool_size),
            timeout=timeout,
            kwargs={
                "autocommit": True,
                "application_name": "saga-runs-view",
                # Read-only sessions; statements planned with their values, never a generic
                # plan (which could not fold the filters left empty).
                "options": "-c default_transaction_read_only=on",
                "prepare_threshold": None,
            },
            name="saga-runs-view",
            open=True,
        )

    def close(self) -> None:
        self._pool.close()

    def __enter__(self) -> RunsView:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def list_runs(
        self,
        flt: RunFilter,
        *,
        newest_first: bool = True,
        limit: int = 50,
        cursor: str | None = None,
    ) -> Page:
        """One page of runs, newest first (or oldest): by creation time; by finish time when
        ``flt`` has a finished window; by run id (descending, or ascending) when it has a run
        id prefix (``order_of``). ``cursor`` is the previous page's ``next_cursor``. A page
        walks the index of its order from the cursor on, whatever the table's size."""
        if not 1 <= limit <= MAX_PAGE:
            raise InputError(f"limit {limit} must be between 1 and {MAX_PAGE}")
        order = order_of(flt)
        after_time, after_id = _decode_cursor(cursor, order) if cursor else (None, None)
        params = {**flt.params(), "after_time": after_time, "after_id": after_id}
        query = q.LIST_RUNS[order, newest_first]
        with translated("listing runs"), self._pool.connection() as conn:
            cur = conn.cursor(row_factory=dict_row)
            rows = cur.execute(query, {**params, "limit": limit + 1}).fetchall()
        runs = [RunRow(**r) for r in rows[:limit]]
        more = len(rows) > limit
        return Page(runs=runs, next_cursor=_encode_cursor(order, runs[-1]) if more else None)

    def count_by_state(self, flt: RunFilter, *, cap: int = COUNT_CAP) -> dict[str, int]:
        """Runs matching ``flt`` per state (every state, zeros included). Each count stops at
        ``cap``: a value equal to ``cap`` means "at least that many". Exact below it."""
        params = {**flt.params(), "cap": cap}
        states = list(flt.states) or [str(s) for s in RunState]
        with translated("counting runs"), self._pool.connection() as conn:
            with conn.pipeline():  # one statement per state, planned for it; one round trip
                curs = [
                    conn.cursor(row_factory=dict_row).execute(
                        q.COUNT_RUNS_IN_STATE, {**params, "state": state}
                    )
                    for state in states
                ]
            return {
                state: int(row["runs"]) if (row := c.fetchone()) else 0
                for state, c in zip(states, curs, strict=True)
            }

    def run_detail(self, run_id: str) -> RunDetail | None:
        """The run's whole story, or None if there is no such run. One round trip."""
        with translated(f"reading run {run_id!r}"), self._pool.connection() as conn:
            with conn.pipeline():
                curs = [
                    conn.cursor(row_factory=dict_row).execute(query, (run_id,))
                    for query in (
                        q.SELECT_RUN_DETAIL,
                        q.SELECT_STEP_DETAILS,
                        q.SELECT_ATTEMPTS,
                        q.SELECT_RUN_EVENTS,
                        q.SELECT_KEPT_EVENTS,
                        q.SELECT_RUN_GATES,
                    )
                ]
            run, steps, attempts, events, kept, gates = (
                curs[0].fetchone(),
                *(c.fetchall() for c in curs[1:]),
            )
        if run is None:
            return None
        return _detail(run, steps, attempts, events, kept, gates)


def _detail(
    run: Mapping[str, Any],
    steps: Sequence[Mapping[str, Any]],
    attempts: Sequence[Mapping[str, Any]],
    events: Sequence[Mapping[str, Any]],
    kept: Sequence[Mapping[str, Any]],
    slots: Sequence[Mapping[str, Any]] = (),
) -> RunDetail:
    by_step: dict[str, list[Mapping[str, Any]]] = {}
    for a in attempts:
        by_step.setdefault(a["step_key"], []).append(a)
    at_gates = {(r["gate"], r["step_key"]): r for r in slots}
    views = [_step_view(s, by_step.get(s["step_key"], []), at_gates) for s in steps]
    return RunDetail(
        run_id=run["run_id"],
        saga=run["saga_name"],
        saga_ref=run["saga_ref"],
        saga_version=run["saga_version"],
        state=run["state"],
        input=run["input"],
        result=run["result"],
        error=run["error"],
        queue=run["queue"],
        deadline_at=run["deadline_at"],
        created_at=run["created_at"],
        updated_at=run["updated_at"],
        finished_at=run["finished_at"],
        trace_id=trace_id_of(run["trace_context"]),
        steps=views,
        events=_timeline(run, views, events),
        waits=_waits(views, kept),
        usage=_usage(views),
    )


def _step_view(
    s: Mapping[str, Any],
    recorded: Sequence[Mapping[str, Any]],
    slots: Mapping[tuple[str, str], Mapping[str, Any]] | None = None,
) -> StepView:
    key = s["step_key"]
    compensation = s["kind"] == StepKind.COMPENSATION and key.startswith(COMPENSATION_PREFIX)
    names = {f.name for f in fields(StepView)} - {"limits"}
    return StepView(
        **{k: v for k, v in s.items() if k in names},
        name=s["step_name"],
        compensation_of=key[len(COMPENSATION_PREFIX) :] if compensation else None,
        attempts=merge_attempts(s, recorded),
        limits=limit_views(key, s.get("gates"), slots or {}),
    )


def limit_views(
    step_key: str, gates: Any, slots: Mapping[tuple[str, str], Mapping[str, Any]]
) -> list[LimitView]:
    """A step's journaled gates (``options["gates"]``), in the order it takes them, each with
    the step's (or for a run-level limit its run's) slot row, if it has one (``slots`` by
    (gate, step key); a run's own slot is held under step key '')."""
    if not isinstance(gates, list):
        return []
    views = []
    for g in gates_of({"gates": [g for g in gates if isinstance(g, Mapping)]}):
        gate = str(g.get("gate", ""))
        _, _, rest = gate.partition(":")
        name, _, key = rest.partition(":")
        run_level = bool(g.get("run"))
        slot = slots.get((gate, step_key))
        if slot is None and run_level:
            slot = slots.get((gate, ""))
        rate = g.get("kind") == GateKind.RATE
        views.append(
            LimitView(
                gate=gate,
                kind=str(g.get("kind", "")),
                name=name,
                key=key,
                limit=int(g.get("limit") or 0),
                period=float(g["period"]) if rate and g.get("period") is not None else None,
                units=int(g.get("units") or 1) if rate else None,
                run_level=run_level,
                status=None if slot is None else str(slot["state"]),
                since=None if slot is None else slot["since"],
                place=None if slot is None else _int(slot["place"]),
                in_line=None if slot is None else _int(slot["in_line"]),
                in_use=None if slot is None else _int(slot["in_use"]),
                paused_until=None if slot is None else slot["paused_until"],
            )
        )
    return views


def _int(value: Any) -> int | None:
    return None if value is None else int(value)


def throttled_by(step: StepView) -> LimitView | None:
    """The limit a throttled step waits for: the gate whose line it is in, else (its place not
    read yet) the first it does not hold."""
    if step.state != StepState.THROTTLED:
        return None
    in_line = [v for v in step.limits if v.status in (GateSlotState.WAITING, GateSlotState.OFFERED)]
    if in_line:
        return in_line[0]
    return next((v for v in step.limits if v.status != GateSlotState.HELD), None)


def _timeline(
    run: Mapping[str, Any], steps: Sequence[StepView], recorded: Sequence[Mapping[str, Any]]
) -> list[RunEvent]:
    """Recorded events with those the rows themselves tell, in time order."""
    told = [RunEvent("started", run["created_at"], recorded=False)]
    for s in steps:
        if s.kind not in (StepKind.EVENT, StepKind.TIMER):
            continue
        detail = {"step_key": s.step_key, "kind": s.kind, "name": s.name}
        told.append(RunEvent("wait_begun", s.created_at, detail=detail, recorded=False))
        if s.finished_at is not None:
            ended = {**detail, "state": s.state}
            told.append(RunEvent("wait_ended", s.finished_at, detail=ended, recorded=False))
    if run["finished_at"] is not None:
        detail = {"state": run["state"]}
        told.append(RunEvent("finished", run["finished_at"], detail=detail, recorded=False))
    events = told + [
        RunEvent(e["event"], e["at"], actor=e["actor"], detail=e["detail"]) for e in recorded
    ]
    return sorted(events, key=lambda e: e.at)


def _waits(steps: Sequence[StepView], kept: Sequence[Mapping[str, Any]]) -> list[PendingWait]:
    waits = []
    for s in steps:
        waiting_event = s.kind == StepKind.EVENT and s.state == StepState.WAITING
        pending_timer = s.kind == StepKind.TIMER and s.state in (
            StepState.PENDING,
            StepState.DISPATCHED,
        )
        if waiting_event or pending_timer:
            waits.append(PendingWait(str(s.kind), s.step_key, s.name, s.created_at, s.due_at))
        limit = throttled_by(s)
        if s.state == StepState.THROTTLED:
            since = (limit.since if limit else None) or s.created_at
            gate = limit.gate if limit else "(a limit)"
            paused = limit.paused_until if limit else None
            waits.append(PendingWait("limit", s.step_key, gate, since, paused))
    for e in kept:
        waits.append(PendingWait("kept_event", None, e["name"], e["created_at"], None))
    return waits


def _usage(steps: Sequence[StepView]) -> dict[str, Any] | None:
    if not any(
        isinstance(s.result, Mapping) and s.result.get("object") == COMPLETION for s in steps
    ):
        return None
    from saga.agent.llm import run_usage  # only for runs with model completions

    return run_usage(steps).model_dump()


__all__ = [
    "COUNT_CAP",
    "AttemptView",
    "LimitView",
    "Page",
    "PendingWait",
    "RunDetail",
    "RunEvent",
    "RunFilter",
    "RunRow",
    "RunsView",
    "StepView",
    "limit_views",
    "merge_attempts",
    "throttled_by",
]
