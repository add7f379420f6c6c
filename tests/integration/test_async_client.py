"""AsyncSagaClient against real Postgres (and real workers): each of SagaClient's methods, to
await; and waits that listen on a pooled connection, in both clients."""

from __future__ import annotations

import asyncio
import threading
from collections import Counter
from collections.abc import Awaitable, Callable
from typing import Any, TypeVar

import psycopg
import pytest

from saga import AsyncSagaClient, SagaClient, Settings
from saga.errors import InputError, RunConflictError, RunNotFoundError, WaitTimeoutError
from tests import coordinator_sagas as cs
from tests import sagas
from tests.processes import ProcessGroup, wait_until
from tests.sagas import calls

Conn = psycopg.Connection[Any]
T = TypeVar("T")


def run(settings: Settings, body: Callable[[AsyncSagaClient], Awaitable[T]]) -> T:
    async def main() -> T:
        async with AsyncSagaClient(settings) as client:
            return await body(client)

    return asyncio.run(main())


async def _until(predicate: Callable[[], object], what: str) -> None:
    for _ in range(1200):
        if predicate():
            return
        await asyncio.sleep(0.05)
    raise AssertionError(f"timed out waiting for {what}")


def _waiting_for_event(db: Conn, run_id: str) -> bool:
    row = db.execute(
        "SELECT 1 FROM saga_steps WHERE run_id = %s AND kind = 'event' AND state = 'waiting'",
        (run_id,),
    ).fetchone()
    return row is not None


def test_start_wait_result_run_steps_send_event_and_fork(
    settings: Settings, procs: ProcessGroup, db: Conn
) -> None:
    procs.relay(settings)
    procs.worker(settings, "w1")

    async def body(client: AsyncSagaClient) -> None:
        run_id = await client.start(cs.approval, {"item": "laptop"}, run_id="async-1")
        assert run_id == "async-1"
        # Idempotent, and a conflict is an error, as with SagaClient.
        assert await client.start(cs.approval, {"item": "laptop"}, run_id="async-1") == run_id
        with pytest.raises(RunConflictError):
            await client.start(cs.approval, {"item": "desk"}, run_id="async-1")
        with pytest.raises(InputError):
            await client.send_event(run_id, "not a name!", None)
        await _until(lambda: _waiting_for_event(db, run_id), "the approval wait")
        assert (await client.run(run_id)).state == "running"
        assert await client.send_event(run_id, "approval", {"approved": True}) is True
        result = await client.result(run_id, timeout=60)
        assert result == {"held": f"{run_id}:reserve#1", "decision": {"approved": True}}
        record = await client.run(run_id)
        assert record.state == "completed" and record.result == result
        steps = await client.steps(run_id)
        assert [s.step_key for s in steps] == ["reserve#1", "approval#2", "echo#3"]
        assert all(s.state == "completed" for s in steps)

        forked = await client.fork(run_id, "echo#3", new_run_id="async-1-fork")
        assert forked == "async-1-fork"
        assert await client.result(forked, timeout=60) == result
        assert calls(db, forked) == Counter({"echo#3": 1})

    run(settings, body)


def test_cancel_compensates(settings: Settings, procs: ProcessGroup, db: Conn) -> None:
    procs.relay(settings)
    procs.worker(settings, "w1")

    async def body(client: AsyncSagaClient) -> None:
        run_id = await client.start(cs.approval, {"item": "boat"})
        await _until(lambda: _waiting_for_event(db, run_id), "the approval wait")
        await client.cancel(run_id, "changed my mind")
        record = await client.wait(run_id, timeout=60)
        assert record.state == "cancelled" and record.error["message"] == "changed my mind"
        assert calls(db, run_id)["compensate:reserve#1"] == 1

    run(settings, body)


def test_retry_resumes_a_failed_compensation(
    settings: Settings, procs: ProcessGroup, db: Conn, tmp_path: Any
) -> None:
    procs.relay(settings)
    procs.worker(settings, "w1")
    marker = tmp_path / "fixed"

    async def body(client: AsyncSagaClient) -> None:
        spec = {"city": "Bern", "fail_payment": True, "broken_undo": "car"}
        run_id = await client.start(cs.fragile_trip, {**spec, "fixed_marker": str(marker)})
        assert (await client.wait(run_id, timeout=60)).state == "compensation_failed"
        marker.touch()
        await client.retry(run_id)
        assert (await client.wait(run_id, timeout=60)).state == "compensated"

    run(settings, body)


def test_wait_times_out_and_unknown_runs_are_errors(settings: Settings) -> None:
    async def body(client: AsyncSagaClient) -> None:
        run_id = await client.start(sagas.two, {})  # no worker: it stays running
        with pytest.raises(WaitTimeoutError, match="still running"):
            await client.wait(run_id, timeout=0.2)
        with pytest.raises(RunNotFoundError):
            await client.run("no-such-run")
        with pytest.raises(RunNotFoundError):
            await client.wait("no-such-run", timeout=1)

    run(settings, body)


def _backends(db: Conn) -> list[tuple[str, str]]:
    """(application name, last statement) of the other client connections to the database."""
    rows = db.execute(
        "SELECT application_name, query FROM pg_stat_activity WHERE datname = current_database() "
        "AND backend_type = 'client backend' AND pid <> pg_backend_pid()"
    ).fetchall()
    return [(r[0], r[1]) for r in rows]


def _waiting(db: Conn) -> bool:
    """Whether a wait has read the run after its LISTEN (start's last statement was COMMIT)."""
    return any(query.lstrip().upper().startswith("SELECT") for _, query in _backends(db))


def test_async_wait_listens_on_a_pooled_connection(
    settings: Settings, procs: ProcessGroup, db: Conn
) -> None:
    settings = settings.model_copy(update={"pool_size": 1})

    async def body(client: AsyncSagaClient) -> None:
        run_id = await client.start(sagas.two, {})
        waiting = asyncio.create_task(client.wait(run_id, timeout=60))
        await _until(lambda: _waiting(db), "the wait to read the run")
        # It listens and reads on the pool's one connection: no other connection is open.
        assert [name for name, _ in _backends(db)] == ["saga-client"]
        assert client.pool.get_stats()["pool_available"] == 0  # taken from the pool
        procs.relay(settings)
        procs.worker(settings, "w1")
        assert (await waiting).state == "completed"
        assert client.pool.get_stats()["pool_available"] == 1  # back in the pool
        assert "UNLISTEN" in dict(_backends(db))["saga-client"]  # not listening there any more
        assert (await client.run(run_id)).state == "completed"

    run(settings, body)


def test_sync_wait_listens_on_a_pooled_connection(
    settings: Settings, procs: ProcessGroup, db: Conn
) -> None:
    settings = settings.model_copy(update={"pool_size": 1})
    with SagaClient(settings) as client:
        run_id = client.start(sagas.two, {})
        outcome: list[Any] = []
        waiter = threading.Thread(target=lambda: outcome.append(client.wait(run_id, timeout=60)))
        waiter.start()
        wait_until(lambda: _waiting(db), 60, "the wait to read the run")
        assert [name for name, _ in _backends(db)] == ["saga-client"]
        procs.relay(settings)
        procs.worker(settings, "w1")
        waiter.join(60)
        assert outcome and outcome[0].state == "completed"
        assert client.run(run_id).state == "completed"  # the pool's one connection is free


def test_many_calls_at_once_share_a_small_pool_without_threads(
    settings: Settings, procs: ProcessGroup
) -> None:
    settings = settings.model_copy(update={"pool_size": 2})
    procs.relay(settings)
    procs.worker(settings, "w1")

    async def body(client: AsyncSagaClient) -> None:
        threads = threading.active_count()
        run_ids = await asyncio.gather(*(client.start(sagas.two, {"n": i}) for i in range(20)))
        assert len(set(run_ids)) == 20
        results = await asyncio.gather(*(client.result(r, timeout=120) for r in run_ids[:2]))
        assert [r["n"] for r in results] == [0, 1]
        records = await asyncio.gather(*(client.run(r) for r in run_ids))
        assert [r.run_id for r in records] == run_ids
        assert threading.active_count() == threads  # no thread per call (nor a thread pool)
        assert client.pool.get_stats()["pool_size"] <= 2

    run(settings, body)
