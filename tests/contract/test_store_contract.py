"""One contract, two stores: every case runs against ``PostgresStore`` on a real database and
against its in-memory twin (``tests.unit.memory_run.MemoryStore``), with the same assertions,
so the twin the coordinator's unit tests rely on cannot drift from the store.

The test plays the workers (it claims steps and decides their outcomes; no step function runs)
and drives time explicitly: a lease runs out or a retry falls due when the case says so (on
Postgres by moving the row's ``lease_expires_at``/``due_at`` into the past, on the twin by the
same on its clock).
"""

from __future__ import annotations

import json
import uuid
from collections.abc import Iterator
from dataclasses import dataclass
from typing import Any, Protocol

import psycopg
import pytest
from psycopg.rows import dict_row

from saga import coordinator
from saga.definition import Saga, StepContext, step
from saga.errors import RunConflictError, RunNotFoundError
from saga.failures import ErrorType, error_record
from saga.messages import ADVANCE_TASK, STEP_TASK
from saga.records import Claim, Fenced, OperatorError, RunTransitionError
from saga.retry import RetryPolicy
from saga.states import RunState, StepKind, StepState
from saga.store import PostgresStore, open_pool
from saga.store_protocol import Store
from saga.workflow import Workflow, WorkflowContext, workflow
from tests.unit.memory_run import MemoryStore

QUEUE = "contract"
LEASE = 30.0


def reserve(ctx: StepContext, value: Any) -> Any:
    raise AssertionError("never called: the test decides each outcome")


def release(ctx: StepContext, value: Any) -> Any:
    raise AssertionError("never called")


def charge(ctx: StepContext, value: Any) -> Any:
    raise AssertionError("never called")


TWICE = RetryPolicy(max_attempts=2, initial_backoff_seconds=1.0, max_backoff_seconds=1.0)
ONCE = RetryPolicy(max_attempts=1)
# reserve (undone by release) -> charge (two attempts).
booking = Saga("contract_booking", [step(reserve, compensate=release), step(charge, retry=TWICE)])
# hold (undone by release) and pay (one attempt) in parallel.
pair = Saga(
    "contract_pair",
    [
        step(reserve, name="hold", compensate=release, after=()),
        step(charge, name="pay", retry=ONCE, after=()),
    ],
)
# charge alone, one attempt, nothing to undo: a failure fails the run.
single = Saga("contract_single", [step(charge, retry=ONCE)])


@workflow("contract_approval")
def approval(ctx: WorkflowContext, value: Any) -> dict[str, Any]:
    held = ctx.step(reserve, value, compensate=release)
    decision = ctx.wait_event("approval")
    return {"held": held, "decision": decision}


@workflow("contract_nap")
def nap(ctx: WorkflowContext, value: Any) -> str:
    ctx.sleep(3600)
    return "rested"


Definition = Saga | Workflow[Any, Any]


class Backend(Protocol):
    store: Store

    def expire_lease(self, run_id: str, step_key: str) -> None: ...
    def fall_due(self, run_id: str, step_key: str) -> None: ...
    def outbox(self, run_id: str) -> list[tuple[str, str | None]]: ...
    def silence(self, owner: str, seconds: float) -> None:
        """Make a worker's last heartbeat ``seconds`` old."""
        ...

    def silence_all(self) -> None:
        """Make every worker's last heartbeat an hour old."""
        ...

    def advance_falls_due(self, run_id: str) -> None:
        """Let the dispatch timeout of the advance owed to the run pass."""
        ...


@dataclass
class PostgresBackend:
    store: PostgresStore
    database_url: str

    def _update(self, sql: str, run_id: str, step_key: str) -> None:
        with psycopg.connect(self.database_url, autocommit=True) as conn:
            assert conn.execute(sql, (run_id, step_key)).rowcount == 1  # type: ignore[arg-type]

    def expire_lease(self, run_id: str, step_key: str) -> None:
        self._update(
            "UPDATE saga_steps SET lease_expires_at = now() - interval '1 second' "
            "WHERE run_id = %s AND step_key = %s AND state = 'running'",
            run_id,
            step_key,
        )

    def fall_due(self, run_id: str, step_key: str) -> None:
        self._update(
            "UPDATE saga_steps SET due_at = now() - interval '1 second' "
            "WHERE run_id = %s AND step_key = %s",
            run_id,
            step_key,
        )

    def advance_falls_due(self, run_id: str) -> None:
        with psycopg.connect(self.database_url, autocommit=True) as conn:
            conn.execute(
                "UPDATE saga_runs SET advance_due_at = now() - interval '1 second' "
                "WHERE run_id = %s AND advance_due_at IS NOT NULL",
                (run_id,),
            )

    def silence(self, owner: str, seconds: float) -> None:
        with psycopg.connect(self.database_url, autocommit=True) as conn:
            conn.execute(
                "UPDATE saga_workers SET seen_at = now() - %s * interval '1 second' "
                "WHERE owner = %s",
                (seconds, owner),
            )

    def silence_all(self) -> None:
        with psycopg.connect(self.database_url, autocommit=True) as conn:
            conn.execute("UPDATE saga_workers SET seen_at = now() - interval '1 hour'")

    def outbox(self, run_id: str) -> list[tuple[str, str | None]]:
        with psycopg.connect(self.database_url, row_factory=dict_row) as conn:
            rows = conn.execute(
                "SELECT task_name, payload FROM saga_outbox WHERE payload->>'run_id' = %s "
                "ORDER BY id",
                (run_id,),
            ).fetchall()
        return [(r["task_name"], r["payload"].get("step_key")) for r in rows]


@dataclass
class MemoryBackend:
    store: MemoryStore

    def expire_lease(self, run_id: str, step_key: str) -> None:
        row = self.store.db.steps[(run_id, step_key)]
        assert row.state == StepState.RUNNING
        row.lease_expires_at = self.store.db.clock - 1.0

    def fall_due(self, run_id: str, step_key: str) -> None:
        self.store.db.steps[(run_id, step_key)].due_at = self.store.db.clock - 1.0

    def advance_falls_due(self, run_id: str) -> None:
        run = self.store.db.runs[run_id]
        if run.advance_due_at is not None:
            run.advance_due_at = self.store.db.clock - 1.0

    def silence(self, owner: str, seconds: float) -> None:
        queues, _, limit = self.store.db.workers[owner]
        self.store.db.workers[owner] = (queues, self.store.db.clock - seconds, limit)

    def silence_all(self) -> None:
        for owner in list(self.store.db.workers):
            self.silence(owner, 3600.0)

    def outbox(self, run_id: str) -> list[tuple[str, str | None]]:
        return [
            (m.task_name, m.payload.get("step_key"))
            for m in self.store.db.outbox
            if m.payload["run_id"] == run_id
        ]


@pytest.fixture(params=["memory", "postgres"])
def backend(request: pytest.FixtureRequest) -> Iterator[Backend]:
    if request.param == "memory":
        yield MemoryBackend(MemoryStore(queue=QUEUE))
        return
    database_url = request.getfixturevalue("database_url")
    store = PostgresStore(
        open_pool(database_url, size=2, name="saga-contract"), queue=QUEUE, dispatch_timeout=30.0
    )
    try:
        yield PostgresBackend(store, database_url)
    finally:
        store.close()


# -- what the workers, the client and the sweeper do --------------------------------------------


def _advance(definition: Definition) -> coordinator.Loader:
    return lambda _ref: definition


def start(b: Backend, definition: Definition, value: Any = None, run_id: str = "") -> str:
    run_id = run_id or f"r-{uuid.uuid4().hex[:12]}"
    b.store.create_run(
        run_id=run_id,
        saga_name=definition.name,
        saga_ref=f"tests.contract:{definition.name}",
        saga_version=definition.version_tag,
        input_json=definition.validate_input(value),
        trace_context={},
        timeout=None,
        start=lambda tx: coordinator.advance(tx, _advance(definition)),
    )
    return run_id


def claim(b: Backend, run_id: str, step_key: str, owner: str = "w1") -> Claim | None:
    return b.store.claim_step(run_id, step_key, owner=owner, lease=LEASE)


def claimed(b: Backend, run_id: str, step_key: str, owner: str = "w1") -> Claim:
    got = claim(b, run_id, step_key, owner)
    assert got is not None, f"{step_key!r} of {run_id!r} was not claimable: {states(b, run_id)}"
    return got


def complete(b: Backend, definition: Definition, c: Claim, value: Any = None) -> list[str]:
    messages = b.store.complete_step(
        c,
        json.dumps(value),
        lambda tx: coordinator.advance(tx, _advance(definition)),
        fast_path_delay=0.0,
    )
    return [m.payload.get("step_key") or m.task_name for m in messages]


def fail(b: Backend, definition: Definition, c: Claim, retry_in: float | None) -> None:
    b.store.fail_attempt(
        c,
        {"type": "Boom", "message": "boom", "attempt": c.attempt},
        retry_in=retry_in,
        advance=lambda tx: coordinator.advance(tx, _advance(definition)),
    )


def advance(b: Backend, definition: Definition, run_id: str) -> None:
    b.store.advance_run(run_id, lambda tx: coordinator.advance(tx, _advance(definition)))


def cancel(b: Backend, run_id: str) -> None:
    error = error_record(ErrorType.CANCELLED, "cancelled by the contract")
    b.store.stop_run(run_id, lambda tx: coordinator.stop(tx, error))


def states(b: Backend, run_id: str) -> dict[str, str]:
    return {s.step_key: s.state for s in b.store.get_steps(run_id)}


def run_state(b: Backend, run_id: str) -> str:
    return b.store.get_run(run_id).state


# -- the cases ----------------------------------------------------------------------------------


def test_a_run_starts_with_its_first_step_dispatched(backend: Backend) -> None:
    run_id = start(backend, booking, {"city": "Lisbon"})
    assert run_state(backend, run_id) == RunState.RUNNING
    assert states(backend, run_id) == {"reserve": StepState.DISPATCHED}
    assert backend.outbox(run_id) == [(STEP_TASK, "reserve")]
    [reserve_row] = backend.store.get_steps(run_id)
    assert (reserve_row.kind, reserve_row.attempt, reserve_row.seq) == (StepKind.ACTION, 0, 1)
    assert reserve_row.idempotency_key == f"{run_id}:reserve"


def test_create_run_is_idempotent_and_refuses_another_input(backend: Backend) -> None:
    run_id = start(backend, booking, {"city": "Lisbon"})
    again = backend.store.create_run(
        run_id=run_id,
        saga_name=booking.name,
        saga_ref="tests.contract:booking",
        saga_version=booking.version_tag,
        input_json=json.dumps({"city": "Lisbon"}),
        trace_context={},
        timeout=None,
        start=lambda tx: pytest.fail("an existing run is not started again"),
    )
    assert again is False
    with pytest.raises(RunConflictError, match=run_id):
        start(backend, booking, {"city": "Porto"}, run_id=run_id)
    assert backend.outbox(run_id) == [(STEP_TASK, "reserve")]


def test_a_claim_fences_other_claims_and_counts_attempts(backend: Backend) -> None:
    run_id = start(backend, booking, 1)
    first = claimed(backend, run_id, "reserve", owner="w1")
    assert (first.attempt, first.kind, first.step_name, first.run_input) == (
        1,
        "action",
        "reserve",
        1,
    )
    assert first.idempotency_key == f"{run_id}:reserve"
    assert claim(backend, run_id, "reserve", owner="w2") is None  # running: not another's
    # The same delivery retrying a claim whose reply it lost gets a new attempt...
    again = claimed(backend, run_id, "reserve", owner="w1")
    assert again.attempt == 2
    # ...and the attempt it replaced can no longer write.
    with pytest.raises(Fenced):
        complete(backend, booking, first, "held")
    assert states(backend, run_id) == {"reserve": StepState.RUNNING}
    assert claim(backend, run_id, "missing") is None
    assert claim(backend, "no-such-run", "reserve") is None


def test_complete_schedules_the_next_step_with_its_message(backend: Backend) -> None:
    run_id = start(backend, booking, 1)
    sent = complete(backend, booking, claimed(backend, run_id, "reserve"), {"ref": "R1"})
    assert sent == ["charge"]
    assert states(backend, run_id) == {
        "reserve": StepState.COMPLETED,
        "charge": StepState.DISPATCHED,
    }
    assert backend.outbox(run_id) == [
        (STEP_TASK, "reserve"),
        (STEP_TASK, "charge"),
    ]
    charged = claimed(backend, run_id, "charge")
    assert charged.input == {"ref": "R1"}  # the previous step's result
    assert charged.max_attempts == 2
    assert complete(backend, booking, charged, "paid") == []
    run = backend.store.get_run(run_id)
    assert (run.state, run.result, run.finished) == (RunState.COMPLETED, "paid", True)


def test_a_completed_step_delivered_again_is_refused(backend: Backend) -> None:
    run_id = start(backend, booking, 1)
    done = claimed(backend, run_id, "reserve")
    complete(backend, booking, done, "held")
    assert claim(backend, run_id, "reserve", owner="w1") is None
    assert claim(backend, run_id, "reserve", owner="w2") is None
    with pytest.raises(Fenced):
        complete(backend, booking, done, "held again")
    [reserve_row] = [s for s in backend.store.get_steps(run_id) if s.step_key == "reserve"]
    assert (reserve_row.state, reserve_row.attempt, reserve_row.result) == ("completed", 1, "held")


def test_a_failed_attempt_is_retried_then_fails_for_good_and_is_compensated(
    backend: Backend,
) -> None:
    run_id = start(backend, booking, 1)
    complete(backend, booking, claimed(backend, run_id, "reserve"), "held")
    first = claimed(backend, run_id, "charge")
    fail(backend, booking, first, retry_in=60.0)
    charge_row = next(s for s in backend.store.get_steps(run_id) if s.step_key == "charge")
    assert charge_row.state == StepState.PENDING
    assert charge_row.error["type"] == "Boom" and charge_row.error["retryable"] is True
    assert claim(backend, run_id, "charge") is None  # not due for a minute
    assert backend.store.redispatch_due() == 0
    backend.fall_due(run_id, "charge")
    assert backend.store.redispatch_due() == 1
    assert states(backend, run_id)["charge"] == StepState.DISPATCHED
    second = claimed(backend, run_id, "charge")
    assert second.attempt == 2 and second.previous_error_type == "Boom"
    with pytest.raises(Fenced):
        fail(backend, booking, first, retry_in=None)  # an old attempt's failure: fenced
    fail(backend, booking, second, retry_in=None)  # out of attempts: failed for good
    assert run_state(backend, run_id) == RunState.COMPENSATING
    assert states(backend, run_id) == {
        "reserve": StepState.COMPLETED,
        "charge": StepState.FAILED,
        "compensate:reserve": StepState.DISPATCHED,
    }
    assert backend.outbox(run_id)[-1] == (STEP_TASK, "compensate:reserve")
    assert backend.store.get_run(run_id).error["type"] == "Boom"
    undo = claimed(backend, run_id, "compensate:reserve")
    assert (undo.kind, undo.input) == (StepKind.COMPENSATION, "held")
    complete(backend, booking, undo, None)
    assert run_state(backend, run_id) == RunState.COMPENSATED


def test_an_expired_lease_gives_the_step_another_attempt(backend: Backend) -> None:
    run_id = start(backend, booking, 1)
    lost = claimed(backend, run_id, "reserve", owner="dead")
    assert backend.store.expire_leases() == []  # not expired yet
    backend.expire_lease(run_id, "reserve")
    assert backend.store.expire_leases() == [(run_id, "reserve", StepState.PENDING)]
    [row] = backend.store.get_steps(run_id)
    assert (row.state, row.error["type"], row.error["attempt"]) == ("pending", "LeaseExpired", 1)
    assert claim(backend, run_id, "reserve", owner="dead") is not None  # due now: attempt 2
    with pytest.raises(Fenced):
        complete(backend, booking, lost, "too late")
    assert backend.store.expire_leases() == []


def test_an_expired_lease_out_of_attempts_fails_the_step_and_the_run(backend: Backend) -> None:
    run_id = start(backend, single, 1)
    claimed(backend, run_id, "charge")
    backend.expire_lease(run_id, "charge")
    assert backend.store.expire_leases() == [(run_id, "charge", StepState.FAILED)]
    assert backend.outbox(run_id)[-1] == (ADVANCE_TASK, None)
    advance(backend, single, run_id)  # the advance task the expiry queued
    run = backend.store.get_run(run_id)
    assert (run.state, run.error["type"]) == (RunState.FAILED, "LeaseExpired")


def test_cancel_compensates_what_completed(backend: Backend) -> None:
    run_id = start(backend, booking, 1)
    complete(backend, booking, claimed(backend, run_id, "reserve"), "held")
    cancel(backend, run_id)
    assert run_state(backend, run_id) == RunState.COMPENSATING
    assert states(backend, run_id) == {
        "reserve": StepState.COMPLETED,
        "charge": StepState.CANCELLED,
        "compensate:reserve": StepState.DISPATCHED,
    }
    assert claim(backend, run_id, "charge") is None  # an action of a run being undone
    complete(backend, booking, claimed(backend, run_id, "compensate:reserve"), None)
    assert run_state(backend, run_id) == RunState.CANCELLED
    with pytest.raises(OperatorError, match=f"run '{run_id}' is cancelled"):
        cancel(backend, run_id)


def test_cancel_with_nothing_to_undo_ends_the_run(backend: Backend) -> None:
    run_id = start(backend, booking, 1)
    cancel(backend, run_id)
    assert run_state(backend, run_id) == RunState.CANCELLED
    assert states(backend, run_id) == {"reserve": StepState.CANCELLED}
    assert claim(backend, run_id, "reserve") is None


def test_operator_retry_of_a_failed_run(backend: Backend) -> None:
    run_id = start(backend, single, 1)
    fail(backend, single, claimed(backend, run_id, "charge"), retry_in=None)
    run = backend.store.get_run(run_id)
    assert (run.state, run.error["type"]) == (RunState.FAILED, "Boom")
    assert claim(backend, run_id, "charge") is None
    with pytest.raises(OperatorError, match="only a running run"):
        cancel(backend, run_id)
    backend.store.retry_run(run_id)
    run = backend.store.get_run(run_id)
    assert (run.state, run.error, run.finished) == (RunState.RUNNING, None, False)
    [row] = backend.store.get_steps(run_id)
    assert (row.state, row.max_attempts, row.error) == (StepState.DISPATCHED, 2, None)
    assert backend.outbox(run_id)[-2:] == [
        (STEP_TASK, "charge"),
        (ADVANCE_TASK, None),
    ]
    again = claimed(backend, run_id, "charge")
    assert again.attempt == 2
    complete(backend, single, again, "paid")
    assert run_state(backend, run_id) == RunState.COMPLETED
    with pytest.raises(OperatorError, match=f"run '{run_id}' is completed"):
        backend.store.retry_run(run_id)


def test_an_event_sent_after_the_wait_completes_it(backend: Backend) -> None:
    run_id = start(backend, approval, {"item": 1})
    complete(backend, approval, claimed(backend, run_id, "reserve#1"), "held")
    waiting = {k: v for k, v in states(backend, run_id).items() if v == StepState.WAITING}
    assert list(waiting) == ["approval#2"]
    assert claim(backend, run_id, "approval#2") is None  # a wait is not claimed
    assert backend.store.send_event(run_id, "approval", {"ok": True}) is True
    assert backend.outbox(run_id)[-1] == (ADVANCE_TASK, None)
    advance(backend, approval, run_id)
    run = backend.store.get_run(run_id)
    assert (run.state, run.result) == (
        RunState.COMPLETED,
        {"held": "held", "decision": {"ok": True}},
    )


def test_an_event_sent_before_the_wait_is_kept_for_it(backend: Backend) -> None:
    run_id = start(backend, approval, {"item": 1})
    assert backend.store.send_event(run_id, "approval", "early") is False
    complete(backend, approval, claimed(backend, run_id, "reserve#1"), "held")
    run = backend.store.get_run(run_id)
    assert (run.state, run.result) == (RunState.COMPLETED, {"held": "held", "decision": "early"})
    assert states(backend, run_id)["approval#2"] == StepState.COMPLETED
    with pytest.raises(OperatorError, match="takes no events"):
        backend.store.send_event(run_id, "approval", "late")


def test_a_timer_falls_due_and_is_dispatched_then_completed(backend: Backend) -> None:
    run_id = start(backend, nap, None)
    [timer] = backend.store.get_steps(run_id)
    assert (timer.kind, timer.state) == (StepKind.TIMER, StepState.PENDING)
    assert claim(backend, run_id, timer.step_key) is None  # an hour to go
    assert backend.store.redispatch_due() == 0
    backend.fall_due(run_id, timer.step_key)
    assert backend.store.redispatch_due() == 1
    assert backend.outbox(run_id) == [(STEP_TASK, timer.step_key)]
    woke = claimed(backend, run_id, timer.step_key)
    assert woke.kind == StepKind.TIMER
    complete(backend, nap, woke, None)
    run = backend.store.get_run(run_id)
    assert (run.state, run.result) == (RunState.COMPLETED, "rested")


def test_a_run_transition_from_a_final_state_is_refused(backend: Backend) -> None:
    run_id = start(backend, single, 1)
    complete(backend, single, claimed(backend, run_id, "charge"), "paid")
    with pytest.raises(RunTransitionError, match=run_id):
        backend.store.advance_run(run_id, lambda tx: tx.finish(RunState.FAILED))
    with pytest.raises(RunTransitionError, match=run_id):
        backend.store.advance_run(run_id, lambda tx: tx.begin_compensation({"type": "X"}))
    run = backend.store.get_run(run_id)  # nothing of either was written
    assert (run.state, run.result, run.error) == (RunState.COMPLETED, "paid", None)


def test_unknown_runs(backend: Backend) -> None:
    with pytest.raises(RunNotFoundError, match="nope"):
        backend.store.get_run("nope")
    with pytest.raises(RunNotFoundError, match="nope"):
        backend.store.send_event("nope", "approval", None)
    assert backend.store.get_steps("nope") == []


# -- the worker registry -------------------------------------------------------------------------


def test_a_silent_workers_unclaimed_steps_are_dispatched_again(backend: Backend) -> None:
    run_id = start(backend, booking)
    backend.store.worker_heartbeat("host:1:a", [QUEUE], 10.0)  # may have taken reserve's message
    backend.store.worker_heartbeat("host:2:a", ["elsewhere"], 10.0)
    backend.store.worker_heartbeat("host:3:a", [QUEUE], 10.0)
    backend.store.worker_heartbeat("host:4:a", [QUEUE], 120.0)  # a long lease, beats seldom
    assert backend.store.recover_dead_workers() == []
    assert backend.store.redispatch_due() == 0  # not due: its dispatch timeout is far off
    for owner in ("host:1:a", "host:2:a", "host:4:a"):
        backend.silence(owner, 60.0)
    backend.store.worker_heartbeat("host:3:a", [QUEUE], 10.0)
    assert sorted(backend.store.recover_dead_workers()) == ["host:1:a", "host:2:a"]
    assert backend.store.redispatch_due() == 1
    assert backend.outbox(run_id) == [(STEP_TASK, "reserve"), (STEP_TASK, "reserve")]
    assert backend.store.recover_dead_workers() == []  # recovered once
    claimed(backend, run_id, "reserve")
    assert claim(backend, run_id, "reserve", owner="w2") is None  # the duplicate is fenced


def test_a_worker_taken_for_dead_is_back_at_its_next_beat(backend: Backend) -> None:
    backend.store.worker_heartbeat("host:1:a", [QUEUE], 10.0)
    backend.silence("host:1:a", 60.0)  # its beats held up, by a long Postgres outage say
    assert backend.store.recover_dead_workers() == ["host:1:a"]
    backend.store.worker_heartbeat("host:1:a", [QUEUE], 10.0)
    backend.silence("host:1:a", 60.0)
    assert backend.store.recover_dead_workers() == ["host:1:a"]  # registered again: seen again


def test_a_worker_that_stops_cleanly_is_not_recovered(backend: Backend) -> None:
    run_id = start(backend, booking)
    backend.store.worker_heartbeat("host:1:a", [QUEUE], 10.0)
    backend.store.deregister_worker("host:1:a")
    backend.silence_all()
    assert backend.store.recover_dead_workers() == []
    assert backend.outbox(run_id) == [(STEP_TASK, "reserve")]


# -- advance tasks are owed in Postgres, not only sent -----------------------------------------


def test_an_advance_task_lost_with_the_broker_is_sent_again(backend: Backend) -> None:
    run_id = start(backend, approval, {"item": 1})
    complete(backend, approval, claimed(backend, run_id, "reserve#1"), "held")
    assert backend.store.send_event(run_id, "approval", {"ok": True}) is True
    assert backend.outbox(run_id)[-1] == (ADVANCE_TASK, None)
    backend.advance_falls_due(run_id)  # its message was lost: nobody advanced the run
    assert backend.store.redispatch_due() == 1
    assert backend.outbox(run_id)[-2:] == [(ADVANCE_TASK, None), (ADVANCE_TASK, None)]
    advance(backend, approval, run_id)  # the second one arrives
    assert backend.store.get_run(run_id).state == RunState.COMPLETED
    backend.advance_falls_due(run_id)
    assert backend.store.redispatch_due() == 0  # nothing owed any more


def test_an_advance_that_ran_is_not_sent_again(backend: Backend) -> None:
    run_id = start(backend, approval, {"item": 1})
    complete(backend, approval, claimed(backend, run_id, "reserve#1"), "held")
    backend.store.send_event(run_id, "other", 1)  # kept: nothing owed
    assert backend.store.send_event(run_id, "approval", {"ok": True}) is True
    advance(backend, approval, run_id)
    backend.advance_falls_due(run_id)
    assert backend.store.redispatch_due() == 0


# -- a claim is not held off by the run's lock -----------------------------------------------


@pytest.mark.parametrize("how", ["failure", "cancel"])
def test_a_step_claimed_while_the_run_decides_to_stop_is_undone(backend: Backend, how: str) -> None:
    run_id = start(backend, pair)
    pay = claimed(backend, run_id, "pay")

    def racing(decide: Any) -> Any:
        def run(tx: Any) -> None:
            tx.journal()  # the coordinator's first read: hold dispatched, never claimed
            claimed(backend, run_id, "hold")  # a worker takes it meanwhile, and may book
            decide(tx)

        return run

    advance_pair = racing(lambda tx: coordinator.advance(tx, _advance(pair)))
    if how == "failure":
        error = {"type": "Boom", "message": "boom", "attempt": pay.attempt}
        backend.store.fail_attempt(pay, error, retry_in=None, advance=advance_pair)
    else:
        error = error_record(ErrorType.CANCELLED, "cancelled by the contract")
        backend.store.stop_run(run_id, racing(lambda tx: coordinator.stop(tx, error)))
    # Not finished past a started step: the run compensates, waiting for hold's attempt.
    assert backend.store.get_run(run_id).state == RunState.COMPENSATING
    assert states(backend, run_id)["hold"] == StepState.RUNNING


# -- the run's history (migration 0006) -----------------------------------------------------------


def kept(b: Backend, run_id: str) -> list[tuple[str, int, str | None, str, str | None]]:
    return [
        (a.step_key, a.attempt, a.worker, a.outcome, a.error_type)
        for a in b.store.kept_attempts(run_id)
    ]


def test_attempts_that_do_not_end_their_step_are_kept(backend: Backend) -> None:
    run_id = start(backend, booking, 1)
    fail(backend, booking, claimed(backend, run_id, "reserve", owner="w1"), retry_in=0.0)
    backend.fall_due(run_id, "reserve")
    claimed(backend, run_id, "reserve", owner="w2")
    backend.expire_lease(run_id, "reserve")
    backend.store.expire_leases()
    last = claimed(backend, run_id, "reserve", owner="w3")
    complete(backend, booking, last, "held")  # ends the story: the step row holds attempt 3
    assert kept(backend, run_id) == [
        ("reserve", 1, "w1", "failed", "Boom"),
        ("reserve", 2, "w2", "lost", "LeaseExpired"),
    ]
    [row, _] = backend.store.get_steps(run_id)
    assert (row.state, row.attempt) == (StepState.COMPLETED, 3)
    # The happy path keeps nothing, and compensation is a run event, not an attempt.
    complete(backend, booking, claimed(backend, run_id, "charge"), "paid")
    assert len(backend.store.kept_attempts(run_id)) == 2
    assert backend.store.run_events(run_id) == []


def test_a_failure_for_good_is_held_by_the_step_row_alone(backend: Backend) -> None:
    run_id = start(backend, single, 1)
    fail(backend, single, claimed(backend, run_id, "charge"), retry_in=None)
    assert kept(backend, run_id) == []
    # An operator's retry supersedes that attempt: it is kept before the step reopens.
    backend.store.retry_run(run_id, actor="ann@desk")
    assert kept(backend, run_id) == [("charge", 1, "w1", "failed", "Boom")]
    events = backend.store.run_events(run_id)
    assert [(e.event, e.actor, e.detail) for e in events] == [
        ("retry", "ann@desk", {"from_state": "failed"})
    ]


def test_compensation_and_operator_actions_are_run_events(backend: Backend) -> None:
    run_id = start(backend, approval, {"item": 1})
    complete(backend, approval, claimed(backend, run_id, "reserve#1"), "held")
    backend.store.send_event(run_id, "approval", "early?", actor="bot")
    backend.store.send_event(run_id, "other", 1, actor="bot")
    error = error_record(ErrorType.CANCELLED, "no")
    backend.store.stop_run(
        run_id, lambda tx: coordinator.stop(tx, error), actor="ann@desk", detail={"reason": "no"}
    )
    events = [(e.event, e.actor, e.detail) for e in backend.store.run_events(run_id)]
    assert events == [
        ("send_event", "bot", {"name": "approval", "delivered": True}),
        ("send_event", "bot", {"name": "other", "delivered": False}),
        ("cancel", "ann@desk", {"reason": "no"}),
        ("compensation_begun", None, {"type": "Cancelled", "message": "no"}),
    ]
