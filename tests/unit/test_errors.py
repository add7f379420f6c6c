"""Every SagaError survives pickling and Celery's JSON exception serialization."""

from __future__ import annotations

import copy
import inspect
import json
import pickle

import pytest
from celery import Celery
from celery.backends.base import Backend

import saga
import saga.coordinator
import saga.errors
import saga.store
import saga.workflow
from saga.errors import SagaError

ERRORS_MODULE_TYPES = [
    obj
    for _, obj in inspect.getmembers(saga.errors, inspect.isclass)
    if issubclass(obj, SagaError) and obj.__module__ == saga.errors.__name__
]


def all_subclasses(cls: type[SagaError]) -> set[type[SagaError]]:
    found = set(cls.__subclasses__())
    for sub in list(found):
        found |= all_subclasses(sub)
    return found


# Those of saga.errors, and every other SagaError the package defines (coordinator, workflow,
# store...), found once the package's modules are imported.
ERROR_TYPES = sorted(
    {
        *ERRORS_MODULE_TYPES,
        *(t for t in all_subclasses(SagaError) if t.__module__.startswith(("saga.",))),
    },
    key=lambda t: f"{t.__module__}.{t.__qualname__}",
)

MESSAGES = [
    "run 'r-1' failed at step 'charge': run `saga retry r-1`",
    "",
    "unicode: é ✓ 日本",
    "x" * 10_000,
    "quotes ' \" and newline\nand tab\t",
]


def test_the_error_module_is_fully_covered() -> None:
    # Guard the discovery itself: a rename must not silently shrink the parametrised tests.
    names = {t.__name__ for t in ERROR_TYPES}
    assert {
        "SagaError",
        "ConfigurationError",
        "DefinitionError",
        "UnknownSagaError",
        "RunNotFoundError",
        "RunConflictError",
        "RunFailedError",
        "WaitTimeoutError",
        "StepResultError",
        "MalformedMessageError",
        "StoreError",
        "MigrationError",
    } <= names
    assert set(ERRORS_MODULE_TYPES) <= set(ERROR_TYPES)


@pytest.mark.parametrize("error_type", ERROR_TYPES, ids=lambda t: f"{t.__module__}.{t.__name__}")
@pytest.mark.parametrize("message", MESSAGES, ids=range(len(MESSAGES)))
@pytest.mark.parametrize("protocol", [2, pickle.HIGHEST_PROTOCOL])
def test_pickle_round_trip(error_type: type[SagaError], message: str, protocol: int) -> None:
    original = error_type(message)
    restored = pickle.loads(pickle.dumps(original, protocol=protocol))
    assert type(restored) is error_type
    assert str(restored) == message
    assert restored.args == (message,)


@pytest.mark.parametrize("error_type", ERROR_TYPES, ids=lambda t: f"{t.__module__}.{t.__name__}")
def test_pickle_round_trip_of_a_raised_error_with_a_cause(error_type: type[SagaError]) -> None:
    try:
        try:
            raise OSError("connection reset")
        except OSError as cause:
            raise error_type(f"{error_type.__name__}: wrapped") from cause
    except SagaError as exc:
        raised = exc
    restored = pickle.loads(pickle.dumps(raised))
    assert type(restored) is error_type
    assert str(restored) == f"{error_type.__name__}: wrapped"


@pytest.mark.parametrize("error_type", ERROR_TYPES, ids=lambda t: f"{t.__module__}.{t.__name__}")
def test_copy_round_trip(error_type: type[SagaError]) -> None:
    original = error_type("copied")
    for clone in (copy.copy(original), copy.deepcopy(original)):
        assert type(clone) is error_type
        assert str(clone) == "copied"


@pytest.mark.parametrize("error_type", ERROR_TYPES, ids=lambda t: f"{t.__module__}.{t.__name__}")
def test_str_is_json_friendly(error_type: type[SagaError]) -> None:
    message = "step 'a' of run 'r' failed"
    assert json.loads(json.dumps(str(error_type(message)))) == message


@pytest.fixture(scope="module")
def json_backend() -> Backend:
    """Celery's base result backend with the JSON serializer (no service behind it)."""
    app = Celery("errors-test", set_as_current=False, broker="memory://")
    app.conf.result_serializer = "json"
    app.conf.accept_content = ["json"]
    app.conf.result_accept_content = ["json"]
    backend = Backend(app=app)
    assert backend.serializer == "json"
    return backend


@pytest.mark.parametrize("error_type", ERROR_TYPES, ids=lambda t: f"{t.__module__}.{t.__name__}")
@pytest.mark.parametrize("message", MESSAGES, ids=range(len(MESSAGES)))
def test_celery_json_exception_round_trip(
    json_backend: Backend, error_type: type[SagaError], message: str
) -> None:
    prepared = json_backend.prepare_exception(error_type(message))
    assert prepared["exc_module"] == error_type.__module__
    assert prepared["exc_type"] == error_type.__qualname__
    # Through the real wire encoding, as a result backend stores it.
    payload = json_backend.encode(prepared)
    assert json.loads(payload)["exc_message"] == [message]  # plain JSON on the wire
    decoded = json_backend.decode(payload)
    restored = json_backend.exception_to_python(decoded)
    assert type(restored) is error_type
    assert str(restored) == message
    assert restored.args == (message,)
