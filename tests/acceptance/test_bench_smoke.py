"""`saga bench core --json` runs end to end and reports every figure. Timings are not judged:
they depend on the machine; this checks that the bench works, not that the engine is fast."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import psycopg
import pytest

REPO = Path(__file__).resolve().parents[2]
BROKER_URL = os.environ.get("SAGA_TEST_BROKER_URL", "redis://127.0.0.1:6379/15")

FIGURES = (
    "raw_ms_per_step",
    "saga_ms_per_step",
    "latency_ratio",
    "raw_steps_per_s",
    "saga_steps_per_s",
    "throughput_ratio",
)


@pytest.mark.timeout(300)
def test_bench_core_reports_every_figure(bench_database_url: str) -> None:
    env = {k: v for k, v in os.environ.items() if not k.startswith("SAGA_")}
    env.update(
        SAGA_DATABASE_URL=bench_database_url,
        SAGA_BROKER_URL=BROKER_URL,
        SAGA_QUEUE="bench-smoke",
    )
    proc = subprocess.run(
        [
            sys.executable,
            "-m",
            "saga",
            "bench",
            "core",
            "--json",
            "--runs",
            "50",
            "--repeat",
            "1",
            "--steps",
            "10",
        ],
        cwd=REPO,
        env=env,
        capture_output=True,
        text=True,
        timeout=280,
    )
    assert proc.returncode == 0, proc.stderr[-4000:]
    report = json.loads(proc.stdout)  # exactly one JSON object on stdout
    for name in FIGURES:
        assert isinstance(report[name], (int, float)) and report[name] > 0, (name, report)
    assert (report["steps"], report["runs"], report["repeat"]) == (10, 50, 1)
    assert report["broker"] == BROKER_URL.split(":", 1)[0]
    for target in ("latency_ratio", "throughput_ratio"):
        assert isinstance(report["targets"][target]["pass"], bool)
    # The bench leaves no runs behind.
    with psycopg.connect(bench_database_url) as conn:
        assert conn.execute("SELECT count(*) FROM saga_runs").fetchone() == (0,)
