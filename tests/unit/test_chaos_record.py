"""What `saga bench chaos` judges by: the effects server's record per trip, and its plan of
which runs fail on purpose (from the seed alone)."""

from __future__ import annotations

from collections.abc import Iterator
from typing import Any

import pytest

from saga_dev.bench_chaos import ChaosConfig, expected_states, plan_runs
from saga_dev.testing import effects_server
from saga_dev.testing._http import call
from saga_dev.travel_agent import ServiceUnavailable, service


@pytest.fixture
def url(monkeypatch: pytest.MonkeyPatch) -> Iterator[str]:
    srv = effects_server.serve()
    monkeypatch.setenv("TRAVEL_SERVICE_URL", srv.url)
    yield srv.url
    srv.shutdown()
    srv.server_close()


def trips(url: str, prefix: str) -> dict[str, Any]:
    found: dict[str, Any] = call(f"{url}/stats?trips={prefix}")["trips"]
    return found


def test_a_trip_records_its_effects_bookings_and_first_answers(url: str) -> None:
    call(f"{url}/control", "POST", {"force": {"t-1:hotel": ["lost"]}})
    with pytest.raises(ServiceUnavailable):  # applied, then the answer was lost
        service("book", {"kind": "hotel", "item": "H", "trip": "t-1"}, "t-1:hotel")
    booked = service("book", {"kind": "hotel", "item": "H", "trip": "t-1"}, "t-1:hotel")
    service("cancel", {"booking_key": "t-1:hotel", "trip": "t-1"}, "t-1:undo")
    service("book", {"kind": "flight", "item": "F", "trip": "u-1"}, "u-1:flight")

    record = trips(url, "t-")
    assert set(record) == {"t-1"}
    trip = record["t-1"]
    assert sorted(trip["effects"].values()) == [1, 1]  # one booking, one cancellation
    assert [b["state"] for b in trip["bookings"].values()] == ["cancelled"]
    assert trip["answers"]["t-1:hotel"]["booking_id"] == booked["booking_id"]
    assert trip["answers"]["t-1:undo"]["state"] == "cancelled"
    assert set(trips(url, "u-")) == {"u-1"}


def test_the_runs_that_fail_on_purpose_follow_from_the_seed_alone() -> None:
    cfg = ChaosConfig(runs=200, seed=5)
    first, again = plan_runs(cfg, "a"), plan_runs(cfg, "b")
    assert [(p.input, p.cancel) for p in first] == [(p.input, p.cancel) for p in again]
    fails = {p.input["fail"] for p in first}
    assert {"", "hotel", "charge", "confirm", "seat", "finalize"} <= fails
    for p in first:
        want = expected_states(p)
        if p.input["fail"] == "confirm":  # past the pivot: nothing is undone
            assert want == {"failed"}
        elif p.input["fail"]:
            assert want == {"compensated"}
        else:
            assert "completed" in want
