"""Bad input at the edge: refused with a clear error, and nothing written."""

from __future__ import annotations

import math
import subprocess
import sys
from collections import Counter
from typing import Any

import psycopg
import pytest

from saga import InputError, SagaClient, Settings
from tests import coordinator_sagas as cs
from tests.processes import ProcessGroup

Conn = psycopg.Connection[Any]


def runs(db: Conn) -> int:
    return int(db.execute("SELECT count(*) FROM saga_runs").fetchone()[0])  # type: ignore[index]


def test_a_run_input_over_the_limit_is_refused(settings: Settings, db: Conn) -> None:
    small = settings.model_copy(update={"max_input_bytes": 100})
    with SagaClient(small) as client, pytest.raises(InputError, match="SAGA_MAX_INPUT_BYTES"):
        client.start(cs.modelled, "x" * 200)
    assert runs(db) == 0


def test_a_run_input_with_nan_is_refused(client: SagaClient, db: Conn) -> None:
    with pytest.raises(InputError, match="NaN and infinite"):
        client.start(cs.approval, {"item": "x", "price": math.nan})
    assert runs(db) == 0


def test_event_payloads_and_names_are_checked(settings: Settings, client: SagaClient) -> None:
    run_id = client.start(cs.approval, {"item": "x"})
    with pytest.raises(InputError, match="NaN and infinite"):
        client.send_event(run_id, "approval", {"ok": math.inf})
    with pytest.raises(InputError, match="must match"):
        client.send_event(run_id, "bad name\x00", True)
    small = settings.model_copy(update={"max_input_bytes": 50})
    with SagaClient(small) as c, pytest.raises(InputError, match="over the limit of 50 bytes"):
        c.send_event(run_id, "approval", {"note": "y" * 100})


def saga_cli(settings: Settings, *args: str, **env: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "saga", *args],
        env={**settings.child_env(), **env},
        capture_output=True,
        text=True,
        timeout=120,
    )


def test_saga_start_with_an_input_that_does_not_fit_exits_2(settings: Settings, db: Conn) -> None:
    done = saga_cli(settings, "start", "tests.coordinator_sagas:trip", "--input", '{"town": 1}')
    assert done.returncode == 2, done.stderr
    assert "the input does not fit the parameter of tests.coordinator_sagas:quote" in done.stderr
    assert "Traceback" not in done.stderr
    done = saga_cli(settings, "start", "tests.coordinator_sagas:trip", "--input", '{"x": 1e999}')
    assert done.returncode == 2 and "out of a number's range" in done.stderr, done.stderr
    assert runs(db) == 0


def test_a_bad_setting_exits_2_with_the_setting_named(settings: Settings) -> None:
    done = saga_cli(settings, "show", "nope", SAGA_LEASE_SECONDS="-1")
    assert done.returncode == 2, done.stderr
    assert "invalid settings" in done.stderr and "SAGA_LEASE_SECONDS" in done.stderr
    assert "Traceback" not in done.stderr


def test_workflow_steps_take_pydantic_models_first_and_later(
    settings: Settings, procs: ProcessGroup, client: SagaClient, db: Conn
) -> None:
    procs.relay(settings)
    procs.worker(settings, "w1")
    run_id = client.start(cs.modelled, "hi")
    assert client.result(run_id, timeout=60) == {"text": "HI!", "turn": 2}
    rows = db.execute("SELECT step FROM test_calls WHERE run_id = %s", (run_id,)).fetchall()
    assert Counter(r[0] for r in rows) == {"answer#1": 1, "answer#2": 1}
    steps = {s.step_key: s for s in client.steps(run_id)}
    assert steps["answer#2"].attempt == 1  # the step before it was not run again either


def test_a_result_postgres_cannot_store_fails_the_attempt_once_naming_the_cause(
    settings: Settings, procs: ProcessGroup, client: SagaClient, db: Conn
) -> None:
    procs.relay(settings)
    procs.worker(settings, "w1")
    run_id = client.start(cs.nul_result, None)
    run = client.wait(run_id, timeout=60)
    assert run.state == "failed"
    assert "NUL character" in run.error["message"] and run_id in run.error["message"]
    [journaled] = client.steps(run_id)
    rows = db.execute("SELECT attempt FROM test_calls WHERE run_id = %s", (run_id,)).fetchall()
    assert [r[0] for r in rows] == [1] == [journaled.attempt], "one call per journaled attempt"


REFUSE_RESULTS = """
CREATE FUNCTION refuse_marked_results() RETURNS trigger LANGUAGE plpgsql AS $$
BEGIN
    RAISE EXCEPTION 'refused by the test' USING ERRCODE = 'check_violation';
END;
$$;
CREATE TRIGGER refuse_marked_results BEFORE UPDATE ON saga_steps FOR EACH ROW
    WHEN (NEW.result::text LIKE '%refuse-me%') EXECUTE FUNCTION refuse_marked_results();
"""


def test_an_outcome_postgres_refuses_is_journaled_as_a_failure_and_not_run_again(
    settings: Settings, procs: ProcessGroup, client: SagaClient, db: Conn
) -> None:
    db.execute(REFUSE_RESULTS)  # Postgres itself refuses the step's result at commit
    procs.relay(settings)
    procs.worker(settings, "w1")
    run_id = client.start(cs.refused_result, None)
    run = client.wait(run_id, timeout=60)
    # The step's outcome is unknown (it ran, its result is lost): it is compensated.
    assert run.state == "compensated", run
    steps = {s.step_key: s for s in client.steps(run_id)}
    failed = steps["returns_refused"]
    assert (failed.state, failed.attempt) == ("failed", 1)
    assert "could not be journaled" in failed.error["message"]
    assert "refused by the test" in failed.error["message"]
    assert steps["compensate:returns_refused"].state == "completed"
    rows = db.execute(
        "SELECT step FROM test_calls WHERE run_id = %s ORDER BY id", (run_id,)
    ).fetchall()
    assert [r[0] for r in rows] == ["returns_refused", "compensate:returns_refused"]
