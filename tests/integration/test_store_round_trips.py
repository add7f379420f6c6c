"""The step hot path's cost in protocol messages, read from libpq's own trace: how many times
the client waits on the server (a Sync or a Flush) and how many statements it sends (Bind) per
claim and per outcome transaction. A change that adds a round trip or a statement to the hot
path (reading a run transition's result in pipeline mode, say) fails here. The figures are those
of the store before its split into records, run transaction and store, which changed none."""

from __future__ import annotations

import re
import tempfile
from collections.abc import Callable, Iterator
from typing import Any, TypeVar

import pytest
from psycopg_pool import ConnectionPool

from saga import coordinator
from saga.definition import Saga, StepContext, step
from saga.records import Claim
from saga.store import PostgresStore, open_pool

T = TypeVar("T")


def noop(ctx: StepContext, value: Any) -> Any:
    raise AssertionError("never called: the test decides each outcome")


def undo(ctx: StepContext, value: Any) -> Any:
    raise AssertionError("never called")


chain = Saga(
    "round_trips",
    [step(noop, name="a", compensate=undo), step(noop, name="b"), step(noop, name="c")],
)


def advance(tx: Any) -> None:
    coordinator.advance(tx, lambda _ref: chain)


@pytest.fixture
def pool(database_url: str) -> Iterator[ConnectionPool]:
    pool = open_pool(database_url, size=1, name="saga-round-trips")  # one connection: traced
    try:
        yield pool
    finally:
        pool.close()


def traced(pool: ConnectionPool, call: Callable[[], T]) -> tuple[T, dict[str, int]]:
    """``call()``'s result, and the messages the client sent meanwhile, by type."""
    with tempfile.TemporaryFile("w+") as trace:
        with pool.connection() as conn:
            conn.pgconn.trace(trace.fileno())
        try:
            result = call()
        finally:
            with pool.connection() as conn:
                conn.pgconn.untrace()
        trace.seek(0)
        text = trace.read()
    sent = {m: len(re.findall(rf"\tF\t\d+\t{m}\b", text)) for m in ("Sync", "Flush", "Bind")}
    return result, sent


def assert_sent(sent: dict[str, int], expected: dict[str, int], what: object = "") -> None:
    """Syncs and statements exactly; Flushes at most: the client flushes when it needs a result
    that has not arrived yet, and a result that came in with an earlier one needs none (on a
    loaded machine the server's answers sometimes arrive together)."""
    assert (sent["Sync"], sent["Bind"]) == (expected["Sync"], expected["Bind"]), (what, sent)
    assert sent["Flush"] <= expected["Flush"], (what, sent)


def test_claim_and_outcome_round_trips(pool: ConnectionPool) -> None:
    store = PostgresStore(pool, queue="round-trips", dispatch_timeout=30.0)
    store.create_run(
        run_id="r1",
        saga_name=chain.name,
        saga_ref="tests:round_trips",
        saga_version=chain.version_tag,
        input_json="1",
        trace_context={},
        timeout=None,
        start=advance,
    )

    def claim(key: str) -> Claim:
        # One statement, committed synchronously (the claim must survive a crash).
        got, sent = traced(pool, lambda: store.claim_step("r1", key, owner="w", lease=30.0))
        assert_sent(sent, {"Sync": 1, "Flush": 0, "Bind": 1}, key)
        assert got is not None
        return got

    a = claim("a")
    # Lock and fence in one round trip; the next step, its outbox row and the commit in another.
    _, sent = traced(pool, lambda: store.complete_step(a, '"x"', advance, fast_path=False))
    assert_sent(sent, {"Sync": 1, "Flush": 2, "Bind": 7})
    b = claim("b")
    # A worker's fast path publishes the next step's message itself: no outbox row.
    _, sent = traced(pool, lambda: store.complete_step(b, '"x"', advance, fast_path=True))
    assert_sent(sent, {"Sync": 1, "Flush": 2, "Bind": 6})
    c = claim("c")
    # Failed for good: the journal is read, compensation begins (a guarded run transition,
    # whose check costs nothing), open steps are cancelled, the compensation is scheduled with
    # the undone step's input read for its ctx.undo (a wait of its own, on this path only).
    # Open steps are cancelled and the journal read again before deciding: a claim taken in
    # between must not be missed (one more wait, on this path only). The run's history gets a
    # compensation_begun row: one statement more, sent without waiting for it.
    _, sent = traced(
        pool, lambda: store.fail_attempt(c, {"type": "E"}, retry_in=None, advance=advance)
    )
    assert_sent(sent, {"Sync": 1, "Flush": 6, "Bind": 15})
    undo_a = claim("compensate:a")
    # The last compensation: the run finishes (FINISH_RUN, guarded in SQL) in the same trips.
    _, sent = traced(pool, lambda: store.complete_step(undo_a, "null", advance, fast_path=False))
    assert_sent(sent, {"Sync": 1, "Flush": 3, "Bind": 8})
    assert store.get_run("r1").state == "compensated"


def test_a_retried_failure_keeps_its_attempt_without_a_statement_more(
    pool: ConnectionPool,
) -> None:
    """The run's history (saga_attempts, 0006) is written by FAIL_ATTEMPT itself: a retried
    attempt costs what it did before the history existed (lock and fence, then the commit)."""
    store = PostgresStore(pool, queue="round-trips", dispatch_timeout=30.0)
    store.create_run(
        run_id="r2",
        saga_name=chain.name,
        saga_ref="tests:round_trips",
        saga_version=chain.version_tag,
        input_json="1",
        trace_context={},
        timeout=None,
        start=advance,
    )
    a = store.claim_step("r2", "a", owner="w", lease=30.0)
    assert a is not None
    _, sent = traced(
        pool, lambda: store.fail_attempt(a, {"type": "E"}, retry_in=5.0, advance=advance)
    )
    assert_sent(sent, {"Sync": 1, "Flush": 2, "Bind": 5})  # BEGIN, SET LOCAL, lock, fence, COMMIT
    assert [(k.step_key, k.attempt, k.outcome) for k in store.kept_attempts("r2")] == [
        ("a", 1, "failed")
    ]
