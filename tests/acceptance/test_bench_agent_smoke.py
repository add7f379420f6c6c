"""`saga bench agent` end to end on a tiny workload: the four systems run and report."""

from __future__ import annotations

import pytest

from saga.settings import Settings
from saga_dev.bench_agent import SYSTEMS, bench_agent

FIELDS = {"completion", "model_calls", "model_calls_needed", "steps_rerun", "duplicate_effects"}


@pytest.mark.slow
def test_the_agent_bench_runs_the_four_systems(
    settings: Settings, monkeypatch: pytest.MonkeyPatch
) -> None:
    # The bench points this process at its servers (its plain script runs here): undo after.
    for name in (
        "SAGA_MODEL_BASE_URL",
        "SAGA_MODEL_NAME",
        "SAGA_MODEL_TIMEOUT_SECONDS",
        "TRAVEL_SERVICE_URL",
        "TRAVEL_SERVICE_TIMEOUT",
    ):
        monkeypatch.delenv(name, raising=False)
    report = bench_agent(settings, 3, 3, 0.15, attempts=8, kill_every=3.0, seed=1)
    assert set(report["systems"]) == set(SYSTEMS)
    for name, figures in report["systems"].items():
        assert set(figures) >= FIELDS, name
    for name in ("saga", "saga_with_kills"):
        assert all(report["targets"][name].values()), report["systems"][name]
