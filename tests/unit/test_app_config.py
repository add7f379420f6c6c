"""The Celery app's safe configuration, the task message shape, and journaled error records."""

from __future__ import annotations

import json
import os
import pickle

import pydantic
import pytest
from celery import Celery
from kombu.serialization import loads, prepare_accept_content

from saga.errors import ConfigurationError, StepResultError
from saga.failures import MAX_ERROR_TEXT, error_record
from saga.messages import AdvanceMessage, StepMessage
from saga.settings import Settings
from saga.workers.app import assert_safe, broker_options, create_app
from saga.workers.install import installation


@pytest.fixture(autouse=True)
def clean_env(monkeypatch: pytest.MonkeyPatch) -> None:
    for key in list(os.environ):
        if key.upper().startswith("SAGA_"):
            monkeypatch.delenv(key)


@pytest.fixture
def settings() -> Settings:
    return Settings(broker_url="memory://", database_url="postgresql://x/y")


@pytest.fixture
def app(settings: Settings) -> Celery:
    return create_app(settings)


# --- create_app --------------------------------------------------------------------------------


def test_json_only(app: Celery) -> None:
    conf = app.conf
    assert list(conf.accept_content) == ["json"]
    assert list(conf.result_accept_content) == ["json"]
    assert conf.task_serializer == "json"
    assert conf.result_serializer == "json"
    assert conf.event_serializer == "json"


def test_delivery_guarantees(app: Celery, settings: Settings) -> None:
    conf = app.conf
    assert conf.task_acks_late is True
    assert conf.task_reject_on_worker_lost is True
    assert conf.worker_prefetch_multiplier == 1
    assert conf.task_ignore_result is True
    assert conf.task_default_queue == settings.queue
    assert installation(app).settings == settings
    assert installation(app).exclusive


@pytest.mark.parametrize("name", ["saga.step", "saga.advance"])
def test_registers_the_engine_tasks(app: Celery, name: str) -> None:
    assert name in app.tasks
    task = app.tasks[name]
    assert task.acks_late is True
    assert task.reject_on_worker_lost is True


def test_queue_comes_from_settings() -> None:
    app = create_app(Settings(broker_url="memory://", queue="jobs-7"))
    assert app.conf.task_default_queue == "jobs-7"


def test_broker_url_argument_overrides_settings(settings: Settings) -> None:
    app = create_app(settings, broker_url="memory://other")
    assert app.conf.broker_url == "memory://other"


def test_no_broker_is_a_configuration_error() -> None:
    with pytest.raises(ConfigurationError, match="SAGA_BROKER_URL"):
        create_app(Settings())


@pytest.mark.parametrize(
    "url", ["redis://localhost:6379/0", "rediss://host:6380/1", "redis+socket:///tmp/r.sock"]
)
def test_redis_broker_sets_visibility_timeout_from_settings(url: str) -> None:
    settings = Settings(broker_url=url, visibility_timeout_seconds=1234.5)
    app = create_app(settings)
    assert app.conf.broker_transport_options == {"visibility_timeout": 1234.5}
    assert broker_options(url, settings) == {"visibility_timeout": 1234.5}


@pytest.mark.parametrize("url", ["amqp://guest@localhost//", "pyamqp://h//", "amqps://h//"])
def test_amqp_broker_sets_confirm_publish(url: str) -> None:
    app = create_app(Settings(broker_url=url))
    assert app.conf.broker_transport_options == {"confirm_publish": True}


def test_memory_broker_has_no_transport_options(app: Celery) -> None:
    assert app.conf.broker_transport_options == {}


# --- assert_safe -------------------------------------------------------------------------------


def test_assert_safe_passes_on_the_created_app(app: Celery) -> None:
    assert_safe(app)


@pytest.mark.parametrize(
    "accept", [["json", "pickle"], ["pickle"], ["JSON", "Pickle"], ("json", "pickle")]
)
def test_assert_safe_refuses_pickle_in_accept_content(app: Celery, accept: list[str]) -> None:
    app.conf.accept_content = accept
    with pytest.raises(ConfigurationError, match=r"unsafe Celery configuration.*pickle"):
        assert_safe(app)


@pytest.mark.parametrize("serializer", ["pickle", "yaml", "msgpack"])
def test_assert_safe_refuses_a_non_json_task_serializer(app: Celery, serializer: str) -> None:
    app.conf.task_serializer = serializer
    with pytest.raises(ConfigurationError, match="unsafe Celery configuration") as info:
        assert_safe(app)
    assert serializer in str(info.value)


def test_assert_safe_refuses_early_acks(app: Celery) -> None:
    app.conf.task_acks_late = False
    with pytest.raises(ConfigurationError, match="task_acks_late is off"):
        assert_safe(app)


def test_assert_safe_reports_every_problem(app: Celery) -> None:
    app.conf.task_serializer = "pickle"
    app.conf.task_acks_late = False
    with pytest.raises(ConfigurationError) as info:
        assert_safe(app)
    assert "pickle" in str(info.value) and "task_acks_late" in str(info.value)


def test_pickle_by_content_type_is_really_accepted_by_kombu(app: Celery) -> None:
    # Why content types matter below: Celery accepts MIME types in accept_content, and kombu then
    # unpickles such a message body.
    app.conf.accept_content = ["json", "application/x-python-serialize"]
    accept = prepare_accept_content(app.conf.accept_content)
    body = pickle.dumps({"unpickled": True})
    assert loads(body, "application/x-python-serialize", "binary", accept=accept) == {
        "unpickled": True
    }


@pytest.mark.parametrize(
    "accept",
    [
        ["json", "application/x-python-serialize"],  # pickle by content type
        ["application/x-python-serialize"],
        ["json", "yaml"],
        ["application/x-yaml"],
        ["json", "msgpack"],
    ],
)
def test_assert_safe_refuses_anything_but_json(app: Celery, accept: list[str]) -> None:
    app.conf.accept_content = accept
    with pytest.raises(ConfigurationError, match="unsafe Celery configuration"):
        assert_safe(app)


@pytest.mark.parametrize("accept", [["json"], ["application/json"], ["JSON"]])
def test_assert_safe_accepts_json_by_name_or_content_type(app: Celery, accept: list[str]) -> None:
    app.conf.accept_content = accept
    assert_safe(app)


# --- StepMessage -------------------------------------------------------------------------------


def test_step_message_accepts_the_engine_shape() -> None:
    msg = StepMessage.model_validate({"run_id": "r-1", "step_key": "charge"})
    assert (msg.run_id, msg.step_key) == ("r-1", "charge")
    with pytest.raises(pydantic.ValidationError):
        msg.run_id = "other"  # type: ignore[misc]


@pytest.mark.parametrize(
    "kwargs",
    [
        {"run_id": "r", "step_key": "s", "extra": 1},
        {"run_id": "r", "step_key": "s", "attempt": 2},
    ],
)
def test_step_message_refuses_extra_keys(kwargs: dict[str, object]) -> None:
    with pytest.raises(pydantic.ValidationError) as info:
        StepMessage.model_validate(kwargs)
    assert {e["type"] for e in info.value.errors()} == {"extra_forbidden"}


@pytest.mark.parametrize(
    ("kwargs", "missing"),
    [
        ({"run_id": "r"}, {"step_key"}),
        ({"step_key": "s"}, {"run_id"}),
        ({}, {"run_id", "step_key"}),
    ],
)
def test_step_message_refuses_missing_keys(kwargs: dict[str, object], missing: set[str]) -> None:
    with pytest.raises(pydantic.ValidationError) as info:
        StepMessage.model_validate(kwargs)
    errors = info.value.errors()
    assert {e["type"] for e in errors} == {"missing"}
    assert {e["loc"][0] for e in errors} == missing


@pytest.mark.parametrize(
    "kwargs",
    [
        {"run_id": "", "step_key": "s"},
        {"run_id": "r", "step_key": ""},
        {"run_id": "r" * 201, "step_key": "s"},
        {"run_id": "r", "step_key": "s" * 501},
        {"run_id": None, "step_key": "s"},
        {"run_id": ["r"], "step_key": "s"},
    ],
)
def test_step_message_refuses_bad_values(kwargs: dict[str, object]) -> None:
    with pytest.raises(pydantic.ValidationError):
        StepMessage.model_validate(kwargs)


def test_advance_message_shape() -> None:
    assert AdvanceMessage.model_validate({"run_id": "r-1"}).run_id == "r-1"
    for bad in ({}, {"run_id": ""}, {"run_id": "r", "step_key": "s"}, {"run_id": "r" * 201}):
        with pytest.raises(pydantic.ValidationError):
            AdvanceMessage.model_validate(bad)


# --- error_record ------------------------------------------------------------------------------


def raised(exc: BaseException) -> BaseException:
    try:
        raise exc
    except BaseException as caught:
        return caught


def test_error_record_fields() -> None:
    exc = raised(ValueError("the input is wrong"))
    record = error_record(exc, attempt=3, retryable=False, traceback=True)
    assert set(record) == {"type", "message", "attempt", "retryable", "traceback", "failed_at"}
    assert record["type"] == "builtins.ValueError"
    assert record["message"] == "the input is wrong"
    assert record["attempt"] == 3
    assert record["retryable"] is False
    assert "ValueError: the input is wrong" in record["traceback"]
    assert "raised" in record["traceback"]  # the frame that raised it


def test_error_record_type_is_module_and_qualified_name() -> None:
    class Inner(RuntimeError):
        pass

    record = error_record(raised(Inner("x")), attempt=1, retryable=True, traceback=True)
    assert record["type"] == f"{__name__}.{Inner.__qualname__}"
    assert record["type"].endswith("<locals>.Inner")
    assert record["retryable"] is True
    assert error_record(StepResultError("big"))["type"] == "saga.errors.StepResultError"


def test_error_record_of_an_exception_never_raised() -> None:
    record = error_record(KeyError("k"), attempt=1, retryable=True, traceback=True)
    assert record["message"] == "'k'"
    assert "KeyError" in record["traceback"]


def test_error_record_truncates_huge_messages_and_tracebacks() -> None:
    huge = "A" * 50_000 + "END"
    record = error_record(raised(RuntimeError(huge)), attempt=2, retryable=True, traceback=True)
    assert len(record["message"]) == MAX_ERROR_TEXT
    assert record["message"] == huge[:MAX_ERROR_TEXT]
    assert len(record["traceback"]) <= MAX_ERROR_TEXT
    # The tail of the traceback is kept: it ends with the exception line.
    assert record["traceback"].rstrip().endswith("END")


def test_error_record_is_json_serialisable() -> None:
    record = error_record(
        raised(OSError(5, "I/O error: é")), attempt=1, retryable=True, traceback=True
    )
    assert json.loads(json.dumps(record)) == record


def test_an_error_record_escapes_what_postgres_cannot_store() -> None:
    text = b"\xff".decode("utf-8", "surrogateescape") + "x\x00"  # a lone surrogate, a NUL
    record = error_record(ValueError(text), attempt=1, traceback=True)
    assert record["message"] == "\\udcffx\\x00"
    assert "\x00" not in record["traceback"]
    record["traceback"].encode("utf-8")  # no lone surrogate left: it encodes


def test_a_run_that_cannot_advance_past_a_failure_stops_in_the_state_that_fits() -> None:
    from saga.workers.executor import StepExecutor
    from tests import coordinator_sagas as cs
    from tests.unit.memory_run import Sim

    error = error_record("Boom", "boom", attempt=1)
    running = Sim(cs.trip, {"city": "Oslo"}).start()
    running.store.advance_run(running.run_id, StepExecutor._fail_run(error, KeyError("bug")))
    assert running.run.state == "failed"
    assert "could not advance past it (KeyError" in running.run.error["message"]

    undoing = Sim(cs.trip, {"city": "Oslo"}).start()
    undoing.complete("quote", {"city": "Oslo", "price": 1})
    undoing.complete("flight", {"kind": "flight", "ref": "f"})
    undoing.fail("hotel", "Boom", "no rooms")
    assert undoing.run.state == "compensating"
    undoing.store.advance_run(undoing.run_id, StepExecutor._fail_run(error, KeyError("bug")))
    assert undoing.run.state == "compensation_failed"  # a retry goes on undoing
    assert undoing.run.error["message"] == "no rooms"


def test_what_the_sender_builds_is_what_the_worker_parses() -> None:
    from saga.messages import advance_message, parse, step_message

    step = step_message("q", "r-1", "charge#2", {"traceparent": "t"})
    assert parse(StepMessage, [], step.payload) == StepMessage(run_id="r-1", step_key="charge#2")
    advance = advance_message("q", "r-1", {})
    assert parse(AdvanceMessage, [], advance.payload) == AdvanceMessage(run_id="r-1")
    assert set(step.payload) == set(StepMessage.model_fields)
    assert set(advance.payload) == set(AdvanceMessage.model_fields)
