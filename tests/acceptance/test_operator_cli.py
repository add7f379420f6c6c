"""The operators' commands in a subprocess, as a shell script would run them: saga list (filters,
keyset pages, --json), show, bulk retry and cancel (--dry-run, confirmation), exit codes,
--version. Failed runs are made through the store, as a worker would fail them."""

from __future__ import annotations

import datetime as dt
import json
import subprocess
import sys
from collections.abc import Iterator
from typing import Any

import psycopg
import pytest

from saga import coordinator
from saga.client import SagaClient
from saga.definition import Saga, StepContext, step
from saga.records import Claim
from saga.retry import RetryPolicy
from saga.settings import Settings
from saga.store import PostgresStore
from saga_dev import limit_sagas

Conn = psycopg.Connection[tuple[object, ...]]


def charge(ctx: StepContext, value: Any) -> Any:
    raise AssertionError("never called: the test decides each outcome")


def release(ctx: StepContext, value: Any) -> Any:
    raise AssertionError("never called")


single = Saga("cli_single", [step(charge, retry=RetryPolicy(max_attempts=1))])
undone = Saga(
    "cli_undone",
    [
        step(charge, name="hold", compensate=release),
        step(charge, name="pay", retry=RetryPolicy(max_attempts=1)),
    ],
)


def saga(
    settings: Settings, *args: str, stdin: str | None = None
) -> subprocess.CompletedProcess[str]:
    done = subprocess.run(
        [sys.executable, "-m", "saga", *args],
        env=settings.child_env(),
        input=stdin,
        stdin=None if stdin is not None else subprocess.DEVNULL,
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert "Traceback" not in done.stderr, done.stderr
    return done


def lines(done: subprocess.CompletedProcess[str]) -> list[dict[str, Any]]:
    assert done.returncode == 0, done.stderr
    return [json.loads(line) for line in done.stdout.splitlines()]


@pytest.fixture
def client(settings: Settings) -> Iterator[SagaClient]:
    with SagaClient(settings) as c:
        yield c


def advance_with(definition: Saga) -> Any:
    return lambda tx: coordinator.advance(tx, lambda _ref: definition)


def claim(store: PostgresStore, run_id: str, key: str, owner: str = "host:1:boot") -> Claim:
    got = store.claim_step(run_id, key, owner=owner, lease=30.0)
    assert got is not None
    return got


def failed_run(client: SagaClient, run_id: str) -> str:
    """A run of ``single`` whose only step failed for good: the run is failed."""
    client.start(single, 1, run_id=run_id)
    c = claim(client.store, run_id, "charge")
    client.store.fail_attempt(
        c,
        {"type": "builtins.ValueError", "message": "declined"},
        retry_in=None,
        advance=advance_with(single),
    )
    assert client.run(run_id).state == "failed"
    return run_id


def test_version(settings: Settings) -> None:
    done = saga(settings, "--version")
    assert (
        done.returncode == 0
        and done.stdout.startswith("saga ")
        and done.stdout.split()[1][0].isdigit()
    )


def test_list_filters_pages_and_json(settings: Settings, client: SagaClient, db: Conn) -> None:
    ids = [client.start(single, i, run_id=f"page-{i:02d}") for i in range(7)]
    failed_run(client, "bad-01")
    # Spread the creation times, so --since can cut between them.
    t0 = dt.datetime(2026, 1, 1, tzinfo=dt.UTC)
    for i, run_id in enumerate([*ids, "bad-01"]):
        db.execute(
            "UPDATE saga_runs SET created_at = %s WHERE run_id = %s",
            (t0 + dt.timedelta(minutes=i), run_id),
        )
    rows = lines(saga(settings, "list", "--json", "--oldest-first"))
    assert [r["run_id"] for r in rows] == [*ids, "bad-01"]
    assert {"run_id", "saga", "state", "created_at"} <= rows[0].keys()
    assert rows[0]["saga"] == "cli_single" and rows[0]["state"] == "running"

    assert [r["run_id"] for r in lines(saga(settings, "list", "--json", "--state", "failed"))] == [
        "bad-01"
    ]
    failed = lines(saga(settings, "list", "--json", "--error-type", "builtins.ValueError"))
    assert [(r["run_id"], r["error_message"]) for r in failed] == [("bad-01", "declined")]
    assert lines(saga(settings, "list", "--json", "--saga", "nope")) == []
    by_prefix = lines(
        saga(settings, "list", "--json", "--run-id-prefix", "page-0", "--state", "running,failed")
    )
    assert len(by_prefix) == 7
    since = lines(saga(settings, "list", "--json", "--since", "2026-01-01T00:05:00+00:00"))
    assert [r["run_id"] for r in since] == ["bad-01", "page-06", "page-05"]
    before = lines(saga(settings, "list", "--json", "--until", "2026-01-01T00:01:00Z"))
    assert [r["run_id"] for r in before] == ["page-00"]
    finished = lines(saga(settings, "list", "--json", "--finished-since", "1h"))
    assert [r["run_id"] for r in finished] == ["bad-01"]

    # Keyset pages: 3 a page, newest first, every run once.
    seen: list[str] = []
    cursor: list[str] = []
    for _ in range(5):
        done = saga(settings, "list", "--json", "--limit", "3", *cursor)
        seen += [r["run_id"] for r in lines(done)]
        if "next page: --cursor" not in done.stderr:
            break
        cursor = ["--cursor", done.stderr.split("--cursor", 1)[1].split()[0]]
    assert seen == ["bad-01", *ids[::-1]]

    text = saga(settings, "list", "--limit", "2")
    assert text.returncode == 0 and "bad-01" in text.stdout and "next page: --cursor" in text.stdout
    counts = saga(settings, "list", "--counts", "--json")
    assert lines(counts)[0]["counts"]["running"] == 7


def test_bad_usage_exits_2_and_a_missing_run_3(settings: Settings, client: SagaClient) -> None:
    done = saga(settings, "list", "--state", "done")
    assert done.returncode == 2 and "unknown run state 'done'" in done.stderr
    assert saga(settings, "list", "--cursor", "garbage").returncode == 2
    assert saga(settings, "list", "--since", "yesterday-ish").returncode == 2
    assert saga(settings, "list", "--limit", "0").returncode == 2
    assert saga(settings, "retry").returncode == 2  # neither a run id nor a filter
    assert saga(settings, "retry", "r", "--state", "failed").returncode == 2  # both
    done = saga(settings, "show", "nope")
    assert done.returncode == 3 and done.stderr.strip() == (
        "saga: error: no run has id 'nope' (`saga list` finds runs)"
    )
    assert saga(settings, "retry", "nope").returncode == 3
    client.start(single, 1, run_id="still-running")
    done = saga(settings, "retry", "still-running", "--json")
    assert (
        done.returncode == 3 and "only failed or compensation_failed" in done.stdout + done.stderr
    )
    assert saga(settings, "retry", "still-running", "--dry-run").returncode == 3


def test_bulk_retry_dry_run_confirmation_and_history(
    settings: Settings, client: SagaClient
) -> None:
    for i in range(3):
        failed_run(client, f"bulk-{i}")
    client.start(single, 1, run_id="bulk-running")

    dry = lines(saga(settings, "retry", "--run-id-prefix", "bulk-", "--dry-run", "--json"))
    assert [r["run_id"] for r in dry] == ["bulk-0", "bulk-1", "bulk-2"]
    assert all(r["dry_run"] for r in dry)
    assert {client.run(f"bulk-{i}").state for i in range(3)} == {"failed"}  # nothing done

    # No terminal to confirm on, and no --yes: refused, nothing done.
    done = saga(settings, "retry", "--run-id-prefix", "bulk-")
    assert done.returncode == 2 and "pass --yes" in done.stderr
    assert client.run("bulk-0").state == "failed"
    done = saga(settings, "retry", "--state", "running", "--yes")  # no run retry could change
    assert done.returncode == 2 and "acts on failed or compensation_failed runs" in done.stderr

    retried = lines(
        saga(settings, "retry", "--run-id-prefix", "bulk-", "--yes", "--json", "--actor", "ops-bot")
    )
    assert [(r["run_id"], r["ok"]) for r in retried] == [(f"bulk-{i}", True) for i in range(3)]
    assert {client.run(f"bulk-{i}").state for i in range(3)} == {"running"}
    events = client.store.run_events("bulk-1")
    assert [(e.event, e.actor) for e in events] == [("retry", "ops-bot")]
    # The failed attempt the retry superseded is kept in the run's history.
    show = json.loads(saga(settings, "show", "bulk-1", "--json").stdout)
    [charge_step] = show["steps"]
    assert [(a["attempt"], a["outcome"], a["worker"]) for a in charge_step["attempts"]] == [
        (1, "failed", "host:1:boot")
    ]
    assert any(e["event"] == "retry" and e["actor"] == "ops-bot" for e in show["events"])


def test_single_cancel_records_the_os_user_and_bulk_cancel(
    settings: Settings, client: SagaClient
) -> None:
    client.start(single, 1, run_id="c-1")
    client.start(single, 1, run_id="c-2")
    done = saga(settings, "cancel", "c-1", "--json", "--reason", "test")
    assert lines(done) == [{"run_id": "c-1", "action": "cancel", "ok": True, "error": None}]
    [event] = client.store.run_events("c-1")
    assert event.event == "cancel" and "@" in (event.actor or "")  # user@host
    assert event.detail == {"reason": "test"}
    assert client.run("c-1").state == "cancelled"
    done = saga(settings, "cancel", "--run-id-prefix", "c-", "--yes")
    assert done.returncode == 0 and "cancel: 1 runs done, 0 no longer" in done.stdout
    assert client.run("c-2").state == "cancelled"


def test_show_prints_attempts_compensations_and_the_trace_link(
    settings: Settings, client: SagaClient
) -> None:
    run_id = client.start(undone, 1, run_id="show-1")
    store = client.store
    store.complete_step(
        claim(store, run_id, "hold"), '"held"', advance_with(undone), fast_path=False
    )
    store.fail_attempt(
        claim(store, run_id, "pay"),
        {
            "type": "builtins.RuntimeError",
            "message": "card declined",
            "traceback": "Traceback (most recent call last):\n  boom",
        },
        retry_in=None,
        advance=advance_with(undone),
    )
    assert client.run(run_id).state == "compensating"
    linked = settings.model_copy(
        update={"trace_url_template": "http://jaeger:16686/trace/{trace_id}"}
    )
    done = saga(linked, "show", run_id, "--tracebacks")
    assert done.returncode == 0, done.stderr
    out = done.stdout
    assert "  undo hold " in out and "compensation dispatched" in out, out
    assert "card declined" in out and "  boom" in out
    trace_id = json.loads(saga(linked, "show", run_id, "--json").stdout)["trace_id"]
    assert len(trace_id) == 32 and f"http://jaeger:16686/trace/{trace_id}" in out
    assert "compensation_begun" in out and "input  1" in out


def test_fork_and_send_event_are_recorded_with_their_actor(
    settings: Settings, client: SagaClient
) -> None:
    failed_run(client, "f-1")
    [forked] = lines(saga(settings, "fork", "f-1", "charge", "--json", "--actor", "ann"))
    new = forked["new_run_id"]
    assert client.run(new).state == "running"
    client.start(single, 1, run_id="e-1")
    sent = lines(saga(settings, "send-event", "e-1", "approval", "--payload", "1", "--json"))
    assert sent == [{"run_id": "e-1", "event": "approval", "delivered": False}]

    def events(run_id: str) -> list[tuple[str, str | None, Any]]:
        return [(e.event, e.actor, e.detail) for e in client.store.run_events(run_id)]

    assert events("f-1") == [("fork", "ann", {"step_key": "charge", "new_run_id": new})]
    assert events(new) == [("forked_from", "ann", {"step_key": "charge", "run_id": "f-1"})]
    [(event, actor, detail)] = events("e-1")
    assert (event, detail) == ("send_event", {"name": "approval", "delivered": False})
    assert actor and "@" in actor


def test_show_names_the_limit_a_throttled_step_waits_for(
    settings: Settings, client: SagaClient
) -> None:
    one = limit_sagas.one_at_a_time  # one call at a time, whoever calls
    holder = client.start(one, {"tenant": "a"}, run_id="lim-holder")
    waiter = client.start(one, {"tenant": "b"}, run_id="lim-waiter")
    got = client.store.claim_gated_step(holder, "call_service", owner="host:1:boot", lease=30.0)
    assert got is not None and got.claim is not None
    got = client.store.claim_gated_step(waiter, "call_service", owner="host:2:boot", lease=30.0)
    assert got is not None and got.claim is None  # in line, in Postgres

    done = saga(settings, "show", waiter)
    assert done.returncode == 0, done.stderr
    out = done.stdout
    assert "call_service" in out and " throttled " in out, out
    assert "limit  concurrency 'single': 1/1 in use; throttled, 1 of 1 in line since" in out
    assert "limit 'c:single:' (step call_service) since" in out
    shown = json.loads(saga(settings, "show", waiter, "--json").stdout)
    [s] = shown["steps"]
    assert s["state"] == "throttled"
    assert [(v["gate"], v["status"], v["place"]) for v in s["limits"]] == [
        ("c:single:", "waiting", 1)
    ]
    held = json.loads(saga(settings, "show", holder, "--json").stdout)["steps"][0]["limits"]
    assert [(v["gate"], v["status"], v["in_use"]) for v in held] == [("c:single:", "held", 1)]
    # The run list goes by run state: both runs are running.
    rows = lines(saga(settings, "list", "--json", "--run-id-prefix", "lim-"))
    assert {(r["run_id"], r["state"]) for r in rows} == {
        ("lim-holder", "running"),
        ("lim-waiter", "running"),
    }
