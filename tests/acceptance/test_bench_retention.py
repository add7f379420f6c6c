"""`saga bench retention --json` end to end on tiny numbers: with retention the journal keeps
only the runs inside their retention (and stops growing), without it every run stays."""

from __future__ import annotations

import json
import os
import subprocess
import sys

import pytest

from tests.acceptance.test_bench_smoke import BROKER_URL, REPO
from tests.conftest import ADMIN_URL

BENCH = [sys.executable, "-m", "saga", "bench", "retention"]


@pytest.mark.timeout(300)
def test_bench_retention_keeps_the_journal_flat(admin_conn: object) -> None:
    env = {k: v for k, v in os.environ.items() if not k.startswith("SAGA_")}
    env.update(SAGA_DATABASE_URL=ADMIN_URL, SAGA_BROKER_URL=BROKER_URL)
    proc = subprocess.run(
        [*BENCH, "--json", "--hours", "14", "--runs-per-hour", "20", "--steps", "3"],
        env=env,
        cwd=REPO,
        capture_output=True,
        text=True,
        timeout=240,
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
    report = json.loads(proc.stdout)
    without, with_ = report["without_retention"], report["with_retention"]
    # 20 runs an hour, all completed (the mix puts run 91-100 of each hundred in other
    # states): kept 6 hours, so 120 runs stay; without retention all 280 do.
    assert [h["runs"] for h in without["by_hour"]][-1] == 14 * 20
    assert [h["runs"] for h in with_["by_hour"]][6:] == [120] * 8
    assert with_["by_hour"][-1]["steps"] == 120 * 3
    assert with_["pruned_runs"] == 14 * 20 - 120
    assert set(with_["tables"]) >= {"saga_runs", "saga_steps", "saga_events", "saga_outbox"}
    for name in ("saga_runs", "saga_steps"):
        assert with_["tables"][name]["total_bytes"] < without["tables"][name]["total_bytes"]
