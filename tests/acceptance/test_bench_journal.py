"""`saga bench journal --json` replays each write pattern on its private cluster. What must hold
whatever the machine: each shape writes exactly the rows its statements say, today's claims are
HOT updates, and every shape writes WAL."""

from __future__ import annotations

import json
import os
import subprocess
import sys

import pytest

from tests.acceptance.test_bench_smoke import REPO

RUNS, STEPS = 4, 3


@pytest.mark.timeout(200)
def test_bench_journal_counts_each_shape() -> None:
    env = {k: v for k, v in os.environ.items() if not k.startswith("SAGA_")}
    # The bench makes its own cluster; the settings only have to be valid.
    env.update(SAGA_DATABASE_URL="postgresql://unused@127.0.0.1:1/unused")
    args = ["--json", "--runs", str(RUNS), "--steps", str(STEPS)]
    proc = subprocess.run(
        [sys.executable, "-m", "saga", "bench", "journal", *args],
        cwd=REPO,
        env=env,
        capture_output=True,
        text=True,
        timeout=180,
        check=False,
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
    shapes = json.loads(proc.stdout)["shapes"]
    assert set(shapes) == {
        f"{shape}_{lock}"
        for shape in ("today", "claim_inserts", "claim_inserts_lean")
        for lock in ("row_lock", "advisory_lock")
    }
    # Per run: the run's insert and finish; per step, today: inserted, claimed, finished.
    today = round((2 + 3 * STEPS) / STEPS, 3)
    # The redesign: the claim inserts the row, the outcome updates it.
    claim_inserts = round((2 + 2 * STEPS) / STEPS, 3)
    for name, figures in shapes.items():
        expected = today if name.startswith("today") else claim_inserts
        assert figures["rows_per_step"] == expected, (name, figures)
        assert figures["wal_bytes_per_step"] > 0
        assert figures["index_entries_per_step"] > 0
        if name.startswith("today"):
            assert figures["hot_updates_per_step"] == 1.0, (name, figures)  # every claim

    def locks(name: str) -> float:
        return float(shapes[name]["wal_by_record"].get("Heap/LOCK", {}).get("records", 0))

    # The row lock logs a record the advisory lock does not (where no other lock covers it).
    assert locks("claim_inserts_row_lock") > locks("claim_inserts_advisory_lock")
    # Without the foreign key, nothing but the run's row lock locks the run row.
    assert locks("claim_inserts_lean_advisory_lock") < locks("claim_inserts_advisory_lock")
