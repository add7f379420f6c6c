"""saga.runs_view on a real journal: filters, keyset pages, capped counts, a run's whole story,
and the limits a throttled step waits for (taken and refused by the store's real gates)."""

from __future__ import annotations

import datetime as dt
import json
import urllib.request
from collections.abc import Iterator
from typing import Any

import psycopg
import pytest
from psycopg.types.json import Jsonb

from saga import Settings, coordinator
from saga.dashboard.server import DashboardServer
from saga.definition import Saga, StepContext, step
from saga.errors import InputError
from saga.limits import RateLimit
from saga.records import GatedClaim
from saga.run_text import show_lines
from saga.runs_view import Page, RunFilter, RunsView, StepView, throttled_by
from saga.store import PostgresStore, open_pool
from saga_dev import limit_sagas

Conn = psycopg.Connection[tuple[object, ...]]
T0 = dt.datetime(2026, 1, 1, tzinfo=dt.UTC)
TRACEPARENT = "00-0af7651916cd43dd8448eb211c80319c-b7ad6b7169203331-01"


def add_run(db: Conn, run_id: str, *, minutes: int, state: str = "completed", **extra: Any) -> None:
    created = T0 + dt.timedelta(minutes=minutes)
    finished = None if state in ("running", "compensating") else created + dt.timedelta(seconds=30)
    db.execute(
        "INSERT INTO saga_runs (run_id, saga_name, saga_ref, saga_version, state, input, error, "
        "trace_context, created_at, updated_at, finished_at) "
        "VALUES (%s, %s, 'm:s', '1', %s, '{}', %s, %s, %s, %s, %s)",
        (
            run_id,
            extra.get("saga", "trip"),
            state,
            Jsonb(extra["error"]) if "error" in extra else None,
            Jsonb({"traceparent": TRACEPARENT}),
            created,
            created,
            finished,
        ),
    )


@pytest.fixture
def view(database_url: str) -> Iterator[RunsView]:
    with RunsView(database_url) as v:
        yield v


@pytest.fixture
def runs(db: Conn) -> list[str]:
    """30 runs a minute apart: every third failed with a TypeError, every fifth of saga
    'other', the last two running."""
    ids = []
    for i in range(30):
        state = "failed" if i % 3 == 0 else "completed"
        if i >= 28:
            state = "running"
        extra: dict[str, Any] = {"saga": "other" if i % 5 == 0 else "trip"}
        if state == "failed":
            extra["error"] = {"type": "builtins.TypeError", "message": f"bad {i}"}
        run_id = f"{'ab' if i < 10 else 'cd'}-{i:03d}"
        add_run(db, run_id, minutes=i, state=state, **extra)
        ids.append(run_id)
    return ids


def all_pages(view: RunsView, flt: RunFilter, **kw: Any) -> list[str]:
    seen: list[str] = []
    page: Page = view.list_runs(flt, **kw)
    while True:
        seen += [r.run_id for r in page.runs]
        if page.next_cursor is None:
            return seen
        page = view.list_runs(flt, cursor=page.next_cursor, **kw)


def test_keyset_pages_cover_every_run_once_in_order(view: RunsView, runs: list[str]) -> None:
    assert all_pages(view, RunFilter(), limit=7) == runs[::-1]
    assert all_pages(view, RunFilter(), limit=7, newest_first=False) == runs
    last = view.list_runs(RunFilter(), limit=30)
    assert last.next_cursor is None and len(last.runs) == 30


def test_filters(view: RunsView, runs: list[str]) -> None:
    def ids(**kw: Any) -> list[str]:
        return all_pages(view, RunFilter(**kw), limit=4, newest_first=False)

    failed = [r for i, r in enumerate(runs) if i % 3 == 0 and i < 28]
    assert ids(states=("failed",)) == failed
    assert ids(states=("running", "failed")) == sorted(failed + runs[28:])
    assert ids(saga="other") == runs[::5]
    assert ids(error_type="builtins.TypeError") == failed
    assert ids(error_type="nope") == []
    assert ids(run_id_prefix="ab-") == runs[:10]
    assert ids(run_id_prefix="ab_") == []  # "_" is no wildcard
    assert ids(created_since=T0 + dt.timedelta(minutes=25)) == runs[25:]
    assert ids(created_until=T0 + dt.timedelta(minutes=2)) == runs[:2]
    finished_by = T0 + dt.timedelta(minutes=3)  # runs 0..2 finished 30 s after they started
    assert ids(finished_until=finished_by) == runs[:3]
    assert ids(finished_since=T0 + dt.timedelta(minutes=27)) == runs[27:28]
    assert ids(states=("failed",), saga="other") == [r for r in failed if r in runs[::5]]


def test_rows_carry_the_error(view: RunsView, runs: list[str]) -> None:
    row = view.list_runs(RunFilter(run_id_prefix="ab-000")).runs[0]
    assert (row.state, row.error_type, row.error_message) == (
        "failed",
        "builtins.TypeError",
        "bad 0",
    )
    assert json.loads(json.dumps(row.to_json()))["run_id"] == "ab-000"


def test_counts_by_state_and_their_cap(view: RunsView, runs: list[str]) -> None:
    counts = view.count_by_state(RunFilter())
    assert counts["completed"] == 18 and counts["failed"] == 10 and counts["running"] == 2
    assert counts["cancelled"] == 0 and len(counts) == 7
    assert view.count_by_state(RunFilter(saga="other"))["failed"] == 2
    assert view.count_by_state(RunFilter(states=("failed",))) == {"failed": 10}
    assert view.count_by_state(RunFilter(), cap=5)["completed"] == 5


def test_bad_input_is_refused(view: RunsView) -> None:
    with pytest.raises(InputError, match="cursor"):
        view.list_runs(RunFilter(), cursor="not-a-cursor")
    with pytest.raises(InputError, match="unknown run state 'done'"):
        view.list_runs(RunFilter(states=("done",)))
    with pytest.raises(InputError, match="limit"):
        view.list_runs(RunFilter(), limit=0)


def test_a_missing_run_has_no_detail(view: RunsView) -> None:
    assert view.run_detail("nope") is None


def test_run_detail_merges_attempts_and_names_compensations(view: RunsView, db: Conn) -> None:
    add_run(db, "r1", minutes=0, state="compensated", error={"type": "X", "message": "m"})
    step = (
        "INSERT INTO saga_steps (run_id, step_key, step_name, kind, seq, state, attempt, "
        "max_attempts, idempotency_key, input, result, error, lease_owner, attempt_started_at, "
        "finished_at, due_at) VALUES ('r1', %s, %s, %s, %s, %s, %s, 3, %s, %s, %s, %s, %s, "
        "now(), now(), %s)"
    )
    failed = {"type": "builtins.ValueError", "message": "boom", "traceback": "Traceback..."}
    db.execute(
        step,
        (
            "book",
            "book",
            "action",
            1,
            "failed",
            3,
            "r1:book",
            Jsonb({"city": "Lisbon"}),
            None,
            Jsonb(failed),
            "h:2:b",
            T0,
        ),
    )
    db.execute(
        step,
        (
            "compensate:book",
            "cancel",
            "compensation",
            2,
            "completed",
            1,
            "r1:compensate:book",
            None,
            Jsonb("undone"),
            None,
            "h:3:b",
            T0,
        ),
    )
    db.execute(
        step,
        (
            "approval#3",
            "approval",
            "event",
            3,
            "waiting",
            0,
            "r1:approval#3",
            None,
            None,
            None,
            None,
            dt.datetime.max.replace(tzinfo=dt.UTC),
        ),
    )
    db.execute("UPDATE saga_steps SET due_at = 'infinity' WHERE step_key = 'approval#3'")
    db.execute(
        "INSERT INTO saga_attempts (run_id, step_key, attempt, worker, claimed_at, outcome, "
        "error_type, error_message) VALUES ('r1', 'book', 1, 'h:1:b', now(), 'failed', "
        "'builtins.ValueError', 'first'), ('r1', 'book', 2, 'h:1:b', now(), 'lost', "
        "'LeaseExpired', 'lost its worker')"
    )
    db.execute(
        "INSERT INTO saga_run_events (run_id, event, actor, detail) "
        "VALUES ('r1', 'cancel', 'ann@box', '{\"reason\": \"test\"}')"
    )
    detail = view.run_detail("r1")
    assert detail is not None
    assert detail.trace_id == "0af7651916cd43dd8448eb211c80319c"
    book, undo, approval = detail.steps
    assert [(a.attempt, a.outcome, a.worker) for a in book.attempts] == [
        (1, "failed", "h:1:b"),
        (2, "lost", "h:1:b"),
        (3, "failed", "h:2:b"),
    ]
    assert book.attempts[2].traceback == "Traceback..." and book.input == {"city": "Lisbon"}
    assert undo.compensation_of == "book" and book.compensation_of is None
    assert [a.outcome for a in undo.attempts] == ["completed"]
    assert approval.attempts == [] and approval.due_at is None
    assert [(w.kind, w.name, w.due_at) for w in detail.waits] == [("event", "approval", None)]
    recorded = [(e.event, e.actor) for e in detail.events if e.recorded]
    assert recorded == [("cancel", "ann@box")]
    assert {e.event for e in detail.events} >= {"started", "finished", "wait_begun", "cancel"}
    plain = json.loads(json.dumps(detail.to_json()))
    assert plain["steps"][0]["attempts"][1]["outcome"] == "lost"
    assert detail.usage is None


def test_a_finished_window_lists_by_finish_time_and_a_prefix_by_run_id(
    view: RunsView, db: Conn
) -> None:
    add_run(db, "z-early", minutes=0)
    add_run(db, "a-late", minutes=1)
    finished = T0 + dt.timedelta(minutes=10)  # created first, finished last
    db.execute("UPDATE saga_runs SET finished_at = %s WHERE run_id = 'z-early'", (finished,))
    window = RunFilter(finished_since=T0)
    assert [r.run_id for r in view.list_runs(window).runs] == ["z-early", "a-late"]
    assert [r.run_id for r in view.list_runs(RunFilter()).runs] == ["a-late", "z-early"]
    assert all_pages(view, window, limit=1, newest_first=False) == ["a-late", "z-early"]

    for i, run_id in enumerate(["p-b", "p-a", "p-c"]):
        add_run(db, run_id, minutes=20 + i)
    by_id = RunFilter(run_id_prefix="p-")
    assert all_pages(view, by_id, limit=2) == ["p-c", "p-b", "p-a"]
    assert all_pages(view, by_id, limit=2, newest_first=False) == ["p-a", "p-b", "p-c"]
    cursor = view.list_runs(by_id, limit=1).next_cursor
    with pytest.raises(InputError, match="same filters"):  # a cursor of another order
        view.list_runs(RunFilter(), cursor=cursor)


# -- flow control: throttled steps (saga.limits, migration 0010) ---------------------------------


def _ask(ctx: StepContext, value: Any) -> Any:
    raise AssertionError("never called: the test claims and completes steps itself")


# Two model calls a minute per tenant.
llm = Saga("rv_llm", [step(_ask, rate_limit=RateLimit("llm", 2, per=60, key=lambda r: r["t"]))])


@pytest.fixture
def store(database_url: str) -> Iterator[PostgresStore]:
    s = PostgresStore(open_pool(database_url, size=2, name="rv"), queue="q", dispatch_timeout=30)
    yield s
    s.close()


def _start(store: PostgresStore, definition: Saga, run_id: str, priority: int = 0) -> None:
    store.create_run(
        run_id=run_id,
        saga_name=definition.name,
        saga_ref=f"tests:{definition.name}",
        saga_version=definition.version_tag,
        input_json=json.dumps({"t": "acme", "tenant": "acme"}),
        trace_context={},
        timeout=None,
        start=lambda tx: coordinator.advance(tx, lambda _ref: definition),
        priority=priority,
    )


def _claim(store: PostgresStore, run_id: str, step_key: str) -> GatedClaim:
    got = store.claim_gated_step(run_id, step_key, owner=f"h:{run_id}:b", lease=30.0)
    assert got is not None
    return got


def test_a_throttled_step_shows_the_limit_it_waits_for_and_its_place_in_line(
    view: RunsView, store: PostgresStore
) -> None:
    one = limit_sagas.one_at_a_time  # Concurrency(1, name="single") on its only step
    for run_id, priority in (("first", 0), ("batch", 0), ("urgent", 5)):
        _start(store, one, run_id, priority)
    first = _claim(store, "first", "call_service").claim
    assert first is not None
    for run_id in ("batch", "urgent"):  # the slot is taken: both wait in line, in Postgres
        refused = _claim(store, run_id, "call_service")
        assert refused.claim is None and refused.throttled_by is not None

    def step_of(run_id: str) -> StepView:
        detail = view.run_detail(run_id)
        assert detail is not None
        [s] = detail.steps
        return s

    running = step_of("first")
    assert running.state == "running"
    [held] = running.limits
    assert (held.gate, held.kind, held.name, held.key, held.limit) == (
        "c:single:",
        "concurrency",
        "single",
        "",
        1,
    )
    assert (held.status, held.in_use, held.place) == ("held", 1, None)
    # Priority first: the urgent run's step is next in line, though it came last.
    for run_id, place in (("urgent", 1), ("batch", 2)):
        s = step_of(run_id)
        assert s.state == "throttled" and s.due_at is None
        [limit] = s.limits
        assert (limit.status, limit.place, limit.in_line, limit.in_use) == ("waiting", place, 2, 1)
        assert limit.since is not None and throttled_by(s) == limit
    detail = view.run_detail("batch")
    assert detail is not None
    assert [(w.kind, w.step_key, w.name) for w in detail.waits] == [
        ("limit", "call_service", "c:single:")
    ]
    assert detail.waits[0].since == detail.steps[0].limits[0].since
    plain = json.loads(json.dumps(detail.to_json()))
    assert plain["steps"][0]["state"] == "throttled"
    assert plain["steps"][0]["limits"][0]["status"] == "waiting"
    text = "\n".join(show_lines(detail, trace_link=None, tracebacks=False))
    assert "call_service" in text and " throttled " in text
    assert "limit  concurrency 'single': 1/1 in use; throttled, 2 of 2 in line since" in text
    assert "  limit 'c:single:' (step call_service) since" in text

    # Run lists and counts go by run state: the runs are running, their steps throttled.
    assert {r.run_id for r in view.list_runs(RunFilter(states=("running",))).runs} == {
        "first",
        "batch",
        "urgent",
    }
    assert view.count_by_state(RunFilter())["running"] == 3
    with pytest.raises(InputError, match="unknown run state 'throttled'"):
        view.list_runs(RunFilter(states=("throttled",)))

    # The slot given back goes to the head of the line, in the outcome's commit.
    store.complete_step(first, "null", lambda tx: None, fast_path=False)
    handed = step_of("urgent")
    assert handed.state == "dispatched" and handed.limits[0].status == "held"
    waiting = step_of("batch").limits[0]
    assert (waiting.status, waiting.place, waiting.in_line) == ("waiting", 1, 1)


def test_a_rate_limited_step_shows_its_units_the_window_and_a_pause(
    view: RunsView, store: PostgresStore, db: Conn
) -> None:
    for run_id in ("r1", "r2", "r3"):
        _start(store, llm, run_id)
    for run_id in ("r1", "r2"):
        assert _claim(store, run_id, "_ask").claim is not None
    assert _claim(store, "r3", "_ask").claim is None  # 2 a minute: the third waits
    # A provider's 429 with Retry-After pauses the limit for everyone (as the worker does it).
    row = db.execute("SELECT options FROM saga_steps WHERE run_id = 'r3'").fetchone()
    assert row is not None and isinstance(row[0], dict)
    assert store.pause_gates(row[0], 120) == ["r:llm:acme"]

    detail = view.run_detail("r3")
    assert detail is not None
    [limit] = detail.steps[0].limits
    assert (limit.kind, limit.name, limit.key, limit.limit, limit.period, limit.units) == (
        "rate",
        "llm",
        "acme",
        2,
        60.0,
        1,
    )
    assert (limit.status, limit.place, limit.in_line, limit.in_use) == ("waiting", 1, 1, 2)
    assert limit.paused_until is not None and limit.paused_until > dt.datetime.now(dt.UTC)
    [wait] = detail.waits
    assert (wait.kind, wait.name, wait.due_at) == ("limit", "r:llm:acme", limit.paused_until)
    text = "\n".join(show_lines(detail, trace_link=None, tracebacks=False))
    assert (
        "limit  rate limit 'llm' key 'acme': 1 of 2 units per 60 s, 2 granted in the window; "
        "throttled, 1 of 1 in line since"
    ) in text
    assert "(the service asked)" in text
    # Rate budget is spent, not held: a running step has no slot at its rate limit.
    running = view.run_detail("r1")
    assert running is not None and running.steps[0].limits[0].status is None


def test_the_dashboard_shows_a_throttled_step_and_its_place_in_line(
    settings: Settings, store: PostgresStore
) -> None:
    one = limit_sagas.one_at_a_time
    for run_id in ("holder", "waiter"):
        _start(store, one, run_id)
    assert _claim(store, "holder", "call_service").claim is not None
    assert _claim(store, "waiter", "call_service").claim is None
    with DashboardServer(settings, port=0, read_only=True) as server:
        server.start()
        with urllib.request.urlopen(f"{server.url}/runs/waiter?refresh=0", timeout=30) as r:
            page = r.read().decode()
        with urllib.request.urlopen(f"{server.url}/api/runs/waiter", timeout=30) as r:
            api = json.load(r)
        with urllib.request.urlopen(f"{server.url}/?state=running&refresh=0", timeout=30) as r:
            listing = r.read().decode()
    assert 'data-step="call_service" data-kind="action" data-state="throttled"' in page
    assert '<tr data-gate="c:single:" data-status="waiting">' in page
    assert "<td>1 of 1</td>" in page and "throttled step in line" in page
    assert api["steps"][0]["state"] == "throttled"
    assert api["steps"][0]["limits"][0]["place"] == 1
    assert 'data-run-id="holder"' in listing and 'data-run-id="waiter"' in listing
