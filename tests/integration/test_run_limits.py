"""Run-level limits with on_limit (saga.limits.Concurrency on a workflow): a run over its key's
limit is refused at start, or cancels the oldest run of its key (the newest wins)."""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path
from typing import Any

import psycopg
import pytest

from saga import LimitReachedError, SagaClient, Settings
from saga_dev import limit_sagas
from saga_dev.limit_service import URL_ENV, LimitService
from tests.processes import ProcessGroup, wait_until

Conn = psycopg.Connection[Any]


@pytest.fixture
def service(monkeypatch: pytest.MonkeyPatch) -> Iterator[LimitService]:
    with LimitService() as svc:
        monkeypatch.setenv(URL_ENV, svc.url)
        yield svc


def _calling(service: LimitService, key: str) -> None:
    wait_until(lambda: service.in_flight[key] > 0, 60, f"a step of {key!r} to call the service")


def test_a_run_over_its_keys_limit_is_refused_and_nothing_is_made(
    settings: Settings, procs: ProcessGroup, service: LimitService, db: Conn
) -> None:
    procs.relay(settings)
    procs.worker(settings, "w1", env={URL_ENV: service.url})
    with SagaClient(settings) as client:
        first = client.start(limit_sagas.one_run_refuse, {"tenant": "a", "ms": 1500})
        with pytest.raises(LimitReachedError, match="on_limit='refuse'"):
            client.start(limit_sagas.one_run_refuse, {"tenant": "a"}, run_id="refused")
        assert db.execute("SELECT 1 FROM saga_runs WHERE run_id = 'refused'").fetchone() is None
        # Another key has its own limit; the same run id again is the same run, not a refusal.
        other = client.start(limit_sagas.one_run_refuse, {"tenant": "b", "ms": 10})
        assert client.start(limit_sagas.one_run_refuse, {"tenant": "a", "ms": 1500}, run_id=first)
        assert client.wait(first, timeout=60).state == "completed"
        assert client.wait(other, timeout=60).state == "completed"
        # Once the first has finished, the key takes a run again.
        again = client.start(limit_sagas.one_run_refuse, {"tenant": "a", "ms": 10})
        assert client.wait(again, timeout=60).state == "completed"


def test_the_newest_run_cancels_the_oldest_of_its_key(
    settings: Settings, procs: ProcessGroup, service: LimitService, db: Conn
) -> None:
    procs.relay(settings)
    procs.worker(settings, "w1", env={URL_ENV: service.url})
    procs.worker(settings, "w2", env={URL_ENV: service.url})
    with SagaClient(settings) as client:
        old = client.start(limit_sagas.newest_wins, {"tenant": "a", "ms": 1500})
        _calling(service, "a")
        new = client.start(limit_sagas.newest_wins, {"tenant": "a", "ms": 10})
        assert client.wait(old, timeout=60).state in ("cancelled", "compensated")
        assert client.wait(new, timeout=60).state == "completed"
        # The new run waited for the old one's slot: never two runs of the key at once.
        assert service.max_in_flight["a"] == 1
        events = db.execute(
            "SELECT actor, detail->>'reason' FROM saga_run_events WHERE run_id = %s", (old,)
        ).fetchall()
        assert any(actor == "saga" and new in reason for actor, reason in events), events


def test_a_cancelled_runs_slot_goes_on_when_its_attempt_ends_not_a_lease_later(
    settings: Settings, procs: ProcessGroup, service: LimitService, tmp_path: Path
) -> None:
    # A lease far longer than this test waits: only ending the attempt when its outcome is
    # refused (the run was cancelled meanwhile) hands the slot on in time.
    settings = settings.model_copy(update={"lease_seconds": 300.0})
    hold = tmp_path / "go"
    procs.relay(settings)
    procs.worker(settings, "w1", env={URL_ENV: service.url})
    procs.worker(settings, "w2", env={URL_ENV: service.url})
    with SagaClient(settings) as client:
        old = client.start(limit_sagas.newest_wins, {"tenant": "a", "ms": 10, "hold": str(hold)})
        wait_until(
            lambda: [s.state for s in client.steps(old)] == ["running"], 60, "the old run's step"
        )
        new = client.start(limit_sagas.newest_wins, {"tenant": "a", "ms": 10})
        assert client.wait(old, timeout=60).state == "cancelled"
        wait_until(
            lambda: [s.state for s in client.steps(new)] == ["throttled"], 60, "the new run to wait"
        )
        hold.touch()  # the old run's attempt calls the service and ends
        assert client.wait(new, timeout=90).state == "completed"
    assert service.max_in_flight["a"] == 1
    assert service.order[0] == old
