"""Which runs retention may delete, read from the settings (no services)."""

from __future__ import annotations

import pytest
from pydantic import ValidationError

from saga.retention import SETTING_OF_STATE, PruneReport, policy
from saga.settings import Settings
from saga.states import FINAL_RUN_STATES, RunState


def test_every_final_state_and_only_those_has_a_retention_setting() -> None:
    assert set(SETTING_OF_STATE) == FINAL_RUN_STATES
    assert set(SETTING_OF_STATE.values()) <= set(Settings.model_fields)


def test_unset_keeps_every_run() -> None:
    assert policy(Settings()) == {}


def test_policy_names_the_states_set() -> None:
    settings = Settings(retention_completed_seconds=60, retention_failed_seconds=0)
    assert policy(settings) == {RunState.COMPLETED: 60.0, RunState.FAILED: 0.0}


def test_a_negative_retention_is_refused() -> None:
    with pytest.raises(ValidationError, match="retention_cancelled_seconds"):
        Settings(retention_cancelled_seconds=-1)


def test_report_as_json() -> None:
    report = PruneReport(dry_run=True, policy={"completed": 60.0}, runs={"completed": 2}, steps={})
    assert report.as_json() == {
        "dry_run": True,
        "policy_seconds": {"completed": 60.0},
        "runs": {"completed": 2},
        "total_runs": 2,
        "steps": {},
        "complete": True,
    }
