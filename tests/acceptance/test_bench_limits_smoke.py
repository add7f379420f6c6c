"""`saga bench limits --json` runs a small version end to end (60 runs; a rate limit of 10 per
second, so about 5 s of work) and reports the figures issue 13 asks for. The maxima the service
measured are checked against the limits; the achieved share of the rate limit and the delays
depend on the machine and are only checked to be there."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[2]
BROKER_URL = os.environ.get("SAGA_TEST_BROKER_URL", "redis://127.0.0.1:6379/15")

KEYS = (
    "max_concurrency_observed",
    "concurrency_limit",
    "max_rate_observed",
    "rate_limit",
    "rate_window_seconds",
    "rate_fraction",
    "rate_fraction_definition",
    "slot_to_next_start_ms",
    "budget_to_next_start_ms",
    "engine",
    "rate_guard_ms",
    "handover",
)


@pytest.mark.timeout(300)
def test_bench_limits_reports_the_figures_within_the_limits(bench_database_url: str) -> None:
    env = {k: v for k, v in os.environ.items() if not k.startswith("SAGA_")}
    env.update(
        SAGA_DATABASE_URL=bench_database_url,
        SAGA_BROKER_URL=BROKER_URL,
        SAGA_QUEUE="bench-limits-smoke",
    )
    args = ["--runs", "60", "--tenants", "5", "--rate", "10", "--threads", "6"]
    args += ["--handover-runs", "15"]
    proc = subprocess.run(
        [sys.executable, "-m", "saga", "bench", "limits", "--json", *args],
        cwd=REPO,
        env=env,
        capture_output=True,
        text=True,
        timeout=280,
    )
    assert proc.returncode == 0, proc.stderr[-4000:]
    report = json.loads(proc.stdout)
    for key in KEYS:
        assert key in report, key
    assert report["runs"] == 60
    assert report["concurrency_limit"] == 3
    assert report["rate_limit"] == 10 and report["rate_window_seconds"] == 1.0
    # Measured by the service the steps called: never above the limits.
    assert 1 <= report["max_concurrency_observed"] <= report["concurrency_limit"], report
    assert 1 <= report["max_rate_observed"] <= report["rate_limit"], report
    # And by the engine's own books.
    assert report["engine"]["grants"] == 60
    assert report["engine"]["max_rate_granted"] <= report["rate_limit"], report
    assert report["rate_fraction"] is not None and report["rate_fraction"] > 0
    handover = report["handover"]
    assert handover["runs"] == 15
    # One tenant's slots were the bottleneck there: its limit reached, and held.
    assert handover["max_concurrency_observed"] == report["concurrency_limit"], report
    delays = [report[k] for k in ("slot_to_next_start_ms", "budget_to_next_start_ms")]
    delays.append(handover["slot_to_next_start_ms"])
    for figure in delays:
        assert figure["count"] > 0, report
        assert figure["p50"] is not None and figure["p99"] is not None
