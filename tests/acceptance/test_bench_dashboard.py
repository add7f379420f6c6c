"""`saga bench dashboard --json` generates a (small) journal and times every page through the
real server. Timings are not judged here: this checks the bench works end to end."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import uuid

import psycopg
import pytest
from psycopg.conninfo import make_conninfo

from tests.acceptance.test_bench_smoke import BROKER_URL, REPO
from tests.conftest import ADMIN_URL

INDEXES = "SELECT indexname, indexdef FROM pg_indexes WHERE tablename = 'saga_steps'"
MISFINISHED = """
SELECT count(*) FROM saga_steps
WHERE (finished_at IS NOT NULL) <> (state IN ('completed', 'failed', 'cancelled'))
"""
PAGES = {"list", "list_filtered", "list_error_type", "list_prefix", "list_deep", "run"}


@pytest.mark.timeout(300)
def test_bench_dashboard_reports_every_page(
    admin_conn: psycopg.Connection[tuple[object, ...]], db: psycopg.Connection[tuple[object, ...]]
) -> None:
    name = f"bench_dash_{uuid.uuid4().hex[:10]}"
    env = {k: v for k, v in os.environ.items() if not k.startswith("SAGA_")}
    env.update(SAGA_DATABASE_URL=ADMIN_URL, SAGA_BROKER_URL=BROKER_URL)
    try:
        proc = subprocess.run(
            [
                sys.executable,
                "-m",
                "saga",
                "bench",
                "dashboard",
                "--json",
                "--runs",
                "3000",
                "--requests",
                "5",
                "--database",
                name,
            ],
            cwd=REPO,
            env=env,
            capture_output=True,
            text=True,
            timeout=280,
            check=False,
        )
        assert proc.returncode == 0, proc.stderr[-3000:]
        report = json.loads(proc.stdout)
        assert report["runs"] == 3000 and report["steps"] == 30_000
        assert set(report["pages"]) >= PAGES
        for figures in report["pages"].values():
            assert 0 < figures["p50_ms"] <= figures["p99_ms"] <= figures["max_ms"]
        assert set(report["targets"]) == {"list_under_100ms", "run_under_100ms"}
        with psycopg.connect(make_conninfo(ADMIN_URL, dbname=name)) as conn:
            # The journal's indexes are back after the load, exactly as the migrations made them.
            indexes = set(conn.execute(INDEXES).fetchall())
            states = dict(
                conn.execute("SELECT state, count(*) FROM saga_runs GROUP BY state").fetchall()
            )
            # The generated journal keeps the engine's rule: finished_at set exactly while final.
            (inconsistent,) = conn.execute(MISFINISHED).fetchone() or (None,)
        assert inconsistent == 0
        assert indexes == set(db.execute(INDEXES).fetchall())  # a freshly migrated journal's
        assert states["completed"] == 2700 and states["failed"] == 90
    finally:
        admin_conn.execute(f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)')
