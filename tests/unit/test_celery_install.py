"""``saga.celery.install`` on a user's app, broker options, beat run ids, step names for Celery's
tools, and the remote-control allow list. No services: apps on the in-memory broker."""

from __future__ import annotations

import datetime as dt
import os
import ssl
from typing import Any

import pytest
from celery import Celery
from celery.schedules import crontab, schedule

import saga.celery
from saga.errors import ConfigurationError
from saga.messages import StartMessage, StepMessage
from saga.settings import Settings
from saga.workers import control
from saga.workers.app import assert_safe
from saga.workers.broker_options import tls_options
from saga.workers.install import ENGINE_TASKS
from saga.workers.intake import shadow_name
from saga.workers.registry import installation
from saga.workers.schedule import (
    period_of,
    restore_kwargs,
    run_id_for,
    scheduled_run_id,
    stamp_fired_at,
    tick_of,
)


@pytest.fixture(autouse=True)
def clean_env(monkeypatch: pytest.MonkeyPatch) -> None:
    for key in list(os.environ):
        if key.upper().startswith("SAGA_"):
            monkeypatch.delenv(key)


def settings(**fields: Any) -> Settings:
    return Settings(database_url="postgresql://x/y", **fields)


def user_app(broker: str = "memory://", **conf: Any) -> Celery:
    app = Celery("proj", broker=broker, set_as_current=False)
    app.conf.update(conf)
    return app


# --- install on the user's app -----------------------------------------------------------------


def test_install_keeps_the_users_configuration_and_holds_only_the_engine_to_json() -> None:
    app = user_app(
        accept_content=["json", "pickle"],
        task_serializer="pickle",
        task_routes={"proj.*": {"queue": "proj"}},
        broker_transport_options={"visibility_timeout": 7200, "priority_steps": [0, 9]},
    )
    saga.celery.install(app, settings())
    assert app.conf.task_serializer == "pickle"
    assert list(app.conf.accept_content) == ["json", "pickle"]
    assert app.conf.task_routes == {"proj.*": {"queue": "proj"}}
    assert app.conf.broker_transport_options == {
        "visibility_timeout": 7200,
        "priority_steps": [0, 9],
    }
    assert app.conf.worker_consumer == "saga.workers.intake:GuardedConsumer"
    for name in ENGINE_TASKS:
        task = app.tasks[name]
        assert (task.serializer, task.acks_late, task.ignore_result) == ("json", True, True)
    assert_safe(app, whole_app=False)  # the engine's tasks are safe on a pickle app
    with pytest.raises(ConfigurationError, match="pickle"):
        assert_safe(app)
    assert not installation(app).exclusive


def test_install_twice_changes_nothing() -> None:
    app = user_app()
    first = saga.celery.install(app, settings(queue="one"))
    assert saga.celery.install(app, settings(queue="two")) is first
    assert installation(app).settings.queue == "one"


def test_an_app_without_install_says_what_to_call() -> None:
    with pytest.raises(ConfigurationError, match=r"saga\.celery\.install\(app\)"):
        installation(user_app())


def test_a_broker_from_settings_fills_an_app_without_one() -> None:
    app = Celery("proj", set_as_current=False)
    saga.celery.install(app, settings(broker_url="memory://filled"))
    assert app.conf.broker_url == "memory://filled"


def test_two_different_brokers_are_refused() -> None:
    with pytest.raises(ConfigurationError, match="SAGA_BROKER_URL differs"):
        saga.celery.install(user_app("memory://a"), settings(broker_url="memory://b"))


def test_app_wide_compression_is_refused_with_the_way_out() -> None:
    with pytest.raises(ConfigurationError, match=r"compression=\.\.\."):
        saga.celery.install(user_app(task_compression="gzip"), settings())


def test_task_events_by_setting() -> None:
    app = saga.celery.install(user_app(), settings(task_events=True))
    assert app.conf.worker_send_task_events is True


def test_a_consumer_that_does_not_vet_is_refused_at_start() -> None:
    from saga.workers.install import run_checks

    # Celery's own consumer by another path: the user's choice, kept, and refused at start.
    own = "celery.worker.consumer.consumer:Consumer"
    app = saga.celery.install(user_app(worker_consumer=own), settings())
    assert app.conf.worker_consumer == own
    with pytest.raises(ConfigurationError, match="GuardedConsumer"):
        run_checks(app)


# --- broker security and scale -----------------------------------------------------------------


def test_bare_rediss_verifies_the_certificate() -> None:
    app = saga.celery.install(user_app("rediss://cache:6380/0"), settings())
    assert app.conf.broker_use_ssl == {
        "ssl_cert_reqs": ssl.CERT_REQUIRED,
        "ssl_check_hostname": True,
    }


def test_tls_files_from_settings() -> None:
    s = settings(broker_ca_file="/ca.pem", broker_cert_file="/c.pem", broker_key_file="/k.pem")
    assert tls_options("rediss://h/0", s) == {
        "ssl_cert_reqs": ssl.CERT_REQUIRED,
        "ssl_check_hostname": True,
        "ssl_ca_certs": "/ca.pem",
        "ssl_certfile": "/c.pem",
        "ssl_keyfile": "/k.pem",
    }
    assert tls_options("amqps://u:p@rabbit:5671//", s) == {
        "cert_reqs": ssl.CERT_REQUIRED,
        "server_hostname": "rabbit",
        "ca_certs": "/ca.pem",
        "certfile": "/c.pem",
        "keyfile": "/k.pem",
    }
    assert tls_options("redis://h/0", s) is None


def test_the_users_own_tls_options_stay() -> None:
    own = {"ssl_cert_reqs": ssl.CERT_REQUIRED, "ssl_ca_certs": "/mine.pem"}
    app = saga.celery.install(user_app("rediss://h/0", broker_use_ssl=own), settings())
    assert app.conf.broker_use_ssl == own


def test_sentinel_needs_a_master_name() -> None:
    with pytest.raises(ConfigurationError, match="SAGA_BROKER_SENTINEL_MASTER"):
        saga.celery.install(user_app("sentinel://h:26379"), settings())
    app = saga.celery.install(
        user_app("sentinel://h:26379"), settings(broker_sentinel_master="mymaster")
    )
    assert app.conf.broker_transport_options["master_name"] == "mymaster"


def test_rabbitmq_keeps_publisher_confirms_and_takes_quorum_queues() -> None:
    app = user_app("amqp://u:p@h//", broker_transport_options={"confirm_publish": False})
    saga.celery.install(app, settings(queue_type="quorum"))
    assert app.conf.broker_transport_options["confirm_publish"] is True
    assert app.conf.task_default_queue_type == "quorum"
    assert app.conf.task_create_missing_queue_type == "quorum"
    assert app.amqp.queues["steps"].queue_arguments == {"x-queue-type": "quorum"}


# --- beat ---------------------------------------------------------------------------------------


def test_period_of_each_kind_of_schedule() -> None:
    assert period_of(30) == 30.0
    assert period_of(dt.timedelta(hours=1)) == 3600.0
    assert period_of(schedule(dt.timedelta(minutes=5))) == 300.0
    assert period_of(crontab(minute=0, hour=3)) == 60.0


def test_two_fires_of_one_tick_name_one_run_and_the_next_tick_another() -> None:
    beat = {"hourly": {"task": "saga.start", "schedule": 3600.0}}
    first = run_id_for("hourly", beat, 7_200.5)
    assert run_id_for("hourly", beat, 7_260.0) == first  # fired again, a minute later
    assert run_id_for("hourly", beat, 10_800.5) != first  # the next tick
    assert first == "hourly-19700101T020000Z"


def test_the_sender_names_the_run_and_leaves_the_callers_kwargs_as_they_were() -> None:
    beat = {"fast": {"task": "saga.start", "schedule": 10.0}}
    kwargs = {"saga": "m:s", "schedule": "fast"}
    body = ((), kwargs, {})
    stamp_fired_at(sender="saga.start", body=body, beat_schedule=beat)
    sent = dict(kwargs)  # what the message carries
    restore_kwargs()
    assert kwargs == {"saga": "m:s", "schedule": "fast"}
    assert sent["run_id"] == run_id_for("fast", beat, sent["fired_at"])
    assert sent["run_id"] == scheduled_run_id("fast", tick_of(sent["fired_at"], 10.0))
    # An entry this process does not know: the time only; the worker names the run.
    other = {"saga": "m:s", "schedule": "elsewhere"}
    stamp_fired_at(sender="saga.start", body=((), other, {}), beat_schedule=beat)
    assert set(other) == {"saga", "schedule", "fired_at"}
    restore_kwargs()
    assert set(other) == {"saga", "schedule"}


def test_a_schedule_name_is_made_fit_for_a_run_id_without_collisions() -> None:
    tick = tick_of(0.0, 60.0)
    assert scheduled_run_id("nightly report", tick) != scheduled_run_id("nightly:report", tick)
    assert scheduled_run_id("nightly report", tick).startswith("nightly-report-")


# --- Celery's tools ----------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("key", "name"),
    [
        ("book_flight", "saga.step[book_flight]"),
        ("decide#3", "saga.step[decide]"),
        ("search[2]", "saga.step[search]"),
        ("compensate:book_flight#4", "saga.compensate[book_flight]"),
    ],
)
def test_each_attempt_is_shown_under_its_steps_name(key: str, name: str) -> None:
    assert shadow_name(StepMessage(run_id="r", step_key=key)) == name


def test_a_scheduled_start_is_shown_under_its_schedule() -> None:
    start = StartMessage(saga="m:s", schedule="nightly")
    assert shadow_name(start) == "saga.start[nightly]"


class _Node:
    def __init__(self) -> None:
        self.ran: list[str] = []

    def handle(self, method: str, arguments: Any = None) -> Any:
        self.ran.append(method)
        return {"ok": "pong"}

    def Consumer(self, **kwargs: Any) -> dict[str, Any]:
        return kwargs


class _Box:
    def __init__(self) -> None:
        self.node = _Node()
        self.received: list[Any] = []

    def on_message(self, body: Any, message: Any) -> None:
        self.received.append(body)


class _Step:
    def __init__(self) -> None:
        self.box = _Box()


def test_remote_control_runs_inspection_commands_only() -> None:
    step = _Step()
    consumer = type("C", (), {"blueprint": type("B", (), {"steps": {"control": step}})()})()
    control.restrict(consumer)
    node = step.box.node
    assert node.handle("ping") == {"ok": "pong"}
    for command in ("shutdown", "pool_restart", "revoke", "cancel_consumer", "nonsense", None):
        assert "refused" in node.handle(command, {})["error"]
    assert node.handle("stats", ["not", "an", "object"]) == {
        "error": "control arguments must be a JSON object"
    }
    assert node.ran == ["ping"]
    assert node.Consumer()["accept"] == ["json"]


@pytest.mark.parametrize(
    "body",
    [
        ["a", "list"],
        {"arguments": {}},
        {"method": {"nested": 1}},
        {"method": "ping", "arguments": "text"},
        {"method": "ping", "destination": "host"},
        {"method": "ping", "reply_to": {"exchange": 1}},
    ],
)
def test_a_malformed_broadcast_is_dropped_before_celery_sees_it(body: Any) -> None:
    step = _Step()
    consumer = type("C", (), {"blueprint": type("B", (), {"steps": {"control": step}})()})()
    control.restrict(consumer)
    step.box.on_message(body, None)
    step.box.on_message({"method": "ping", "arguments": {}, "reply_to": None}, None)
    assert step.box.received == [{"method": "ping", "arguments": {}, "reply_to": None}]


def test_saga_celery_does_not_shadow_the_celery_package() -> None:
    import celery

    from saga.workers import install

    assert celery.__name__ == "celery" and celery.__file__ != saga.celery.__file__
    assert install.Celery is celery.Celery  # `from celery import ...` in saga's own modules
