"""Connections cut while step outcomes commit: no partial state is ever visible."""

from __future__ import annotations

import threading
from typing import Any

import psycopg
import pytest

from saga.client import SagaClient
from saga.settings import Settings
from tests import sagas
from tests.processes import ProcessGroup

# Each query returns rows that break an invariant of a linear saga's journal; all must be empty.
INVARIANTS = {
    "completed step without its successor": """
        SELECT s.run_id, s.step_key FROM saga_steps s
        WHERE s.state = 'completed' AND s.step_key <> 'step10' AND NOT EXISTS (
            SELECT 1 FROM saga_steps n WHERE n.run_id = s.run_id AND n.seq = s.seq + 1)""",
    "step without a completed predecessor": """
        SELECT s.run_id, s.step_key FROM saga_steps s
        WHERE s.seq > 1 AND NOT EXISTS (
            SELECT 1 FROM saga_steps p WHERE p.run_id = s.run_id AND p.seq = s.seq - 1
              AND p.state = 'completed')""",
    # A scheduled step's message needs no outbox row of its own when its committer publishes it
    # (the fast path): the step's journal row, due again after the dispatch timeout, is its
    # record. An outbox row, when there is one, must still name a step that exists.
    "outbox row without its step": """
        SELECT o.id FROM saga_outbox o WHERE NOT EXISTS (
            SELECT 1 FROM saga_steps s WHERE s.run_id = o.payload->>'run_id'
              AND s.step_key = o.payload->>'step_key')""",
    "run completed without its last step, or the reverse": """
        SELECT r.run_id FROM saga_runs r
        LEFT JOIN saga_steps s ON s.run_id = r.run_id AND s.step_key = 'step10'
        WHERE (r.state = 'completed') <> (coalesce(s.state, '') = 'completed')""",
}


def violations(conn: psycopg.Connection[Any]) -> dict[str, list[Any]]:
    found = {}
    with conn.transaction():
        conn.execute("SET TRANSACTION ISOLATION LEVEL REPEATABLE READ")
        for name, query in INVARIANTS.items():
            rows = conn.execute(query).fetchall()
            if rows:
                found[name] = rows
    return found


@pytest.mark.slow
def test_connection_cut_during_outcome_commit_leaves_no_partial_state(
    settings: Settings, procs: ProcessGroup, database_url: str
) -> None:
    procs.relay(settings)
    procs.worker(settings, "w1")
    procs.worker(settings, "w2")
    done = threading.Event()
    cut_in_transaction = 0
    seen: dict[str, list[Any]] = {}

    def chaos() -> None:
        nonlocal cut_in_transaction
        with psycopg.connect(database_url, autocommit=True) as conn:
            while not done.is_set():
                # A transaction of several statements is open when it began before the
                # statement now running (outcomes are pipelined: 'active' until their Sync).
                rows = conn.execute(
                    "SELECT xact_start < query_start, pg_terminate_backend(pid) "
                    "FROM pg_stat_activity "
                    "WHERE datname = current_database() AND application_name = 'saga-worker' "
                    "AND state IN ('idle in transaction', 'active') AND query NOT LIKE 'LISTEN%%'"
                ).fetchall()
                cut_in_transaction += sum(1 for in_transaction, _ in rows if in_transaction)
                if rows:
                    done.wait(0.1)  # sporadic cuts, as in a failover; not a dead database

    def checker() -> None:
        with psycopg.connect(database_url, autocommit=True) as conn:
            while not done.wait(0.02):
                seen.update(violations(conn))

    threads = [threading.Thread(target=chaos), threading.Thread(target=checker)]
    with SagaClient(settings) as client:
        run_ids = [client.start(sagas.ten, {"n": i}) for i in range(10)]
        for t in threads:
            t.start()
        try:
            results = [client.wait(r, timeout=180) for r in run_ids[:5]]
        finally:
            done.set()
            for t in threads:
                t.join()
        results += [client.wait(r, timeout=180) for r in run_ids[5:]]
        with psycopg.connect(database_url, autocommit=True) as conn:
            seen.update(violations(conn))
    print(f"connections cut mid-transaction: {cut_in_transaction}")
    assert seen == {}
    assert cut_in_transaction > 0, "the chaos never hit an open transaction; nothing was tested"
    assert [r.state for r in results] == ["completed"] * 10
    assert all(r.result["trail"] == list(range(1, 11)) for r in results)
