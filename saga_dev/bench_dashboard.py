"""``saga bench dashboard``: page latencies of the web dashboard on a big journal.

It makes a database of its own (``--database``, dropped and made again), migrates it, fills it
with ``--runs`` runs (default a million) of ``--steps`` steps each (default 10: ten million
step rows) in a few ``INSERT ... SELECT generate_series`` statements, with the states, sagas,
errors and times spread the way a busy service would have them, and a failed attempt kept for
the runs that failed. Then it starts the real dashboard server (read-only) on a free loopback
port and times, over HTTP, each of:

- ``list``: the runs list's first page (``/``, with its counts per state);
- ``list_filtered``: the list filtered by state and saga;
- ``list_error_type``, ``list_prefix``: filtered by error type (and a time), by a run id
  prefix of 3 characters (about 250 runs of a million);
- ``list_deep``: a keyset page far down the list (its cursor found by walking the JSON API);
- ``run``: a run's page (its steps, attempts, events), for random runs;
- ``api_runs``, ``api_run``: the same through the JSON API.

Each is requested ``--requests`` times after a warm-up; the report gives p50 and p99 in ms.
"""

from __future__ import annotations

import argparse
import contextlib
import http.client
import itertools
import json
import random
import statistics
import sys
import time
from collections.abc import Sequence
from typing import IO, Any
from urllib.parse import urlencode, urlsplit

import psycopg
from psycopg import sql
from psycopg.conninfo import make_conninfo

from saga.errors import ConfigurationError
from saga.migrate import migrate
from saga.settings import Settings
from saga_dev.bench import run_and_print

SAGAS = ("book_trip", "research_agent", "summarise_page", "travel_agent", "order")
ERRORS = ("PaymentDeclined", "TimeoutError", "HTTPError", "StepTimeoutError", "ValueError")

# State by i %% 1000: 1.5% running, 3% failed, 4% compensated, 1% cancelled,
# 0.5% compensation_failed, the rest completed.
RUN_STATE: str = """
CASE WHEN i %% 1000 < 15 THEN 'running'
     WHEN i %% 1000 < 45 THEN 'failed'
     WHEN i %% 1000 < 85 THEN 'compensated'
     WHEN i %% 1000 < 95 THEN 'cancelled'
     WHEN i %% 1000 < 100 THEN 'compensation_failed'
     ELSE 'completed' END
"""

INSERT_RUNS = """
INSERT INTO saga_runs (run_id, saga_name, saga_ref, saga_version, state, input, result, error,
                       trace_context, created_at, updated_at, finished_at)
SELECT md5(i::text), s.name, 'bench.sagas:' || s.name, '1', st.state,
       jsonb_build_object('n', i, 'city', 'Lisbon'),
       CASE WHEN st.state = 'completed' THEN jsonb_build_object('ok', true, 'n', i) END,
       CASE WHEN st.state IN ('completed', 'running') THEN NULL
            ELSE jsonb_build_object('type', (%(errors)s::text[])[1 + i %% 5],
                                    'message', 'step 7 failed for good in run ' || i) END,
       jsonb_build_object('traceparent',
                          '00-' || md5('t' || i) || '-' || left(md5('s' || i), 16) || '-01'),
       t.created, t.created + interval '1 second',
       CASE WHEN st.state NOT IN ('running') THEN t.created + interval '20 seconds' END
FROM generate_series(%(first)s::bigint, %(last)s::bigint) AS i
CROSS JOIN LATERAL (SELECT (%(sagas)s::text[])[1 + i %% 5] AS name) s
CROSS JOIN LATERAL (SELECT {state} AS state) st
CROSS JOIN LATERAL (SELECT now() - (%(total)s::bigint - i) * interval '2 seconds' AS created) t
"""

INSERT_STEPS = """
INSERT INTO saga_steps (run_id, step_key, step_name, kind, seq, position, state, fn_ref, options,
                        attempt, max_attempts, idempotency_key, input, result, error,
                        lease_owner, created_at, started_at, attempt_started_at, finished_at,
                        completed_seq)
SELECT r.run_id, 'step' || k || '#' || k, 'step' || k, 'action', k, k,
       CASE WHEN r.state = 'running' AND k > 5 THEN 'dispatched'
            WHEN r.state IN ('failed', 'compensated', 'cancelled', 'compensation_failed')
                 AND k = 7 THEN 'failed'
            WHEN r.state <> 'completed' AND r.state <> 'running' AND k > 7 THEN 'cancelled'
            ELSE 'completed' END,
       'bench.steps:step' || k, '{}', 1, 3, r.run_id || ':step' || k || '#' || k,
       jsonb_build_object('k', k, 'text', 'some input for step ' || k),
       jsonb_build_object('k', k, 'answer', 'a result of a few words'), NULL,
       'worker-' || (k %% 4) || '@bench:' || (1000 + k),
       r.created_at + k * interval '1 second', r.created_at + k * interval '1 second',
       r.created_at + k * interval '1 second',
       -- set exactly while a step is final (migration 0011): not on the dispatched ones
       CASE WHEN NOT (r.state = 'running' AND k > 5)
            THEN r.created_at + k * interval '1.5 second' END,
       NULL
FROM saga_runs r CROSS JOIN generate_series(1, %(steps)s::int) AS k
WHERE r.run_id >= %(low)s AND r.run_id < %(high)s
"""

# One failed attempt kept for each run that failed at step 7 (when the history tables exist).
INSERT_ATTEMPTS = """
INSERT INTO saga_attempts (run_id, step_key, attempt, worker, claimed_at, finished_at, outcome,
                           error_type, error_message, traceback)
SELECT run_id, step_key, 1, lease_owner, attempt_started_at, finished_at, 'failed',
       'TimeoutError', 'the service did not answer', 'Traceback (most recent call last): ...'
FROM saga_steps WHERE state = 'failed'
"""


def parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="saga bench dashboard",
        description="Dashboard page latencies on a generated journal (default 1M runs, 10M steps).",
    )
    p.add_argument("--runs", type=int, default=1_000_000)
    p.add_argument("--steps", type=int, default=10, help="steps per run")
    p.add_argument("--requests", type=int, default=100, help="timed requests per page")
    p.add_argument("--database", default="saga_bench_dashboard", help="dropped and made again")
    p.add_argument("--reuse", action="store_true", help="keep the database if it has the runs")
    p.add_argument("--seed", type=int, default=1)
    p.add_argument("--json", action="store_true")
    return p


def _admin_url(settings: Settings) -> str:
    if not settings.database_url:
        raise ConfigurationError("saga bench dashboard needs SAGA_DATABASE_URL (a Postgres server)")
    return settings.database_url


def generate(url: str, runs: int, steps: int, log: IO[str]) -> dict[str, float]:
    """Fill a migrated, empty journal. Returns the seconds each part took."""
    took: dict[str, float] = {}
    with psycopg.connect(url, autocommit=True) as conn:
        conn.execute("SET synchronous_commit = off")
        conn.execute("SET maintenance_work_mem = '512MB'")
        conn.execute("SET work_mem = '64MB'")
        start = time.monotonic()
        chunk = 250_000
        for first in range(1, runs + 1, chunk):
            last = min(first + chunk - 1, runs)
            conn.execute(
                sql.SQL(INSERT_RUNS.format(state=RUN_STATE)),
                {
                    "first": first,
                    "last": last,
                    "total": runs,
                    "sagas": list(SAGAS),
                    "errors": list(ERRORS),
                },
            )
            print(f"  runs {last:,}/{runs:,}  {time.monotonic() - start:.0f} s", file=log)
        took["runs_seconds"] = time.monotonic() - start
        start = time.monotonic()
        # Ten million rows go in much faster without their indexes (built once, by sorting,
        # afterwards) and without a foreign-key check per row (the runs are there): the
        # journal's indexes are taken off for the load and put back exactly as they were.
        restore = _drop_step_indexes(conn)
        with contextlib.suppress(psycopg.errors.InsufficientPrivilege):
            conn.execute("SET session_replication_role = replica")  # no FK triggers
        bounds = [f"{i:x}" for i in range(16)] + ["g"]
        for low, high in itertools.pairwise(bounds):
            conn.execute(sql.SQL(INSERT_STEPS), {"steps": steps, "low": low, "high": high})
            print(f"  steps for runs {low}…  {time.monotonic() - start:.0f} s", file=log)
        conn.execute("SET session_replication_role = DEFAULT")
        took["steps_seconds"] = time.monotonic() - start
        start = time.monotonic()
        for statement in restore:
            conn.execute(sql.SQL(statement))
        print(f"  indexes rebuilt  {time.monotonic() - start:.0f} s", file=log)
        took["index_seconds"] = time.monotonic() - start
        if conn.execute("SELECT to_regclass('saga_attempts')").fetchone() != (None,):
            conn.execute(sql.SQL(INSERT_ATTEMPTS))
        start = time.monotonic()
        conn.execute("VACUUM ANALYZE")
        took["analyze_seconds"] = time.monotonic() - start
    return took


STEP_CONSTRAINTS = """
SELECT conname, pg_get_constraintdef(oid) FROM pg_constraint
WHERE conrelid = 'saga_steps'::regclass AND contype IN ('p', 'u')
  AND NOT EXISTS (SELECT FROM pg_constraint f WHERE f.confrelid = 'saga_steps'::regclass)
"""
STEP_INDEXES = """
SELECT indexrelid::regclass::text, pg_get_indexdef(indexrelid) FROM pg_index
WHERE indrelid = 'saga_steps'::regclass
  AND NOT EXISTS (SELECT FROM pg_constraint c WHERE c.conindid = pg_index.indexrelid)
"""


def _drop_step_indexes(conn: psycopg.Connection[Any]) -> list[str]:
    """Drop saga_steps' indexes and unique constraints; the statements that restore them."""
    restore = []
    for name, definition in conn.execute(STEP_CONSTRAINTS).fetchall():
        conn.execute(
            sql.SQL("ALTER TABLE saga_steps DROP CONSTRAINT {}").format(sql.Identifier(name))
        )
        restore.append(f'ALTER TABLE saga_steps ADD CONSTRAINT "{name}" {definition}')
    for name, definition in conn.execute(STEP_INDEXES).fetchall():
        conn.execute(sql.SQL("DROP INDEX {}").format(sql.Identifier(name)))
        restore.append(definition)
    return restore


def _fresh_database(admin_url: str, name: str, reuse: bool, runs: int) -> tuple[str, bool]:
    url = make_conninfo(admin_url, dbname=name)
    with psycopg.connect(admin_url, autocommit=True) as admin:
        exists = admin.execute("SELECT 1 FROM pg_database WHERE datname = %s", (name,)).fetchone()
        if exists and reuse:
            with psycopg.connect(url) as conn:
                row = conn.execute("SELECT count(*) FROM saga_runs").fetchone()
            if row and row[0] == runs:
                migrate(url)
                return url, True
        admin.execute(
            sql.SQL("DROP DATABASE IF EXISTS {} WITH (FORCE)").format(sql.Identifier(name))
        )
        admin.execute(sql.SQL("CREATE DATABASE {}").format(sql.Identifier(name)))
    migrate(url)
    return url, False


class _Client:
    """One keep-alive-less HTTP client, as a browser's first request would be."""

    def __init__(self, base: str) -> None:
        parts = urlsplit(base)
        self.host, self.port = parts.hostname or "127.0.0.1", parts.port or 80

    def get(self, path: str) -> tuple[float, int, bytes]:
        start = time.perf_counter()
        conn = http.client.HTTPConnection(self.host, self.port, timeout=60)
        conn.request("GET", path, headers={"Host": f"127.0.0.1:{self.port}"})
        response = conn.getresponse()
        body = response.read()
        conn.close()
        return (time.perf_counter() - start) * 1000, response.status, body


def _percentiles(samples: list[float]) -> dict[str, float]:
    ordered = sorted(samples)
    p99 = ordered[min(len(ordered) - 1, round(0.99 * (len(ordered) - 1)))]
    return {
        "p50_ms": round(statistics.median(ordered), 2),
        "p99_ms": round(p99, 2),
        "max_ms": round(ordered[-1], 2),
    }


def measure(base: str, url: str, requests: int, seed: int) -> dict[str, dict[str, float]]:
    client = _Client(base)
    rng = random.Random(seed)
    with psycopg.connect(url) as conn:
        total = conn.execute("SELECT count(*) FROM saga_runs").fetchone()
    n = int(total[0]) if total else 0
    # A cursor far down the list: walk the JSON API, 500 runs a page.
    cursor = None
    for _ in range(min(20, max(1, n // 500))):
        _, status, body = client.get(
            "/api/runs?" + urlencode({"limit": 500, **({"cursor": cursor} if cursor else {})})
        )
        if status != 200:
            raise RuntimeError(f"/api/runs answered {status}: {body[:200]!r}")
        cursor = json.loads(body)["next_cursor"] or cursor
    run_ids = [
        f"{__import__('hashlib').md5(str(rng.randint(1, n)).encode()).hexdigest()}"
        for _ in range(requests)
    ]
    pages: dict[str, list[str]] = {
        "list": ["/?refresh=0"] * requests,
        "list_filtered": [
            "/?" + urlencode({"state": "failed", "saga": SAGAS[i % 5]}) for i in range(requests)
        ],
        "list_error_type": [
            "/?" + urlencode({"error_type": ERRORS[i % 5], "created_until": "2099-01-01T00:00"})
            for i in range(requests)
        ],
        "list_prefix": [f"/?run_id_prefix={i * 37 % 4096:03x}" for i in range(requests)],
        "list_deep": ["/?" + urlencode({"cursor": cursor or ""})] * requests,
        "run": [f"/runs/{r}" for r in run_ids],
        "api_runs": ["/api/runs"] * requests,
        "api_run": [f"/api/runs/{r}" for r in run_ids],
    }
    report: dict[str, dict[str, float]] = {}
    for name, paths in pages.items():
        for path in paths[:3]:  # warm-up: plans cached, pages in Postgres's buffers
            client.get(path)
        samples = []
        for path in paths:
            ms, status, body = client.get(path)
            if status != 200:
                raise RuntimeError(f"{path} answered {status}: {body[:300]!r}")
            samples.append(ms)
        report[name] = _percentiles(samples)
    return report


def bench_dashboard(settings: Settings, args: argparse.Namespace, log: IO[str]) -> dict[str, Any]:
    from saga.dashboard.server import DashboardServer

    admin = _admin_url(settings)
    url, reused = _fresh_database(admin, args.database, args.reuse, args.runs)
    took: dict[str, float] = {}
    if not reused:
        print(f"generating {args.runs:,} runs x {args.steps} steps in {args.database}", file=log)
        took = generate(url, args.runs, args.steps, log)
    with psycopg.connect(url) as conn:
        row = conn.execute(
            "SELECT pg_size_pretty(pg_database_size(current_database())), "
            "(SELECT count(*) FROM saga_steps)"
        ).fetchone()
    size, step_rows = (row[0], int(row[1])) if row else ("?", 0)
    bench_settings = settings.model_copy(update={"database_url": url, "dashboard_token": None})
    server = DashboardServer(bench_settings, host="127.0.0.1", port=0, read_only=True)
    try:
        server.start()
        pages = measure(server.url, url, args.requests, args.seed)
    finally:
        server.close()
    targets = {
        "list_under_100ms": pages["list"]["p99_ms"] < 100,
        "run_under_100ms": pages["run"]["p99_ms"] < 100,
    }
    return {
        "suite": "dashboard",
        "runs": args.runs,
        "steps": step_rows,
        "database_size": size,
        "generated": {k: round(v, 1) for k, v in took.items()} or "reused",
        "requests_per_page": args.requests,
        "pages": pages,
        "targets": targets,
    }


def print_table(report: dict[str, Any], out: IO[str]) -> None:
    print(
        f"dashboard on {report['runs']:,} runs, {report['steps']:,} steps "
        f"({report['database_size']}); generated: {report['generated']}",
        file=out,
    )
    print(f"{'page':<16}{'p50 ms':>10}{'p99 ms':>10}{'max ms':>10}", file=out)
    for name, f in report["pages"].items():
        print(f"{name:<16}{f['p50_ms']:>10}{f['p99_ms']:>10}{f['max_ms']:>10}", file=out)
    print(f"targets: {report['targets']}", file=out)


def main(argv: Sequence[str], settings: Settings) -> int:
    args = parser().parse_args(argv)
    if args.runs < 1 or args.steps < 1 or args.requests < 1:
        raise ConfigurationError("--runs, --steps and --requests must be at least 1")
    return run_and_print(
        lambda: bench_dashboard(settings, args, sys.stderr),
        print_table,
        args.json,
        (psycopg.Error, OSError, RuntimeError),
    )
