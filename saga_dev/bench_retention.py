"""``saga bench retention``: the journal's size under a steady load, with and without retention.

Two scratch databases on the server of ``SAGA_DATABASE_URL`` (created, migrated, dropped at the
end) take the same load: ``--hours`` hours-equivalent of ``--runs-per-hour`` finished runs of
``--steps`` steps each, with the rows the engine writes for them (run, steps with inputs and
results, an event for one run in ten, an outbox row per step). Rows are inserted directly, each
hour's stamped with that simulated hour's times, so a day of load takes seconds; the pruning is
the engine's own (``saga.retention.Pruner``'s statement, and the relay's outbox pruning), run
at the end of each simulated hour with its cutoff moved back by the hours still to come. After
each hour both databases get a plain ``VACUUM`` of the journal: it stands in for autovacuum,
which over a real hour would have run (a deleted row's space is reused only once vacuumed).

What it shows: without retention the tables and their indexes grow with every hour; with it
they stop growing once the oldest kept runs start to expire, and stay within a few percent.
It measures the tables the engine fills as of this version; tables it does not fill (run history
kept by other tables) are reported as they are.
"""

from __future__ import annotations

import argparse
import datetime
import json
import sys
import time
import uuid
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from typing import Any, LiteralString

import psycopg
from psycopg.conninfo import make_conninfo

from saga.errors import ConfigurationError
from saga.migrate import migrate
from saga.outbox.message import OutboxMessage
from saga.outbox.relay import Relay
from saga.retention import Pruner
from saga.settings import Settings
from saga.states import RunState

HOUR = 3600.0
TABLES = ("saga_runs", "saga_steps", "saga_events", "saga_outbox")

# Every 100 runs of an hour: 90 completed, 5 compensated, 3 failed, 1 cancelled, 1 whose
# compensation failed.
INSERT_HOUR: LiteralString = """
WITH runs AS (
    INSERT INTO saga_runs (run_id, saga_name, saga_ref, saga_version, state, input, result,
                           trace_context, queue, created_at, updated_at, finished_at)
    SELECT %(prefix)s || g, 'bench_retention', 'saga_dev.bench_retention:agent', '1',
           CASE WHEN g %% 100 < 90 THEN 'completed' WHEN g %% 100 < 95 THEN 'compensated'
                WHEN g %% 100 < 98 THEN 'failed' WHEN g %% 100 < 99 THEN 'cancelled'
                ELSE 'compensation_failed' END,
           jsonb_build_object('question', repeat('q', 160), 'n', g),
           jsonb_build_object('answer', repeat('a', 200)),
           jsonb_build_object('traceparent', '00-' || md5(%(prefix)s || g) || '-'
                              || left(md5(g::text), 16) || '-01'),
           'saga', t, t, t + interval '20 seconds'
    FROM generate_series(1, %(runs)s) g,
         LATERAL (SELECT %(start)s::timestamptz
                         + (g - 1) * (3600.0 / %(runs)s) * interval '1 second' AS t) at
    RETURNING run_id, created_at, finished_at
), steps AS (
    INSERT INTO saga_steps (run_id, step_key, step_name, kind, seq, position, state, fn_ref,
                            options, attempt, max_attempts, idempotency_key, input, result,
                            completed_seq, created_at, started_at, attempt_started_at,
                            finished_at)
    SELECT r.run_id, 'decide#' || s, 'decide', 'action', s, s, 'completed',
           'saga_dev.bench_retention:decide',
           '{"retry": {"max_attempts": 3, "initial_backoff_seconds": 1.0}}', 1, 3,
           r.run_id || ':decide#' || s,
           jsonb_build_object('messages', repeat('m', 300)),
           jsonb_build_object('text', repeat('r', 500), 'tokens', s),
           nextval('saga_completion_seq'), r.created_at, r.created_at, r.created_at,
           r.created_at + s * interval '1 second'
    FROM runs r, generate_series(1, %(steps)s) s
    RETURNING run_id, step_key, finished_at
), events AS (
    INSERT INTO saga_events (run_id, name, payload, consumed_by, created_at)
    SELECT run_id, 'approval', '{"ok": true, "by": "ops"}', 'approval#3', created_at
    FROM runs WHERE right(run_id, 1) = '0'
)
INSERT INTO saga_outbox (message_id, destination, task_name, payload, headers, created_at,
                         available_at, published_at, attempts)
SELECT gen_random_uuid(), 'saga', 'saga.step',
       jsonb_build_object('run_id', run_id, 'step_key', step_key),
       jsonb_build_object('traceparent', '00-' || md5(run_id) || '-' || left(md5(step_key), 16)
                          || '-01'),
       finished_at, finished_at, finished_at, 1
FROM steps
"""

VACUUM: LiteralString = "VACUUM saga_runs, saga_steps, saga_events, saga_outbox"

# The engine's tables, whatever migrations made them (run history included).
JOURNAL_TABLES: LiteralString = """
SELECT c.relname AS name, pg_table_size(c.oid) AS table_bytes,
       pg_indexes_size(c.oid) AS index_bytes, pg_total_relation_size(c.oid) AS total_bytes,
       c.reltuples::bigint AS rows_estimate
FROM pg_class c JOIN pg_namespace n ON n.oid = c.relnamespace
WHERE n.nspname = current_schema() AND c.relkind = 'r' AND c.relname LIKE 'saga\\_%%'
  AND c.relname NOT IN ('saga_schema_migrations', 'saga_workers')
ORDER BY c.relname
"""

COUNT_ROWS: LiteralString = """
SELECT (SELECT count(*) FROM saga_runs) AS runs, (SELECT count(*) FROM saga_steps) AS steps
"""

# Per state, hours kept after finishing (the with-retention database).
RETENTION_HOURS = {
    RunState.COMPLETED: 6.0,
    RunState.COMPENSATED: 6.0,
    RunState.CANCELLED: 6.0,
    RunState.FAILED: 12.0,
    RunState.COMPENSATION_FAILED: 12.0,
}
SIZES = {
    "default": {"hours": 36, "runs_per_hour": 1000, "steps": 10},
    "small": {"hours": 16, "runs_per_hour": 150, "steps": 10},
}


class _NoBroker:
    """The relay's outbox pruning needs no broker."""

    def publish(self, messages: Sequence[OutboxMessage]) -> None:
        raise AssertionError("the retention bench publishes nothing")


@contextmanager
def scratch_database(admin_url: str, label: str) -> Iterator[str]:
    name = f"saga_bench_retention_{label}_{uuid.uuid4().hex[:8]}"
    try:
        admin = psycopg.connect(admin_url, autocommit=True, connect_timeout=5)
    except psycopg.Error as exc:
        raise ConfigurationError(f"cannot reach Postgres at SAGA_DATABASE_URL: {exc}") from exc
    with admin:
        try:
            admin.execute(f'CREATE DATABASE "{name}"'.encode())
        except psycopg.Error as exc:
            raise ConfigurationError(
                f"the retention bench makes two scratch databases and could not create one "
                f"({exc}); give the role of SAGA_DATABASE_URL CREATEDB, or point it at a "
                f"development server"
            ) from exc
        try:
            url = make_conninfo(admin_url, dbname=name)
            migrate(url)
            yield url
        finally:
            admin.execute(f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)'.encode())


def sizes(conn: psycopg.Connection[Any]) -> dict[str, dict[str, int]]:
    rows = conn.execute(JOURNAL_TABLES).fetchall()
    return {
        r[0]: {"table_bytes": r[1], "index_bytes": r[2], "total_bytes": r[3], "rows": r[4]}
        for r in rows
    }


def run_load(
    url: str, *, hours: int, runs_per_hour: int, steps: int, prune: bool
) -> dict[str, Any]:
    """Insert ``hours`` simulated hours, pruning after each when ``prune``; sizes by hour."""
    settings = Settings()
    by_hour: list[dict[str, Any]] = []
    prune_seconds = 0.0
    pruned_runs = 0
    with psycopg.connect(url, autocommit=True) as conn:
        start = conn.execute("SELECT now() - %s * interval '1 hour'", (hours,)).fetchone()
        assert start is not None
        for hour in range(hours):
            with conn.transaction():
                conn.execute(
                    INSERT_HOUR,
                    {
                        "prefix": f"h{hour}-",
                        "runs": runs_per_hour,
                        "steps": steps,
                        "start": start[0] + datetime.timedelta(hours=hour),
                    },
                )
            # The simulated clock is at the end of this hour; the real one at the end of the
            # last. Each cutoff moves back by the difference.
            ahead = (hours - hour - 1) * HOUR
            relay = Relay(
                url, _NoBroker(), retention_seconds=settings.outbox_retention_seconds + ahead
            )
            try:
                while relay.prune():
                    pass
            finally:
                relay.close()
            if prune:
                ages = {state: h * HOUR + ahead for state, h in RETENTION_HOURS.items()}
                pruner = Pruner(url, ages, batch_size=settings.retention_batch_size)
                began = time.perf_counter()
                try:
                    pruned_runs += pruner.prune().total_runs
                finally:
                    pruner.close()
                prune_seconds += time.perf_counter() - began
            conn.execute(VACUUM)
            found = sizes(conn)
            counted = conn.execute(COUNT_ROWS).fetchone()
            assert counted is not None
            by_hour.append(
                {
                    "hour": hour + 1,
                    "total_bytes": sum(t["total_bytes"] for t in found.values()),
                    "runs": counted[0],
                    "steps": counted[1],
                }
            )
        return {
            "by_hour": by_hour,
            "tables": sizes(conn),
            "pruned_runs": pruned_runs,
            "prune_seconds": round(prune_seconds, 3),
        }


def bench_retention(
    settings: Settings, *, hours: int, runs_per_hour: int, steps: int
) -> dict[str, Any]:
    assert settings.database_url
    report: dict[str, Any] = {
        "hours": hours,
        "runs_per_hour": runs_per_hour,
        "steps_per_run": steps,
        "retention_hours": {s.value: h for s, h in RETENTION_HOURS.items()},
        "batch_size": settings.retention_batch_size,
    }
    began = time.perf_counter()
    for label, prune in (("without_retention", False), ("with_retention", True)):
        with scratch_database(settings.database_url, label.split("_")[0]) as url:
            report[label] = run_load(
                url, hours=hours, runs_per_hour=runs_per_hour, steps=steps, prune=prune
            )
    # Flat: the size once the longest retention has passed, against the size at the end.
    steady = int(max(RETENTION_HOURS.values())) + 1
    for label in ("without_retention", "with_retention"):
        series = [h["total_bytes"] for h in report[label]["by_hour"]]
        if len(series) > steady:
            report[label]["growth_after_steady"] = round(series[-1] / series[steady - 1], 3)
    report["seconds"] = round(time.perf_counter() - began, 1)
    return report


def _mib(n: int) -> str:
    return f"{n / 2**20:8.1f}"


def _cell(table: dict[str, int] | None) -> str:
    return "-" if table is None else f"{_mib(table['table_bytes'])} +{_mib(table['index_bytes'])}"


def print_table(report: dict[str, Any]) -> None:
    off, on = report["without_retention"], report["with_retention"]
    print(
        f"{report['hours']} hours-equivalent of {report['runs_per_hour']} runs/hour, "
        f"{report['steps_per_run']} steps each; retention (hours) {report['retention_hours']}"
    )
    print(f"{'hour':>5} {'without MiB':>12} {'runs':>8} {'with MiB':>10} {'runs':>8}")
    for a, b in zip(off["by_hour"], on["by_hour"], strict=True):
        print(
            f"{a['hour']:>5} {_mib(a['total_bytes']):>12} {a['runs']:>8} "
            f"{_mib(b['total_bytes']):>10} {b['runs']:>8}"
        )
    print(f"\n{'table':<16} {'without: table + index MiB':>28} {'with: table + index MiB':>26}")
    for name in sorted(set(off["tables"]) | set(on["tables"])):
        a, b = off["tables"].get(name), on["tables"].get(name)
        print(f"{name:<16} {_cell(a):>28} {_cell(b):>26}")
    print(
        f"\ngrowth after the longest retention (end / hour "
        f"{int(max(RETENTION_HOURS.values())) + 1}): without {off.get('growth_after_steady')}, "
        f"with {on.get('growth_after_steady')}; pruned {on['pruned_runs']} runs in "
        f"{on['prune_seconds']} s of batches of {report['batch_size']}"
    )


def parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="saga bench retention",
        description="Journal table and index sizes after N hours-equivalent of steady load, "
        "with and without retention (two scratch databases on SAGA_DATABASE_URL's server).",
    )
    p.add_argument("--json", action="store_true")
    p.add_argument("--small", action="store_true", help="a quick run (about 10 s)")
    p.add_argument("--hours", type=int, help="hours-equivalent (default 36; small 16)")
    p.add_argument("--runs-per-hour", type=int, help="default 1000; small 150")
    p.add_argument("--steps", type=int, help="steps per run (default 10)")
    return p


def main(argv: Sequence[str], settings: Settings) -> int:
    args = parser().parse_args(argv)
    size = dict(SIZES["small" if args.small else "default"])
    for name in ("hours", "runs_per_hour", "steps"):
        if getattr(args, name) is not None:
            size[name] = getattr(args, name)
    if min(size.values()) < 1:
        raise ConfigurationError("--hours, --runs-per-hour and --steps must be at least 1")
    report = bench_retention(settings, **size)
    if args.json:
        print(json.dumps(report))
    else:
        print_table(report)
    sys.stdout.flush()
    return 0
