"""An effect whose step had not completed when a sibling failed for good is undone, whatever
the timing: the reproduction of the three ways it used to be left behind, on real workers,
checked by the outside service's own record of bookings."""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path
from typing import Any

import psycopg
import pytest

from saga import SagaClient, Settings
from saga_dev.testing import ServerProcess
from tests import uncertain_sagas
from tests.processes import ProcessGroup, wait_until

Conn = psycopg.Connection[Any]


@pytest.fixture
def service(tmp_path: Path) -> Iterator[ServerProcess]:
    with ServerProcess("saga_dev.testing.effects_server", log=tmp_path / "effects.log") as s:
        yield s


def step_state(db: Conn, run_id: str, key: str) -> str | None:
    row = db.execute(
        "SELECT state FROM saga_steps WHERE run_id = %s AND step_key = %s", (run_id, key)
    ).fetchone()
    return None if row is None else str(row[0])


def run_state(db: Conn, run_id: str) -> str:
    return str(db.execute("SELECT state FROM saga_runs WHERE run_id = %s", (run_id,)).fetchone()[0])  # type: ignore[index]


def booked(service: ServerProcess) -> bool:
    return bool(service.stats()["effects_applied"] >= 1)


def assert_undone(client: SagaClient, run_id: str, service: ServerProcess) -> None:
    run = client.wait(run_id, timeout=90)
    assert run.state == "compensated", run
    assert run.error["message"] == "the request was refused"
    bookings = service.stats()["bookings"]
    assert bookings == {"active": 0, "cancelled": 1}, "the booking must not be left behind"
    steps = {s.step_key: s for s in client.steps(run_id)}
    assert steps["compensate:book"].state == "completed"
    assert steps["compensate:book"].result["state"] == "cancelled"


@pytest.mark.parametrize("variant", ["running", "retrying", "worker died"])
def test_an_effect_of_an_unfinished_sibling_is_undone(
    variant: str,
    settings: Settings,
    procs: ProcessGroup,
    client: SagaClient,
    service: ServerProcess,
    db: Conn,
    tmp_path: Path,
) -> None:
    env = {"TRAVEL_SERVICE_URL": service.url}
    procs.relay(settings)
    w1 = procs.worker(settings, "w1", env=env)
    w2 = procs.worker(settings, "w2", env=env)
    go_refuse, go_book = tmp_path / "refuse", tmp_path / "book"
    spec: dict[str, Any] = {"refuse_waits_for": str(go_refuse)}
    if variant == "running":
        spec["book_waits_for"] = str(go_book)  # applied, then its answer held back
    if variant == "worker died":
        spec["book_waits_for"] = str(tmp_path / "never")  # applied, then its worker is killed
    run_id = client.start(uncertain_sagas.uncertain, spec)
    wait_until(lambda: booked(service), 60, "the booking to be applied")

    if variant == "retrying":
        wait_until(lambda: step_state(db, run_id, "book") == "pending", 30, "book to wait")
    if variant == "worker died":
        owner = db.execute(
            "SELECT lease_owner FROM saga_steps WHERE run_id = %s AND step_key = 'book'", (run_id,)
        ).fetchone()[0]  # type: ignore[index]
        pid = int(str(owner).split(":")[1])
        holder = next(w for w in (w1, w2) if w.pid == pid)
        holder.kill()
    go_refuse.touch()
    wait_until(lambda: run_state(db, run_id) != "running", 60, "refuse to fail the run")
    if variant == "running":
        assert step_state(db, run_id, "book") == "running"
        go_book.touch()  # book's attempt now fails with a retryable error
    if variant == "worker died":
        procs.worker(settings, "w3", env=env)  # the killed one's place; its lease runs out
    assert_undone(client, run_id, service)
    assert step_state(db, run_id, "book") in ("failed", "cancelled")
