"""``timeout=`` holds on every pool (prefork, solo, threads), for sync and async steps; a
stopping worker waits for its running steps at most SAGA_SHUTDOWN_GRACE_SECONDS."""

from __future__ import annotations

import os
import signal
from collections import Counter
from typing import Any

import psycopg
import pytest

from saga import SagaClient, Settings
from tests import async_sagas, sagas
from tests.processes import ProcessGroup, wait_until
from tests.sagas import calls

Conn = psycopg.Connection[Any]

POOLS = {
    "prefork": ["--pool", "prefork", "--concurrency", "1"],
    "solo": ["--pool", "solo"],
    "threads": ["--pool", "threads", "--concurrency", "2"],
}


@pytest.mark.parametrize("pool", list(POOLS))
@pytest.mark.parametrize(
    "saga", [async_sagas.timed, async_sagas.async_timed], ids=["sync", "async"]
)
def test_a_step_past_its_timeout_fails_with_a_timeout_and_its_late_result_is_dropped(
    pool: str, saga: Any, settings: Settings, procs: ProcessGroup, client: SagaClient, db: Conn
) -> None:
    procs.relay(settings)
    procs.spawn(pool, settings, "worker", *POOLS[pool])
    fn = saga.roots[0].name
    run_id = client.start(saga, 4.0)  # sleeps 4 s; its timeout is 1 s, one attempt
    run = client.wait(run_id, timeout=60)
    assert run.state == "failed", run
    (journaled,) = client.steps(run_id)
    assert journaled.state == "failed"
    assert journaled.result is None
    assert journaled.error is not None
    assert journaled.error["type"] == "saga.errors.StepTimeoutError", journaled.error
    assert "timeout of 1.0 s" in journaled.error["message"]
    if pool == "threads" and saga is async_sagas.timed:
        # A thread cannot be killed: the step finishes its sleep, and what it returns is dropped.
        wait_until(lambda: calls(db, run_id)[f"{fn}:late"] == 1, 60, "the late step to return")
        assert client.steps(run_id)[0].state == "failed"
        assert client.run(run_id).state == "failed"
    else:
        assert calls(db, run_id)[f"{fn}:late"] == 0  # interrupted (SIGALRM) or cancelled
    assert calls(db, run_id)[fn] == 1


def _stop_with_a_step_running(
    settings: Settings, procs: ProcessGroup, client: SagaClient, db: Conn, *pool: str
) -> tuple[str, int]:
    settings = settings.model_copy(update={"shutdown_grace_seconds": 1.0})
    procs.relay(settings)
    worker = procs.spawn("stopping", settings, "worker", *pool)
    run_id = client.start(sagas.two, {"block_at": 2})  # step 2 sleeps 300 s on attempt 1
    row = wait_until(
        lambda: db.execute(
            "SELECT pid FROM test_calls WHERE run_id = %s AND step = 'step2'", (run_id,)
        ).fetchone(),
        60,
        "step 2 to start",
    )
    os.kill(worker.pid, signal.SIGTERM)  # a warm shutdown: it waits for the running step
    assert worker.popen.wait(60) == 1, worker.log()  # but only for the grace
    assert "SAGA_SHUTDOWN_GRACE_SECONDS" in worker.log()
    return run_id, row[0]  # type: ignore[index]


@pytest.mark.parametrize("pool", ["solo", "threads"])
def test_a_stopping_worker_waits_for_its_step_only_for_the_grace_then_another_takes_over(
    pool: str, settings: Settings, procs: ProcessGroup, client: SagaClient, db: Conn
) -> None:
    run_id, _ = _stop_with_a_step_running(settings, procs, client, db, *POOLS[pool])
    procs.worker(settings, "survivor")
    assert client.result(run_id, timeout=60)["trail"] == [1, 2]
    assert calls(db, run_id) == Counter({"step1": 1, "step2": 2})


def test_a_stopping_prefork_worker_kills_its_busy_child_after_the_grace(
    settings: Settings, procs: ProcessGroup, client: SagaClient, db: Conn
) -> None:
    run_id, child = _stop_with_a_step_running(settings, procs, client, db, *POOLS["prefork"])

    def gone() -> bool:
        try:
            os.kill(child, 0)
        except ProcessLookupError:
            return True
        return False

    wait_until(gone, 30, "the pool child running the step to be killed")
    procs.worker(settings, "survivor")
    assert client.result(run_id, timeout=60)["trail"] == [1, 2]
    assert calls(db, run_id) == Counter({"step1": 1, "step2": 2})


def test_on_the_threads_pool_each_running_steps_lease_is_renewed(
    settings: Settings, procs: ProcessGroup, client: SagaClient, db: Conn
) -> None:
    # Steps longer than the lease (2 s), two at once: each thread's claim must be renewed, or
    # the sweeper takes the other over and it runs twice.
    procs.relay(settings)
    procs.spawn("threads", settings, "worker", *POOLS["threads"])
    run_ids = [client.start(sagas.two, {"sleep": 4}) for _ in range(2)]
    for run_id in run_ids:
        assert client.result(run_id, timeout=120)["trail"] == [1, 2]
        assert calls(db, run_id) == Counter({"step1": 1, "step2": 1})
    pairs = db.execute(
        "SELECT count(*) FROM test_calls a JOIN test_calls b ON a.id < b.id "
        "AND a.run_id <> b.run_id AND a.step = b.step AND a.pid = b.pid"
    ).fetchone()
    assert pairs is not None and pairs[0] >= 1  # the same worker ran both runs' steps
