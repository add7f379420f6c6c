"""Secure defaults on real processes: signed task messages, redacted failures, the engine under
its restricted database role, and namespaced idempotency keys."""

from __future__ import annotations

import json
import subprocess
import sys
import uuid
from collections.abc import Iterator
from typing import Any

import kombu
import psycopg
import pytest
from psycopg import errors
from psycopg.conninfo import make_conninfo
from pydantic import SecretStr

from saga.client import SagaClient
from saga.settings import Settings
from saga.signing import SIGNATURE, MessageKeys
from saga.tracing import REDACTED
from saga_dev.otlp_receiver import OTLPReceiver
from tests import sagas
from tests import security_sagas as ss
from tests.conftest import AMQP_URL, BROKER_URL, unavailable
from tests.integration.test_poison import body, headers
from tests.processes import ROOT, ProcessGroup, wait_until
from tests.traces import run_spans, wait_for_trace

Conn = psycopg.Connection[Any]

OLD_KEY, NEW_KEY = "old-" + "o" * 40, "new-" + "n" * 40


def signed_settings(settings: Settings) -> Settings:
    """Signing with the new key (id k2) while the old one (k1) is still accepted."""
    return settings.model_copy(
        update={
            "message_signing_key": SecretStr(NEW_KEY),
            "message_signing_key_id": "k2",
            "message_verification_keys": {"k1": SecretStr(OLD_KEY)},
        }
    )


def rejections(text: str) -> list[str]:
    return [line for line in text.splitlines() if "rejected unsigned task message" in line]


def rejected_count(receiver: OTLPReceiver) -> float:
    """The workers' cumulative count of unsigned messages (0 before the first export)."""
    values = [
        p.value or 0.0
        for p in receiver.points()
        if p.metric == "saga.messages.rejected"
        and p.attributes.get("saga.rejection.reason") == "unsigned"
    ]
    return max(values, default=0.0)


def test_unsigned_and_forged_messages_are_dropped_unclaimed_and_counted_the_old_key_still_works(
    receiver: OTLPReceiver, settings: Settings, procs: ProcessGroup, db: Conn
) -> None:
    signed = signed_settings(settings)
    worker = procs.worker(signed, "w1")
    with (
        SagaClient(signed, publish=False) as client,
        kombu.Connection(BROKER_URL, connect_timeout=3) as broker,
    ):
        # No relay yet and no publish by the client: the first step's message waits in the
        # outbox, so the only messages naming it are the ones published here by hand.
        run_id = client.start(sagas.two, {})
        target = {"run_id": run_id, "step_key": "step1"}

        def publish(extra: dict[str, Any], task_id: str | None = None) -> str:
            task_id = task_id or str(uuid.uuid4())
            with broker.Producer() as producer:
                producer.publish(
                    body(target),
                    exchange="",
                    routing_key=signed.queue,
                    headers={**headers(task_id), **extra},
                    content_type="application/json",
                    content_encoding="utf-8",
                    retry=False,
                )
            return task_id

        def signature(key: str, key_id: str, task_id: str) -> str:
            keys = MessageKeys(key_id, {key_id: key.encode()})
            return keys.sign("saga.step", task_id, [], target, {})

        unsigned = publish({})
        forged = publish({SIGNATURE: "v1:k2:" + "0" * 64})
        stranger_id = str(uuid.uuid4())
        wrong_key = publish({SIGNATURE: signature("x" * 40, "k2", stranger_id)})
        wait_until(lambda: len(rejections(worker.log())) == 3, 30, "three rejections")
        lines = rejections(worker.log())
        for task_id, line in zip([unsigned, forged, wrong_key], lines, strict=True):
            assert task_id in line
            assert run_id not in line, "the log line carries no payload"
        assert "is not signed" in lines[0] and "does not verify under key 'k2'" in lines[1]
        (step1,) = [s for s in client.steps(run_id) if s.step_key == "step1"]
        assert step1.attempt == 0, "nothing was claimed"
        assert sagas.calls(db, run_id) == {}

        # Signed with the old key during the rotation: accepted. Its next step goes out through
        # the worker's fast path, signed with the new key.
        task_id = str(uuid.uuid4())
        publish({SIGNATURE: signature(OLD_KEY, "k1", task_id)}, task_id)
        assert client.result(run_id, timeout=60)["trail"] == [1, 2]

        # The relay's messages are signed too.
        procs.relay(signed)
        second = client.start(sagas.two, {})
        assert client.result(second, timeout=60)["trail"] == [1, 2]

    assert worker.alive()
    assert len(rejections(worker.log())) == 3
    wait_until(lambda: rejected_count(receiver) == 3, 30, "saga.messages.rejected = 3")


def test_an_unsigned_engine_is_refused_by_a_signing_worker(
    settings: Settings, procs: ProcessGroup
) -> None:
    """A relay without the key (a forgotten setting) gets nothing run: its messages are dropped
    and logged, the worker keeps serving."""
    worker = procs.worker(signed_settings(settings), "w1")
    procs.relay(settings)
    with SagaClient(settings) as client:
        run_id = client.start(sagas.two, {})
        wait_until(lambda: rejections(worker.log()), 30, "the relay's message refused")
        assert client.steps(run_id)[0].attempt == 0
    assert worker.alive()


def test_signed_messages_run_on_rabbitmq(settings: Settings, procs: ProcessGroup) -> None:
    """AMQP carries the signature in its application headers: relay, fast path and worker
    agree there as on Redis."""
    connection = kombu.Connection(AMQP_URL, connect_timeout=3)
    try:
        connection.ensure_connection(max_retries=1)
    except Exception as exc:  # kombu raises the transport's own error types
        unavailable("RabbitMQ", exc)
    finally:
        connection.release()
    signed = signed_settings(settings).model_copy(update={"broker_url": AMQP_URL})
    procs.relay(signed)
    worker = procs.worker(signed, "w1")
    with SagaClient(signed) as client:
        run_id = client.start(sagas.two, {})
        assert client.result(run_id, timeout=60)["trail"] == [1, 2]
    assert not rejections(worker.log())


# -- redaction ------------------------------------------------------------------------------------


def texts(span: Any) -> str:
    return json.dumps(
        [span.name, span.status_message, span.attributes, span.events, span.resource],
        default=str,
    )


def test_a_secret_in_an_exception_reaches_no_span_no_log_and_no_validation_record(
    receiver: OTLPReceiver, settings: Settings, procs: ProcessGroup, db: Conn
) -> None:
    procs.relay(settings)
    worker = procs.worker(settings, "w1")
    with SagaClient(settings) as client:
        leaky = client.start(ss.leaky, None)
        mistyped = client.start(ss.mistyped, None)
        assert client.wait(leaky, timeout=60).state == "failed"
        assert client.wait(mistyped, timeout=60).state == "failed"
    wait_for_trace(receiver, leaky, 1)
    wait_for_trace(receiver, mistyped, 1)

    spans = receiver.spans()
    assert not [texts(s) for s in spans if ss.SECRET in texts(s)]
    # The failure is there all the same: its type, error status and a fixed message.
    (step,) = [s for s in run_spans(receiver, leaky) if s.name == "step leaks"]
    assert step.status == "ERROR" and step.attributes["error.type"] == "builtins.ValueError"
    assert dict(step.events)["exception"] == {
        "exception.type": "builtins.ValueError",
        "exception.message": REDACTED,
    }
    validation = [
        s
        for s in run_spans(receiver, mistyped)
        if s.name.startswith("process ") and s.attributes["saga.step"] == "counts"
    ]
    assert validation and validation[0].status == "ERROR"
    assert "ValidationError" in validation[0].attributes["error.type"]
    for process in procs.processes:
        assert ss.SECRET not in process.log(), f"the {process.name} log quotes the secret"

    # The journal: the engine's validation error names the field and the problem, not the
    # value; the step's own exception is kept as raised, for operators.
    errors_by_step = dict(
        db.execute(
            "SELECT step_key, error FROM saga_steps WHERE run_id = ANY(%s) AND error IS NOT NULL",
            ([leaky, mistyped],),
        ).fetchall()
    )
    counted = errors_by_step["counts"]
    assert ss.SECRET not in json.dumps(counted)
    assert "count: Input should be a valid integer" in counted["message"]
    assert errors_by_step["leaks"]["message"] == f"bad key {ss.SECRET}"
    show = subprocess.run(
        [sys.executable, "-m", "saga", "show", mistyped, "--json"],
        env=settings.child_env(),
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert show.returncode == 0, show.stderr
    # `saga show` prints step inputs and results (issue 12): step 1's result is the secret the
    # step returned, as data. What must not quote it is every error the engine wrote about it.
    detail = json.loads(show.stdout)
    written = json.dumps(
        [detail["error"]]
        + [s["error"] for s in detail["steps"]]
        + [a for s in detail["steps"] for a in s["attempts"]]
    )
    assert "validation error" in written and ss.SECRET not in written
    assert worker.alive()


# -- database roles -------------------------------------------------------------------------------


def login_role(admin: Conn, name: str, member_of: str) -> None:
    """A LOGIN user in ``member_of`` (roles are the cluster's: made once, kept)."""
    admin.execute(
        f"""
        DO $$
        BEGIN
            CREATE ROLE {name} LOGIN;
        EXCEPTION WHEN duplicate_object OR unique_violation THEN NULL;
        END
        $$;
        """
    )
    admin.execute(f"GRANT {member_of} TO {name}")


@pytest.fixture
def engine_url(admin_conn: Conn, database_url: str) -> Iterator[str]:
    login_role(admin_conn, "saga_test_engine", "saga_engine")
    yield make_conninfo(database_url, user="saga_test_engine")


def test_the_engine_runs_a_compensated_saga_under_the_engine_role(
    settings: Settings, procs: ProcessGroup, engine_url: str, db: Conn
) -> None:
    engine = settings.model_copy(update={"database_url": engine_url})
    procs.relay(engine)
    procs.worker(engine, "w1")
    with SagaClient(engine) as client:
        run_id = client.start(ss.booking, {"trip": 1})
        assert client.wait(run_id, timeout=60).state == "compensated"
        steps = {s.step_key: s for s in client.steps(run_id)}
        assert steps["reserve"].state == "completed"
        assert steps["charge"].state == "failed"
        assert steps["compensate:reserve"].state == "completed"
        assert steps["compensate:reserve"].result == {"cancelled": f"{run_id}:reserve"}
        # Worker, sweeper and client were all the engine's login user.
        used = {
            row[0]
            for row in db.execute(
                "SELECT application_name FROM pg_stat_activity "
                "WHERE datname = current_database() AND usename = 'saga_test_engine'"
            ).fetchall()
        }
        assert {"saga-worker", "saga-sweeper", "saga-client"} <= used

    with psycopg.connect(engine_url, autocommit=True) as conn:
        assert conn.execute(
            "SELECT rolsuper FROM pg_roles WHERE rolname = current_user"
        ).fetchone() == (False,)
        for statement in (
            "DROP TABLE saga_outbox",  # the migrator's, not the engine's
            "ALTER TABLE saga_runs ADD COLUMN x int",
            "INSERT INTO saga_schema_migrations (version, name, checksum) VALUES (99, 'x', 'x')",
            "DELETE FROM saga_schema_migrations",
        ):
            with pytest.raises(errors.InsufficientPrivilege):
                conn.execute(statement)


def test_the_read_only_role_reads_and_cannot_write(
    admin_conn: Conn, database_url: str, settings: Settings
) -> None:
    with SagaClient(settings) as client:
        run_id = client.start(sagas.two, {})
    login_role(admin_conn, "saga_test_readonly", "saga_readonly")
    with psycopg.connect(
        make_conninfo(database_url, user="saga_test_readonly"), autocommit=True
    ) as conn:
        assert conn.execute(
            "SELECT count(*) FROM saga_runs WHERE run_id = %s", (run_id,)
        ).fetchone() == (1,)
        assert conn.execute("SELECT count(*) FROM saga_steps").fetchone() is not None
        for statement in (
            "UPDATE saga_runs SET state = 'cancelled'",
            "DELETE FROM saga_steps",
            "INSERT INTO saga_events (run_id, name, payload) VALUES ('x', 'y', '{}')",
            "UPDATE saga_outbox SET published_at = now()",
            "SELECT nextval('saga_completion_seq')",
        ):
            with pytest.raises(errors.InsufficientPrivilege):
                conn.execute(statement)


# -- key prefix -----------------------------------------------------------------------------------


def test_keys_carry_the_prefix_of_the_run_and_a_run_in_flight_keeps_its_own(
    settings: Settings, procs: ProcessGroup, db: Conn
) -> None:
    staging = settings.model_copy(update={"key_prefix": "staging"})
    with SagaClient(settings) as old, SagaClient(staging) as new:
        before = old.start(sagas.two, {})  # started before the prefix was set: in flight
        # Worker and relay now run with the prefix.
        procs.relay(staging)
        procs.worker(staging, "w1")
        after = new.start(sagas.two, {})
        for run_id in (before, after):
            assert new.result(run_id, timeout=60)["trail"] == [1, 2]
        keys = dict(
            db.execute(
                "SELECT run_id || ' ' || step, idempotency_key FROM test_calls "
                "WHERE run_id = ANY(%s)",
                ([before, after],),
            ).fetchall()
        )
        assert keys == {
            f"{before} step1": f"{before}:step1",
            f"{before} step2": f"{before}:step2",
            f"{after} step1": f"staging:{after}:step1",
            f"{after} step2": f"staging:{after}:step2",
        }
        forked = new.fork(before, "step2")
        assert new.result(forked, timeout=60)["trail"] == [1, 2]
        assert {s.step_key: s.idempotency_key for s in new.steps(forked)} == {
            "step1": f"staging:{forked}:step1",
            "step2": f"staging:{forked}:step2",
        }
