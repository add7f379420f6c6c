"""`saga bench journal`: what the journal's write pattern costs Postgres per step, today's against
a redesign that issue 15 weighed, replayed statement by statement on a private cluster.

No workers, broker or relay: one session sends, for each run of ``--steps`` steps, what the
engine's processes send for a linear saga (the run's insert, each step's claim and outcome
transaction, the run's finish), so the WAL and rows it counts are the statements' own. Shapes:

- ``today``: a step's row is inserted by its predecessor's outcome (``dispatched``), updated by
  its claim (a HOT update since migration 0011) and by its outcome; the outcome transaction
  takes the run's row lock (``LOCK_RUN``, ``FOR UPDATE``).
- ``claim_inserts``: the redesign, emulated here only (the engine does not do it): the claim
  inserts the step's row, and the outcome records its successor's dispatch deadline on its own
  row, in an index of its own (how a sweeper would find a lost message without a row to say so).
- ``claim_inserts_lean``: the same without that index (a sweeper would walk the open runs
  instead) and without the steps' foreign key to their run (whose check locks the run row, a WAL
  record, on every insert outside the run's lock; pruning would delete steps itself).
- each with the run lock taken as a transaction-level advisory lock instead of the row lock.

The emulated claims check nothing (no run state, no duplicate): the least a real one would
write. Autovacuum is off. One session prunes far fewer pages than the engine's processes do
(`saga bench peers` counts 1.9 prune records a step, this replay 0.2), so its WAL reads lower;
the shapes are compared with each other.
"""

from __future__ import annotations

import time
import uuid
from collections.abc import Callable, Sequence
from typing import IO, Any

import psycopg
from psycopg.types.json import Jsonb

from saga import queries as q
from saga.errors import ConfigurationError
from saga.migrate import migrate
from saga.settings import Settings
from saga_dev.private_postgres import PrivatePostgres, private_postgres

FN_REF = "saga_dev.bench_sagas:noop"
LEASE_S = DISPATCH_TIMEOUT_S = 30

LOCKS = {
    "row_lock": q.LOCK_RUN,
    "advisory_lock": "SELECT pg_advisory_xact_lock(hashtextextended(%s, 1))",
}

# The redesign's schema on top of the engine's: the successor's dispatch deadline.
CLAIM_INSERTS_SCHEMA = [
    "ALTER TABLE saga_steps ADD COLUMN next_due_at timestamptz",
    "CREATE INDEX saga_steps_next_due ON saga_steps (next_due_at) WHERE next_due_at IS NOT NULL",
]
LEAN_SCHEMA = [
    "ALTER TABLE saga_steps ADD COLUMN next_due_at timestamptz",
    "ALTER TABLE saga_steps DROP CONSTRAINT saga_steps_run_id_fkey",
]

CLAIM_BY_INSERT = """
INSERT INTO saga_steps (run_id, step_key, step_name, kind, seq, state, fn_ref, options,
                        max_attempts, idempotency_key, input, due_at, attempt, lease_owner,
                        lease_expires_at, started_at, attempt_started_at)
VALUES (%(run_id)s, %(step_key)s, %(step_key)s, 'action', %(seq)s, 'running', %(fn_ref)s, '{}',
        3, %(idempotency_key)s, %(input)s, now() + %(timeout)s * interval '1 second', 1,
        %(owner)s, now() + %(timeout)s * interval '1 second', now(), now())
"""

COMPLETE_AND_SCHEDULE = """
UPDATE saga_steps
SET state = 'completed', result = %(result)s::jsonb, error = NULL, finished_at = now(),
    completed_seq = nextval('saga_completion_seq'), lease_expires_at = NULL,
    next_due_at = CASE WHEN %(last)s THEN NULL
                       ELSE now() + %(timeout)s * interval '1 second' END
WHERE run_id = %(run_id)s AND step_key = %(step_key)s AND state = 'running' AND attempt = 1
"""

Conn = psycopg.Connection[Any]


def _start_run(conn: Conn, run_id: str) -> None:
    conn.execute(
        q.INSERT_RUN,
        {
            "run_id": run_id,
            "saga_name": "chain",
            "saga_ref": "saga_dev.bench_sagas:chain",
            "saga_version": "1",
            "input": '{"n": 1}',
            "trace_context": Jsonb({"traceparent": f"00-{run_id}-{run_id[:16]}-01"}),
            "timeout": None,
            "queue": "saga",
            "key_prefix": "",
            "priority": 0,
            "run_gate": None,
        },
    )


def _new_step(run_id: str, k: int) -> dict[str, Any]:
    key = f"step{k}"
    return {
        "run_id": run_id,
        "step_key": key,
        "step_name": key,
        "kind": "action",
        "position": None,
        "state": "dispatched",
        "fn_ref": FN_REF,
        "compensation_ref": None,
        "options": "{}",
        "max_attempts": 3,
        "idempotency_key": f"{run_id}:{key}",
        "input": f'{{"n": {k}}}',
        "delay": None,
        "dispatch_timeout": DISPATCH_TIMEOUT_S,
    }


def _finish(conn: Conn, run_id: str, steps: int) -> None:
    conn.execute(
        q.FINISH_RUN,
        {"run_id": run_id, "state": "completed", "result": f'{{"n": {steps}}}', "error": None},
    )


def replay_today(conn: Conn, lock: str, runs: int, steps: int) -> None:
    for _ in range(runs):
        run_id = uuid.uuid4().hex
        with conn.transaction():
            _start_run(conn, run_id)
            conn.execute(q.INSERT_STEP, _new_step(run_id, 1))
        for k in range(1, steps + 1):
            key = f"step{k}"
            claim = {"run_id": run_id, "step_key": key, "owner": "w1:1", "lease": LEASE_S}
            conn.execute(q.CLAIM_STEP, claim)
            with conn.transaction():
                conn.execute(lock, (run_id,))
                outcome = {"run_id": run_id, "step_key": key, "attempt": 1, "result": "{}"}
                conn.execute(q.COMPLETE_STEP, outcome)
                if k < steps:
                    conn.execute(q.INSERT_STEP, _new_step(run_id, k + 1))
                else:
                    _finish(conn, run_id, steps)


def replay_claim_inserts(conn: Conn, lock: str, runs: int, steps: int) -> None:
    for _ in range(runs):
        run_id = uuid.uuid4().hex
        with conn.transaction():
            _start_run(conn, run_id)
        for k in range(1, steps + 1):
            key = f"step{k}"
            claim = {**_new_step(run_id, k), "seq": k, "owner": "w1:1", "timeout": LEASE_S}
            conn.execute(CLAIM_BY_INSERT, claim)
            with conn.transaction():
                conn.execute(lock, (run_id,))
                outcome = {
                    "run_id": run_id,
                    "step_key": key,
                    "result": "{}",
                    "last": k == steps,
                    "timeout": DISPATCH_TIMEOUT_S,
                }
                conn.execute(COMPLETE_AND_SCHEDULE, outcome)
                if k == steps:
                    _finish(conn, run_id, steps)


SHAPES: dict[str, tuple[Callable[[Conn, str, int, int], None], list[str]]] = {
    "today": (replay_today, []),
    "claim_inserts": (replay_claim_inserts, CLAIM_INSERTS_SCHEMA),
    "claim_inserts_lean": (replay_claim_inserts, LEAN_SCHEMA),
}


def _lsn(conn: Conn) -> tuple[int, str]:
    """The WAL position as a byte count and as pg_waldump takes it."""
    row = conn.execute(
        "SELECT pg_current_wal_lsn() - '0/0'::pg_lsn, pg_current_wal_lsn()::text"
    ).fetchone()
    assert row is not None
    return int(row[0]), str(row[1])


def _rows_and_hot(conn: Conn) -> tuple[int, int]:
    conn.execute("SELECT pg_stat_force_next_flush()")
    row = conn.execute(
        "SELECT sum(n_tup_ins + n_tup_upd + n_tup_del), sum(n_tup_hot_upd) FROM pg_stat_user_tables"
    ).fetchone()
    assert row is not None
    return int(row[0] or 0), int(row[1] or 0)


def _measure(
    pg: PrivatePostgres, name: str, shape: str, lock: str, runs: int, steps: int
) -> dict[str, Any]:
    replay, schema = SHAPES[shape]
    with psycopg.connect(pg.url, autocommit=True) as admin:
        admin.execute(f"CREATE DATABASE {name}")
    migrate(pg.database_url(name))
    with psycopg.connect(pg.database_url(name), autocommit=True) as conn:
        for statement in schema:
            conn.execute(statement)
        conn.execute("CHECKPOINT")  # no full-page images from the schema's pages
        rows0, hot0 = _rows_and_hot(conn)
        start, start_text = _lsn(conn)
        replay(conn, LOCKS[lock], runs, steps)
        end, end_text = _lsn(conn)
        rows1, hot1 = _rows_and_hot(conn)
    n = runs * steps
    records = pg.wal_records(start_text, end_text)
    leaf = records.get("Btree/INSERT_LEAF", (0, 0, 0))[0]
    return {
        "wal_bytes_per_step": round((end - start) / n, 1),
        "rows_per_step": round((rows1 - rows0) / n, 3),
        "hot_updates_per_step": round((hot1 - hot0) / n, 3),
        "index_entries_per_step": round(leaf / n, 3),
        "wal_by_record": {
            kind: {"records": round(r / n, 3), "bytes": round(b / n, 1)}
            for kind, (r, b, _fpi) in sorted(records.items(), key=lambda kv: -kv[1][1])
        },
    }


def bench_journal(runs: int, steps: int) -> dict[str, Any]:
    began = time.monotonic()
    report: dict[str, Any] = {"suite": "journal", "runs": runs, "steps": steps, "shapes": {}}
    with private_postgres() as pg:
        with psycopg.connect(pg.url, autocommit=True) as admin:
            # No vacuum of one shape's tables logging into the next one's measurement.
            admin.execute("ALTER SYSTEM SET autovacuum = off")
            admin.execute("SELECT pg_reload_conf()")
        for shape in SHAPES:
            for lock in LOCKS:
                name = f"{shape}_{lock}"
                report["shapes"][name] = _measure(pg, name, shape, lock, runs, steps)
    report["elapsed_s"] = round(time.monotonic() - began, 1)
    return report


def print_table(report: dict[str, Any], out: IO[str]) -> None:
    lines = [
        f"saga bench journal: {report['runs']} runs of {report['steps']} steps replayed on a "
        f"private cluster, {report['elapsed_s']} s",
        f"{'per step':34} {'WAL bytes':>10} {'rows':>6} {'HOT':>6} {'index entries':>14}",
    ]
    for name, s in report["shapes"].items():
        lines.append(
            f"{name:34} {s['wal_bytes_per_step']:>10.0f} {s['rows_per_step']:>6.2f} "
            f"{s['hot_updates_per_step']:>6.2f} {s['index_entries_per_step']:>14.2f}"
        )
    for name, s in report["shapes"].items():
        lines.append(f"{name} WAL by record type (records, bytes per step):")
        lines += [
            f"  {kind:<28} {r['records']:>6.2f} {r['bytes']:>7.0f}"
            for kind, r in list(s["wal_by_record"].items())[:8]
        ]
    print("\n".join(lines), file=out)


def main(argv: Sequence[str], settings: Settings) -> int:
    import argparse

    from saga_dev.bench import run_and_print

    del settings  # the bench makes its own cluster
    p = argparse.ArgumentParser(
        prog="saga bench journal",
        description="WAL and rows per step of the journal's write pattern, today's and a "
        "redesign's, replayed on a private Postgres cluster.",
    )
    p.add_argument("--runs", type=int, default=300, help="runs per shape (300)")
    p.add_argument("--steps", type=int, default=10, help="steps per run (10)")
    p.add_argument("--json", action="store_true")
    args = p.parse_args(argv)
    if args.runs < 1 or args.steps < 1:
        raise ConfigurationError("--runs and --steps must be at least 1")
    return run_and_print(
        lambda: bench_journal(args.runs, args.steps), print_table, args.json, (psycopg.Error,)
    )
