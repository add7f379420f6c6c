"""A step's reported usage replaces its rate limit's estimate (``ctx.used_tokens``): the budget
later steps wait for is what the provider counted, not what the step guessed."""

from __future__ import annotations

from typing import Any

import psycopg

from saga import SagaClient, Settings
from saga_dev import limit_sagas
from tests.processes import ProcessGroup

Conn = psycopg.Connection[Any]


def test_reported_tokens_replace_the_estimate_and_hold_back_the_next_step(
    settings: Settings, procs: ProcessGroup, db: Conn
) -> None:
    procs.relay(settings)
    procs.worker(settings, "w1")
    with SagaClient(settings) as client:
        first = client.start(limit_sagas.tokens, 95)  # estimated at 10, reports 95
        assert client.wait(first, timeout=60).state == "completed"
        assert db.execute("SELECT sum(units) FROM saga_rate_grants").fetchone() == (95,)
        # 95 of 100 used in this minute: the next call's estimate (10) no longer fits.
        second = client.start(limit_sagas.tokens, 1)
        row = None
        for _ in range(100):
            row = db.execute("SELECT state FROM saga_steps WHERE run_id = %s", (second,)).fetchone()
            if row == ("throttled",):
                break
            db.execute("SELECT pg_sleep(0.1)")
        assert row == ("throttled",)
        waiting = db.execute(
            "SELECT extract(epoch FROM wake_at - now()) FROM saga_gates WHERE gate = 'r:tokens:'"
        ).fetchone()
        assert waiting is not None and 30 < float(waiting[0]) <= 61  # when the 95 leave
