"""`saga prune` in a subprocess: a dry run counts and deletes nothing; a real run deletes."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from typing import Any

import psycopg

from tests.conftest import BROKER_URL
from tests.integration.test_retention import add_run, run_ids

Conn = psycopg.Connection[Any]


def prune(database_url: str, *args: str, **settings: str) -> subprocess.CompletedProcess[str]:
    env = {k: v for k, v in os.environ.items() if not k.startswith("SAGA_")}
    env.update(SAGA_DATABASE_URL=database_url, SAGA_BROKER_URL=BROKER_URL, **settings)
    return subprocess.run(
        [sys.executable, "-m", "saga", "prune", *args],
        env=env,
        capture_output=True,
        text=True,
        timeout=60,
        check=True,
    )


def test_dry_run_counts_then_prune_deletes(database_url: str, db: Conn) -> None:
    add_run(db, "old-1", "completed", 7200)
    add_run(db, "old-2", "completed", 7200)
    add_run(db, "young", "completed", 60)
    add_run(db, "failed-old", "failed", 7200)  # failed runs have no retention set: kept
    add_run(db, "running", "running", None)
    keep_an_hour = {"SAGA_RETENTION_COMPLETED_SECONDS": "3600"}

    dry = prune(database_url, "--dry-run", "--json", **keep_an_hour)
    report = json.loads(dry.stdout)
    assert report["dry_run"] is True
    assert report["runs"] == {"completed": 2}
    assert report["steps"] == {"completed": 6}
    assert len(run_ids(db)) == 5, "a dry run deletes nothing"

    text = prune(database_url, "--dry-run", **keep_an_hour).stdout
    assert "would delete 2 runs (6 steps)" in text

    done = json.loads(prune(database_url, "--json", **keep_an_hour).stdout)
    assert done["dry_run"] is False and done["runs"] == {"completed": 2}
    assert run_ids(db) == {"young", "failed-old", "running"}


def test_without_retention_nothing_is_deleted_and_it_says_why(database_url: str, db: Conn) -> None:
    add_run(db, "ancient", "completed", 10**7)
    out = prune(database_url)
    assert "no retention is set" in out.stderr
    assert "deleted 0 finished runs" in out.stdout
    assert run_ids(db) == {"ancient"}
