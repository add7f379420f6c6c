"""A run's history on real workers: every attempt of a step with its worker and outcome (failed
and retried, lost with a worker killed by SIGKILL, the one that finished), read back through
saga.runs_view as `saga show` and the dashboard read it."""

from __future__ import annotations

from collections.abc import Iterator
from typing import Any

import psycopg
import pytest

from saga import SagaClient, Settings
from saga.runs_view import RunsView
from tests import sagas
from tests.processes import ProcessGroup, wait_until

Conn = psycopg.Connection[Any]


@pytest.fixture
def view(database_url: str) -> Iterator[RunsView]:
    with RunsView(database_url) as v:
        yield v


def test_a_step_failing_twice_then_succeeding_shows_three_attempts(
    settings: Settings, procs: ProcessGroup, client: SagaClient, view: RunsView, db: Conn
) -> None:
    procs.relay(settings)
    procs.worker(settings, "w1")
    run_id = client.start(sagas.two, {"fail_at": [1], "fail_times": 2})
    assert client.result(run_id, timeout=60)["trail"] == [1, 2]
    detail = view.run_detail(run_id)
    assert detail is not None
    step1, step2 = detail.steps
    assert [(a.attempt, a.outcome) for a in step1.attempts] == [
        (1, "failed"),
        (2, "failed"),
        (3, "completed"),
    ]
    assert all(a.worker and a.claimed_at and a.finished_at for a in step1.attempts)
    first = step1.attempts[0]
    assert first.error_type == "tests.sagas.Flaky"
    assert first.message == "step1 fails on attempt 1 as asked"
    assert first.traceback and "Flaky" in first.traceback
    assert [a.outcome for a in step2.attempts] == ["completed"]
    # Only the two retried attempts were written as rows of their own.
    kept = db.execute("SELECT count(*) FROM saga_attempts WHERE run_id = %s", (run_id,))
    assert kept.fetchone() == (2,)


def test_a_worker_killed_mid_step_shows_the_lost_attempt_and_the_one_that_resumed(
    settings: Settings, procs: ProcessGroup, client: SagaClient, view: RunsView, db: Conn
) -> None:
    procs.relay(settings)
    doomed = procs.worker(settings, "doomed")
    run_id = client.start(sagas.two, {"block_at": 2})
    wait_until(lambda: sagas.calls(db, run_id)["step2"] == 1, 60, "step 2 to start")
    doomed.kill()  # SIGKILL, mid-step
    procs.worker(settings, "survivor")
    assert client.result(run_id, timeout=60)["trail"] == [1, 2]
    detail = view.run_detail(run_id)
    assert detail is not None
    lost, resumed = detail.steps[1].attempts
    assert (lost.attempt, lost.outcome, lost.error_type) == (1, "lost", "LeaseExpired")
    assert (resumed.attempt, resumed.outcome) == (2, "completed")
    assert lost.worker and resumed.worker

    def process(owner: str | None) -> str:  # host:pid:boot, without the delivery's own id
        return (owner or "").rsplit(":", 1)[0]

    assert process(lost.worker) != process(resumed.worker)
    # Step 1 ran on the doomed worker too.
    assert process(detail.steps[0].attempts[0].worker) == process(lost.worker)
