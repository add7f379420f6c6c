"""`saga bench chaos` at CI size: 200 mixed runs under every kind of fault, 0 violations.

The bench brings its own Postgres, Redis and effects server (a flush or a restart touches no
other test's), so this needs nothing from the suite's servers.
"""

from __future__ import annotations

import json
import sys
from pathlib import Path

import pytest

from saga.settings import Settings
from saga_dev.bench_chaos import TERMINAL, ChaosConfig, bench_chaos


@pytest.mark.slow
@pytest.mark.timeout(420)  # the bench's own limits (chaos 200 s, settle 90 s) come first
def test_200_runs_under_chaos_break_no_invariant(tmp_path: Path) -> None:
    cfg = ChaosConfig(runs=200, seed=7, chaos_every=0.7, duration_limit=200.0, settle_seconds=90.0)
    report = bench_chaos(Settings(state_dir=tmp_path / "state"), cfg, log=sys.stderr)
    shown = json.dumps({k: v for k, v in report.items() if k != "chaos_events"}, indent=1)

    assert report["runs_started"] == 200, shown
    assert sum(report["final_states"].values()) == 200, shown
    assert set(report["final_states"]) <= set(TERMINAL), shown
    # The chaos happened: each kind of fault at least once, and runs failed on purpose.
    for count in ("worker_kills", "relay_kills", "broker_flushes", "pg_restarts"):
        assert report[count] >= 1, shown
    assert sum(report["service_faults"].values()) >= 1, shown
    assert report["final_states"].get("compensated", 0) >= 1, shown
    assert report["final_states"].get("failed", 0) >= 1, shown
    assert report["violations"] == 0, shown
