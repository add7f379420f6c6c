"""``async def`` steps, compensations and workflows on real workers, killed with kill -9: the
same guarantees as sync ones (journaled once, replayed from the journal, a lost attempt run
again under the same idempotency key), and one event loop per pool thread, reused."""

from __future__ import annotations

from collections import Counter
from typing import Any

import psycopg

from saga import SagaClient, Settings
from tests import async_sagas
from tests.processes import ProcessGroup, wait_until
from tests.sagas import calls

Conn = psycopg.Connection[Any]


def _started(db: Conn, run_id: str, key: str) -> bool:
    return calls(db, run_id)[key] >= 1


def _attempts(db: Conn, run_id: str, key: str) -> list[tuple[int, str]]:
    rows = db.execute(
        "SELECT attempt, idempotency_key FROM test_calls WHERE run_id = %s AND step = %s "
        "ORDER BY id",
        (run_id, key),
    ).fetchall()
    return [(r[0], r[1]) for r in rows]


def test_an_async_step_killed_mid_await_runs_again_and_the_rest_once(
    settings: Settings, procs: ProcessGroup, client: SagaClient, db: Conn
) -> None:
    procs.relay(settings)
    doomed = procs.worker(settings, "doomed")
    run_id = client.start(async_sagas.async_graph, {"block_at": "book"})
    wait_until(lambda: _started(db, run_id, "book"), 60, "the async step to start")
    doomed.kill()
    procs.worker(settings, "survivor")
    result = client.result(run_id, timeout=60)
    assert result["trail"] == ["first", "book", "finish"]
    assert result["booking"] == f"{run_id}:book"
    assert calls(db, run_id) == Counter({"first": 1, "book": 2, "finish": 1})
    assert _attempts(db, run_id, "book") == [(1, f"{run_id}:book"), (2, f"{run_id}:book")]
    assert [(s.step_key, s.state) for s in client.steps(run_id)] == [
        ("first", "completed"),
        ("book", "completed"),
        ("finish", "completed"),
    ]


def test_an_async_compensation_killed_mid_await_runs_again_then_the_run_is_compensated(
    settings: Settings, procs: ProcessGroup, client: SagaClient, db: Conn
) -> None:
    procs.relay(settings)
    doomed = procs.worker(settings, "doomed")
    run_id = client.start(async_sagas.async_graph, {"refuse": True, "block_at": "unbook"})
    key = "compensate:book"
    wait_until(lambda: _started(db, run_id, key), 60, "the async compensation to start")
    doomed.kill()
    procs.worker(settings, "survivor")
    run = client.wait(run_id, timeout=60)
    assert run.state == "compensated", run
    assert calls(db, run_id) == Counter({"first": 1, "book": 1, "finish": 1, key: 2})
    assert [a for a, _ in _attempts(db, run_id, key)] == [1, 2]
    undo = next(s for s in client.steps(run_id) if s.step_key == key)
    assert undo.state == "completed"
    assert undo.result == {"cancelled": f"{run_id}:book"}  # the step's journaled result


def test_an_async_workflow_replays_from_the_journal_after_kill_9(
    settings: Settings, procs: ProcessGroup, client: SagaClient, db: Conn
) -> None:
    procs.relay(settings)
    doomed = procs.worker(settings, "doomed")
    run_id = client.start(async_sagas.async_flow, {"block_at": "finish"})
    wait_until(lambda: _started(db, run_id, "finish#3"), 60, "the workflow's third step")
    doomed.kill()
    procs.worker(settings, "survivor")
    result = client.result(run_id, timeout=60)
    assert result["trail"] == ["first", "book", "finish"]
    # The steps before the kill were read back from the journal, not run again.
    assert calls(db, run_id) == Counter({"first#1": 1, "book#2": 1, "finish#3": 2})


def test_an_async_workflow_compensates_its_async_step(
    settings: Settings, procs: ProcessGroup, client: SagaClient, db: Conn
) -> None:
    procs.relay(settings)
    procs.worker(settings, "w1")
    run_id = client.start(async_sagas.async_flow, {"refuse": True})
    run = client.wait(run_id, timeout=60)
    assert run.state == "compensated", run
    assert calls(db, run_id) == Counter(
        {"first#1": 1, "book#2": 1, "finish#3": 1, "compensate:book#2": 1}
    )


def _probe_runs(client: SagaClient, n: int) -> list[dict[str, Any]]:
    run_ids = [client.start(async_sagas.probe, None) for _ in range(n)]
    return [client.result(r, timeout=60) for r in run_ids]


def test_one_event_loop_per_process_is_reused_across_tasks(
    settings: Settings, procs: ProcessGroup, client: SagaClient
) -> None:
    procs.relay(settings)
    procs.worker(settings, "solo")
    results = _probe_runs(client, 4)
    assert len({r["pid"] for r in results}) == 1
    assert len({r["loop"] for r in results}) == 1
    # The same loop object (a mark set on it by each step), not a new one at the same address.
    assert sorted(r["uses"] for r in results) == [1, 2, 3, 4]


def test_one_event_loop_per_prefork_child_is_reused_across_tasks(
    settings: Settings, procs: ProcessGroup, client: SagaClient
) -> None:
    procs.relay(settings)
    procs.prefork_worker(settings)
    results = _probe_runs(client, 3)
    assert len({r["pid"] for r in results}) == 1
    assert sorted(r["uses"] for r in results) == [1, 2, 3]


def test_one_event_loop_per_pool_thread_is_reused_across_tasks(
    settings: Settings, procs: ProcessGroup, client: SagaClient
) -> None:
    procs.relay(settings)
    procs.spawn("threads", settings, "worker", "--pool", "threads", "--concurrency", "2")
    results = _probe_runs(client, 8)
    by_thread: dict[tuple[int, int], list[int]] = {}
    for r in results:
        by_thread.setdefault((r["pid"], r["thread"]), []).append(r["uses"])
        assert len({x["loop"] for x in results if x["thread"] == r["thread"]}) == 1
    assert 1 <= len(by_thread) <= 2
    for uses in by_thread.values():  # each thread's loop counted every step it ran
        assert sorted(uses) == list(range(1, len(uses) + 1))
    assert max(len(u) for u in by_thread.values()) >= 2  # some loop ran more than one step
