"""`saga bench peers --json` runs both sides end to end on its private Postgres and reports the
figures the issue asks for. Timings are not judged (they depend on the machine); the counts are
checked only for what must hold whatever the machine: a step writes rows and WAL on each side."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[2]
BROKER_URL = os.environ.get("SAGA_TEST_BROKER_URL", "redis://127.0.0.1:6379/15")


@pytest.mark.timeout(400)
def test_bench_peers_reports_both_sides() -> None:
    env = {k: v for k, v in os.environ.items() if not k.startswith("SAGA_")}
    # The bench makes its own Postgres cluster; the database URL only has to be a valid setting.
    env.update(SAGA_DATABASE_URL="postgresql://unused@127.0.0.1:1/unused")
    env.update(SAGA_BROKER_URL=BROKER_URL, SAGA_QUEUE="peers-smoke")
    # Postgres counters need the full settle (an idle backend reports every 10 s): one workload.
    args = ["--runs", "20", "--one-step-runs", "0", "--repeat", "1"]
    proc = subprocess.run(
        [sys.executable, "-m", "saga", "bench", "peers", "--json", *args],
        cwd=REPO,
        env=env,
        capture_output=True,
        text=True,
        timeout=380,
    )
    assert proc.returncode == 0, proc.stderr[-4000:]
    report = json.loads(proc.stdout)
    assert report["throughput_vs_dbos"] > 0
    for side in ("saga", "dbos"):
        assert report["wal_bytes_per_step"][side] > 0, report
        assert report["rows_per_step"][side] > 0, report
    for side in ("saga", "dbos"):
        figures = report["10_step_runs"][side]
        assert figures["steps_per_s"] > 0
        assert figures["transactions_per_step"] > 0
        assert figures["wal_by_record"], side
    # Each step of the engine's runs inserts its journal row once.
    assert report["10_step_runs"]["saga"]["rows_by_table"]["saga_steps"]["inserts"] == 1.0
