"""The dashboard in a real browser: finding runs, reading a run's story, acting on runs."""

from __future__ import annotations

import re
from pathlib import Path
from typing import Any
from urllib.parse import urlencode

import psycopg
from playwright.sync_api import Page, expect

from saga import SagaClient, Settings
from saga.dashboard.server import DashboardServer
from tests import coordinator_sagas as cs
from tests import dashboard_sagas as ds
from tests.processes import ProcessGroup, wait_for_row

Conn = psycopg.Connection[Any]


def _waiting_run(settings: Settings, db: Conn) -> str:
    """A run of the approval workflow, once it waits for its event."""
    with SagaClient(settings) as client:
        run_id = client.start(cs.approval, {"item": "x"})
    wait_for_row(
        db,
        "SELECT 1 FROM saga_steps WHERE run_id = %s AND state = 'waiting'",
        (run_id,),
        "the workflow to wait for its event",
    )
    return run_id


def _finished(client: SagaClient, *run_ids: str) -> None:
    for run_id in run_ids:
        client.wait(run_id, timeout=60)


def test_list_filter_and_page_through_runs(
    engine: Settings, dashboard: DashboardServer, page: Page, tmp_path: Path
) -> None:
    with SagaClient(engine) as client:
        ok = client.start(cs.trip, {"city": "Lisbon"}, run_id="trip-ok")
        undone = client.start(
            cs.trip, {"city": "Porto", "fail_payment": True}, run_id="trip-undone"
        )
        broken = client.start(ds.fixable, {"marker": str(tmp_path / "fixed")}, run_id="fix-me")
        _finished(client, ok, undone, broken)

    page.goto(dashboard.url + "/?refresh=0")
    rows = page.locator("#runs tbody tr")
    expect(rows).to_have_count(3)
    expect(page.locator("#runs")).to_contain_text("trip-undone")
    expect(page.locator('#counts a[data-state="completed"] b')).to_have_text("1")
    expect(page.locator('#counts a[data-state="compensated"] b')).to_have_text("1")
    expect(page.locator('#counts a[data-state="failed"] b')).to_have_text("1")
    expect(page.locator('tr[data-run-id="fix-me"] td.error')).to_contain_text("ServiceDown")

    # Filter by state through the form.
    page.check('input[name="state"][value="compensated"]')
    page.click("#apply-filters")
    expect(rows).to_have_count(1)
    expect(rows.first).to_have_attribute("data-run-id", "trip-undone")
    expect(page.locator('input[name="state"][value="compensated"]')).to_be_checked()

    # By saga name, and by run id prefix.
    page.goto(dashboard.url + "/?saga=dash_fixable")
    expect(rows).to_have_count(1)
    expect(rows.first).to_have_attribute("data-run-id", "fix-me")
    page.goto(dashboard.url + "/?run_id_prefix=trip-")
    expect(rows).to_have_count(2)
    # The JSON API the page uses: the failed run's error type, then the list filtered by it.
    api = page.request.get(dashboard.url + "/api/runs?state=failed").json()
    assert [r["run_id"] for r in api["runs"]] == ["fix-me"]
    assert api["next_cursor"] is None
    error_type = api["runs"][0]["error_type"]
    assert "ServiceDown" in error_type
    page.goto(dashboard.url + "/?" + urlencode({"error_type": error_type}))
    expect(rows).to_have_count(1)
    page.goto(dashboard.url + "/?error_type=NoSuchError")
    expect(rows).to_have_count(0)
    expect(page.locator(".empty")).to_contain_text("No run matches")

    # Keyset pages of one run each, oldest first: every run once, in order of creation.
    page.goto(dashboard.url + "/?order=oldest&limit=1")
    seen = []
    for _ in range(3):
        expect(rows).to_have_count(1)
        seen.append(rows.first.get_attribute("data-run-id"))
        if page.locator("#next-page").count():
            page.click("#next-page")
    assert seen == [ok, undone, broken]
    expect(page.locator("#next-page")).to_have_count(0)

    # A click on a run opens its page.
    page.goto(dashboard.url + "/?refresh=0")
    page.click('tr[data-run-id="trip-ok"] a.run-link')
    expect(page.locator("#run-id")).to_have_text("trip-ok")


def test_a_compensated_run_shows_its_attempts_and_compensations(
    engine: Settings, procs: ProcessGroup, dashboard: DashboardServer, page: Page, artifacts: Path
) -> None:
    with SagaClient(engine) as client:
        run_id = client.start(cs.trip, {"city": "Porto", "fail_payment": True})
        assert client.wait(run_id, timeout=60).state == "compensated"

    page.goto(f"{dashboard.url}/runs/{run_id}")
    expect(page.locator("h1 .state")).to_have_text("compensated")
    payment = page.locator('#steps section[data-step="payment"]')
    expect(payment).to_have_attribute("data-state", "failed")
    expect(payment.locator(".error-block")).to_contain_text("PaymentDeclined")
    expect(payment.locator(".error-block")).to_contain_text("card declined")
    expect(payment.locator(".error-block pre.traceback")).to_contain_text("Traceback")

    # The saga's step graph, in layers, each step with its state (confirm never ran).
    layers = page.locator("#graph .layer")
    expect(layers).to_have_count(4)
    expect(layers.nth(1).locator(".node")).to_have_count(3)
    expect(page.locator('#graph .node[data-step="payment"]')).to_contain_text(
        "after flight, hotel, car"
    )
    expect(page.locator('#graph .node[data-step="confirm"]')).to_contain_text("not scheduled")

    # Each compensation is shown as such, naming the step it undoes, not as a re-run.
    comps = page.locator("#compensations section")
    expect(comps).to_have_count(3)
    for booked in ("flight", "hotel", "car"):
        comp = page.locator(f'#compensations section[data-step="compensate:{booked}"]')
        expect(comp).to_have_attribute("data-kind", "compensation")
        expect(comp).to_have_attribute("data-state", "completed")
        expect(comp.locator(".badge.comp")).to_have_text(f"compensation of {booked}")
        expect(comp.locator('pre[data-field="result"]')).to_contain_text("cancelled")
    expect(page.locator('#steps section[data-step^="compensate:"]')).to_have_count(0)

    # The timeline has an attempt per step and compensation, each with its worker.
    timeline = page.locator("#timeline tbody tr")
    expect(timeline).to_have_count(8)  # quote, 3 bookings, payment, 3 compensations
    expect(page.locator('#timeline tr[data-step="payment"]')).to_have_attribute(
        "data-outcome", "failed"
    )
    w1 = next(p for p in procs.processes if p.name == "w1")
    expect(page.locator('#timeline tr[data-step="compensate:car"] td.worker')).to_have_text(
        re.compile(rf":{w1.pid}$")  # host:pid of the worker process that ran it
    )
    page.screenshot(path=str(artifacts / "run-page-compensated.png"), full_page=True)
    assert (artifacts / "run-page-compensated.png").stat().st_size > 10_000


def test_retry_a_failed_run_from_the_page_and_watch_it_complete(
    engine: Settings, dashboard: DashboardServer, page: Page, tmp_path: Path, db: Conn
) -> None:
    marker = tmp_path / "fixed"
    with SagaClient(engine) as client:
        run_id = client.start(ds.fixable, {"marker": str(marker)})
        assert client.wait(run_id, timeout=60).state == "failed"

    page.goto(f"{dashboard.url}/runs/{run_id}")
    expect(page.locator("h1 .state")).to_have_text("failed")
    step = page.locator('#steps section[data-step="until_fixed"]')
    expect(step.locator(".error-block")).to_contain_text("the booking service is down")
    expect(page.locator("#action-cancel")).to_have_count(0)  # only a running run is cancelled

    marker.write_text("fixed")  # the operator fixes the service, then retries
    page.click("#action-retry")
    expect(page.locator("h1")).to_contain_text("Retry this run")
    # Nothing happens before the confirmation.
    assert db.execute("SELECT state FROM saga_runs WHERE run_id = %s", (run_id,)).fetchone() == (
        "failed",
    )
    page.click("#confirm")
    expect(page.locator("#flash")).to_contain_text("the run resumes")
    # The page refreshes itself while the run is live, until it has completed.
    expect(page.locator("h1 .state")).to_have_text("completed", timeout=60_000)
    expect(step.locator('pre[data-field="result"]')).to_contain_text("booked")
    retried = page.locator('#events tr[data-event="retry"]')
    expect(retried).to_contain_text("dashboard (session")  # who, and from where
    expect(retried).to_contain_text("127.0.0.1")


def test_send_an_event_to_a_waiting_run(
    engine: Settings, dashboard: DashboardServer, page: Page, db: Conn
) -> None:
    run_id = _waiting_run(engine, db)
    page.goto(f"{dashboard.url}/runs/{run_id}")
    expect(page.locator('#waits tr[data-name="approval"]')).to_contain_text("event wait")
    page.click("#action-event")
    expect(page.locator('input[name="name"]')).to_have_value("approval")
    page.fill('textarea[name="payload_json"]', '{"approved_by": "ops", "ok": true}')
    page.click("#confirm")
    expect(page.locator("#flash")).to_contain_text("delivered")
    expect(page.locator("h1 .state")).to_have_text("completed", timeout=60_000)
    expect(page.locator("#waits")).to_have_count(0)
    expect(page.locator("#events")).to_contain_text("send_event")
    with SagaClient(engine) as client:
        assert client.run(run_id).result["decision"] == {"approved_by": "ops", "ok": True}


def test_a_bad_event_payload_is_refused_with_a_clear_message(
    engine: Settings, dashboard: DashboardServer, page: Page, db: Conn
) -> None:
    run_id = _waiting_run(engine, db)
    page.goto(f"{dashboard.url}/runs/{run_id}/confirm/event")
    page.fill('textarea[name="payload_json"]', "{not json")
    page.click("#confirm")
    expect(page.locator("#error")).to_contain_text("not strict JSON")
    assert db.execute(
        "SELECT count(*) FROM saga_events WHERE run_id = %s", (run_id,)
    ).fetchone() == (0,)


def test_a_killed_workers_attempt_and_its_resumption_are_shown(
    settings: Settings, procs: ProcessGroup, dashboard: DashboardServer, page: Page, db: Conn
) -> None:
    procs.relay(settings)
    doomed = procs.worker(settings, "doomed")
    with SagaClient(settings) as client:
        run_id = client.start(ds.pipeline, {"url": "https://example.org/a"})
        wait_for_row(
            db,
            "SELECT 1 FROM test_calls WHERE run_id = %s AND step = 'slow_once#2'",
            (run_id,),
            "the slow step's first attempt to start",
        )
        doomed.kill()
        rescuer = procs.worker(settings, "rescuer")
        assert client.wait(run_id, timeout=60).state == "completed"

    page.goto(f"{dashboard.url}/runs/{run_id}")
    lost = page.locator('#timeline tr[data-step="slow_once#2"][data-attempt="1"]')
    expect(lost).to_have_attribute("data-outcome", "lost")
    expect(lost.locator("td.worker")).to_have_text(re.compile(rf":{doomed.pid}$"))
    resumed = page.locator('#timeline tr[data-step="slow_once#2"][data-attempt="2"]')
    expect(resumed).to_have_attribute("data-outcome", "completed")
    expect(resumed.locator("td.worker")).to_have_text(re.compile(rf":{rescuer.pid}$"))
    expect(resumed).to_contain_text("resumed the step after attempt 1 was lost")
    # The step before it was read back from the journal when the run resumed, not run again.
    fetched = page.locator('#steps section[data-step="fetch#1"]')
    expect(fetched).to_have_attribute("data-read-back", "1")
    expect(fetched.locator(".badge.replayed")).to_have_text("read from journal")
    assert db.execute(
        "SELECT count(*) FROM test_calls WHERE run_id = %s AND step = 'fetch#1'", (run_id,)
    ).fetchone() == (1,)
    expect(page.locator('#steps section[data-step="finish#3"]')).to_have_attribute(
        "data-read-back", "0"
    )


def test_fork_a_run_from_a_chosen_step(
    engine: Settings, dashboard: DashboardServer, page: Page, db: Conn
) -> None:
    with SagaClient(engine) as client:
        run_id = client.start(cs.trip, {"city": "Lisbon"}, run_id="to-fork")
        assert client.wait(run_id, timeout=60).state == "completed"
    page.goto(f"{dashboard.url}/runs/{run_id}")
    page.locator('#steps section[data-step="payment"] a.fork-link').click()
    expect(page.locator('select[name="step_key"]')).to_have_value("payment")
    page.fill('input[name="new_run_id"]', "forked-run")
    page.click("#confirm")
    expect(page.locator("#run-id")).to_have_text("forked-run")
    expect(page.locator("#flash")).to_contain_text("forked as forked-run")
    expect(page.locator("h1 .state")).to_have_text("completed", timeout=60_000)
    # The steps before payment were copied from the first run's journal, not run again.
    expect(page.locator('#steps section[data-step="flight"]')).to_have_attribute(
        "data-read-back", "1"
    )
    expect(page.locator('#steps section[data-step="payment"]')).to_have_attribute(
        "data-read-back", "0"
    )
    assert db.execute(
        "SELECT count(*) FROM test_calls WHERE run_id = 'forked-run' AND step = 'flight'"
    ).fetchone() == (0,)
    page.goto(f"{dashboard.url}/runs/{run_id}")
    expect(page.locator('#events tr[data-event="fork"]')).to_contain_text("forked-run")


def test_cancel_a_running_run_after_confirming(
    engine: Settings, dashboard: DashboardServer, page: Page, db: Conn
) -> None:
    run_id = _waiting_run(engine, db)
    page.goto(f"{dashboard.url}/runs/{run_id}")
    page.click("#action-cancel")
    page.click("#back")  # changed one's mind: nothing happens
    expect(page.locator("h1 .state")).to_have_text("running")
    page.click("#action-cancel")
    page.fill('input[name="reason"]', "the customer called it off")
    page.click("#confirm")
    expect(page.locator("h1 .state")).to_have_text("cancelled", timeout=60_000)
    expect(page.locator('#compensations section[data-step^="compensate:reserve"]')).to_have_count(1)
    expect(page.locator("#facts ~ .error-block")).to_contain_text("the customer called it off")


def test_the_runs_list_refreshes_itself(
    settings: Settings, dashboard: DashboardServer, page: Page
) -> None:
    page.goto(dashboard.url + "/")
    expect(page.locator(".empty")).to_contain_text("No run matches")
    expect(page.locator("#refresh-status")).to_contain_text("refresh in")
    with SagaClient(settings) as client:  # no worker: the run stays running
        client.start(cs.approval, {"item": "x"}, run_id="arrives-later")
    expect(page.locator('tr[data-run-id="arrives-later"]')).to_have_attribute(
        "data-state", "running"
    )
    expect(page.locator('#counts a[data-state="running"] b')).to_have_text("1")
    counts = page.request.get(dashboard.url + "/api/counts?saga=approval").json()["counts"]
    assert counts["running"] == 1 and counts["completed"] == 0
    # Paused, it stays as it is.
    page.click("#refresh-toggle")
    expect(page.locator("#refresh-status")).to_contain_text("paused")
