"""Saga definitions: graph structure, validation errors, typed steps, result encoding, refs."""

from __future__ import annotations

import json
from typing import Any

import pydantic
import pytest

from saga.definition import (
    Saga,
    StepContext,
    StepOptions,
    function_by_ref,
    step,
)
from saga.errors import DefinitionError, InputError, StepResultError, UnknownSagaError
from saga.loader import load_definition
from saga.retry import RetryPolicy
from tests import sagas

MODULE = __name__


def fetch(ctx: StepContext, value: Any) -> Any:
    return value


def summarise(ctx: StepContext, value: Any) -> Any:
    return value


def store(ctx: StepContext, value: Any) -> Any:
    return value


def undo(ctx: StepContext, value: Any) -> None:
    return None


class Order(pydantic.BaseModel):
    order_id: int
    amount: float


class Receipt(pydantic.BaseModel):
    order_id: int
    paid: bool


def charge(ctx: StepContext, order: Order) -> Receipt:
    return Receipt(order_id=order.order_id, paid=True)


def untyped_returns_model(ctx, value):  # type: ignore[no-untyped-def]
    return Receipt(order_id=value, paid=False)


def no_params() -> None:
    pass


def one_param(ctx):  # type: ignore[no-untyped-def]
    pass


def three_params(ctx, value, more):  # type: ignore[no-untyped-def]
    pass


def required_keyword(ctx, value, *, key):  # type: ignore[no-untyped-def]
    pass


def flexible(ctx: StepContext, value: Any, extra: int = 1, *args: Any, **kw: Any) -> Any:
    return value


def hinted(ctx: StepContext, value: NoSuchType) -> Any:  # type: ignore[name-defined]  # noqa: F821
    return value


class Holder:
    def method(self, ctx: StepContext, value: Any) -> Any:
        return value


# Module-level definitions, so ref() can find them.
module_level = Saga("module_level", [fetch, summarise])

decorated = Saga("decorated")


@decorated.step()
def quote(ctx: StepContext, request: Any) -> Any:
    return request


@decorated.step(after=quote, compensate=undo)
def book(ctx: StepContext, q: Any) -> Any:
    return q


@decorated.step(after="quote")
def notify(ctx: StepContext, q: Any) -> Any:
    return q


@decorated.step(after=[book, notify])
def finish(ctx: StepContext, results: Any) -> Any:
    return results


SLOW = RetryPolicy(max_attempts=2, initial_backoff_seconds=5.0, max_backoff_seconds=5.0)


def names(steps: Any) -> list[str]:
    return [s.name for s in steps]


# --- structure -------------------------------------------------------------------------------


def test_linear_saga_order_first_next_and_lookup() -> None:
    saga = Saga("pipeline", [fetch, summarise, store])
    assert names(saga.steps) == ["fetch", "summarise", "store"]
    # The first step, and each step's next.
    assert names(saga.roots) == ["fetch"]
    assert names(saga.successors("fetch")) == ["summarise"]
    assert names(saga.successors("summarise")) == ["store"]
    assert saga.successors("store") == ()
    assert names(saga.sinks) == ["store"]
    # Lookup by name.
    assert saga.get_step("store").function.fn is store
    assert saga.get_step("summarise").after == ("fetch",)
    assert saga.get_step("fetch").after == ()
    assert saga.version == "1"
    assert "pipeline" in repr(saga) and "summarise" in repr(saga)


def test_unknown_step_names_the_saga_and_its_steps() -> None:
    saga = Saga("pipeline", [fetch, summarise])
    with pytest.raises(UnknownSagaError) as info:
        saga.get_step("nope")
    message = str(info.value)
    assert "'pipeline'" in message and "'nope'" in message
    assert "['fetch', 'summarise']" in message


def test_single_step_saga() -> None:
    saga = Saga("one", [fetch])
    assert names(saga.roots) == names(saga.sinks) == ["fetch"]
    assert saga.successors("fetch") == ()


def test_decorated_graph() -> None:
    assert names(decorated.roots) == ["quote"]
    assert names(decorated.successors("quote")) == ["book", "notify"]
    assert decorated.get_step("finish").after == ("book", "notify")
    assert names(decorated.sinks) == ["finish"]
    book_step = decorated.get_step("book")
    assert book_step.compensation is not None
    assert book_step.compensation.ref == f"{MODULE}:undo"
    assert decorated.ref() == f"{MODULE}:decorated"


def test_step_functions_are_known_by_reference() -> None:
    saga = Saga("refs", [fetch])
    info = saga.get_step("fetch").function
    assert info.ref == f"{MODULE}:fetch"
    assert function_by_ref(info.ref).fn is fetch
    assert function_by_ref("tests.sagas:step3").fn is sagas.ten.get_step("step3").function.fn


def test_step_options_and_default_retry() -> None:
    saga = Saga(
        "opts",
        [fetch, step(summarise, name="summary.v2", retry=SLOW, timeout=2.5, pivot=True)],
        version="7",
        retry=RetryPolicy(max_attempts=9),
    )
    assert saga.version == "7"
    assert saga.get_step("fetch").options == StepOptions(retry=RetryPolicy(max_attempts=9))
    renamed = saga.get_step("summary.v2")
    assert renamed.function.fn is summarise
    assert renamed.options == StepOptions(retry=SLOW, timeout_seconds=2.5, pivot=True)
    assert names(saga.successors("fetch")) == ["summary.v2"]


def test_step_options_json_round_trip() -> None:
    options = StepOptions(
        retry=RetryPolicy(max_attempts=3, non_retryable=(ValueError,)),
        timeout_seconds=4.0,
        pivot=True,
    )
    data = json.loads(json.dumps(options.to_json()))
    restored = StepOptions.from_json(data)
    assert restored.to_json() == options.to_json()
    assert restored.retry.decide(1, ValueError()).retry is False
    assert StepOptions.from_json({}) == StepOptions()


def test_default_retry_is_a_default_policy() -> None:
    assert Saga("d", [fetch]).get_step("fetch").options.retry == RetryPolicy()


def test_extra_optional_parameters_are_allowed() -> None:
    assert names(Saga("flex", [flexible]).steps) == ["flexible"]


def test_step_context_loads_results_lazily_once() -> None:
    loads: list[int] = []

    def load() -> dict[str, Any]:
        loads.append(1)
        return {"fetch": {"x": 1}}

    ctx = StepContext(
        run_id="r",
        saga="s",
        step="b",
        step_key="b",
        attempt=2,
        idempotency_key="r:b",
        run_input={"in": 1},
        load_results=load,
    )
    assert loads == []
    assert ctx.results == {"fetch": {"x": 1}}
    assert ctx.results == {"fetch": {"x": 1}}
    assert loads == [1]


# --- validation errors -------------------------------------------------------------------------


@pytest.mark.parametrize(
    "fn", [no_params, one_param, three_params, required_keyword], ids=lambda f: f.__name__
)
def test_wrong_arity_names_saga_and_step(fn: Any) -> None:
    with pytest.raises(DefinitionError) as info:
        Saga("arity", [fetch, fn])
    message = str(info.value)
    assert f"saga 'arity', step '{fn.__name__}'" in message
    assert "exactly two positional parameters" in message


def test_non_callable_step_names_saga_and_step() -> None:
    with pytest.raises(DefinitionError) as info:
        Saga("calls", [step(42, name="answer")])  # type: ignore[arg-type]
    message = str(info.value)
    assert "saga 'calls', step 'answer'" in message
    assert "expected a function, got int" in message


def test_non_callable_step_without_a_name_still_names_the_saga() -> None:
    with pytest.raises(DefinitionError, match="saga 'calls'"):
        Saga("calls", ["fetch"])  # type: ignore[list-item]


def test_nested_functions_and_lambdas_are_refused() -> None:
    def nested(ctx: StepContext, value: Any) -> Any:
        return value

    with pytest.raises(DefinitionError) as info:
        Saga("nest", [nested])
    assert "saga 'nest', step 'nested'" in str(info.value)
    assert "module-level functions" in str(info.value)
    with pytest.raises(DefinitionError, match="module-level functions"):
        Saga("lam", [step(lambda ctx, value: value, name="ok")])
    with pytest.raises(DefinitionError, match=r"step 'fetch', compensation: .*module-level"):
        Saga("comp", [step(fetch, compensate=lambda ctx, value: None)])


def test_bad_retry_value_names_saga_and_step() -> None:
    with pytest.raises(DefinitionError) as info:
        Saga("retries", [step(fetch, retry=3)])  # type: ignore[arg-type]
    message = str(info.value)
    assert "saga 'retries', step 'fetch'" in message
    assert "retry must be a RetryPolicy, got int" in message


def test_falsy_bad_retry_value_is_refused() -> None:
    with pytest.raises(DefinitionError, match="retry must be a RetryPolicy"):
        Saga("retries", [step(fetch, retry=0)])  # type: ignore[arg-type]


def test_bad_saga_level_retry_names_the_saga() -> None:
    with pytest.raises(DefinitionError, match="saga 'retries': retry must be a RetryPolicy"):
        Saga("retries", [fetch], retry={"max_attempts": 3})  # type: ignore[arg-type]
    with pytest.raises(DefinitionError, match="saga 'retries': retry must be a RetryPolicy"):
        Saga("retries", [fetch], retry=0)  # type: ignore[arg-type]


@pytest.mark.parametrize("timeout", [0, -1.0, float("nan")])
def test_bad_timeout_names_saga_and_step(timeout: float) -> None:
    with pytest.raises(DefinitionError, match="saga 't', step 'fetch': timeout must be positive"):
        Saga("t", [step(fetch, timeout=timeout)])


def test_duplicate_step_names_are_refused() -> None:
    with pytest.raises(DefinitionError, match="saga 'dups', step 'fetch': duplicate step name"):
        Saga("dups", [fetch, summarise, fetch])
    with pytest.raises(DefinitionError, match="step 'fetch': duplicate step name"):
        Saga("dups", [fetch, step(summarise, name="fetch")])


def test_empty_saga_is_refused() -> None:
    with pytest.raises(DefinitionError, match="saga 'empty' has no steps"):
        Saga("empty", [])
    undecorated = Saga("empty")
    with pytest.raises(DefinitionError, match="saga 'empty' has no steps"):
        undecorated.validate_input({})


def test_unknown_dependency_and_cycle_are_refused() -> None:
    with pytest.raises(DefinitionError, match=r"step 'b': depends on unknown step\(s\) \['c'\]"):
        Saga("deps", [step(fetch, name="a"), step(fetch, name="b", after="c")])
    with pytest.raises(DefinitionError, match="saga 'cyc' has a dependency cycle"):
        Saga("cyc", [step(fetch, name="a", after="b"), step(summarise, name="b", after="a")])
    graph = Saga("deco_deps")
    with pytest.raises(DefinitionError, match="add dependencies first"):
        graph.step(after="missing")(fetch)


@pytest.mark.parametrize(
    "name", ["", "has space", "1starts_with_digit", "colon:name", "x" * 129, "slash/no", None, 7]
)
def test_bad_saga_names_are_refused(name: Any) -> None:
    with pytest.raises(DefinitionError, match=r"saga name .* must match"):
        Saga(name, [fetch])


@pytest.mark.parametrize("name", ["a", "A_b-c.d", "_x", "x" * 128])
def test_good_names_are_accepted(name: str) -> None:
    saga = Saga(name, [step(fetch, name=name)])
    assert saga.name == name and names(saga.steps) == [name]


@pytest.mark.parametrize("name", ["has space", "compensate:x", "a[0]", "a#1", "x" * 129, "1abc"])
def test_bad_step_names_are_refused(name: str) -> None:
    with pytest.raises(DefinitionError) as info:
        Saga("names", [step(fetch, name=name)])
    assert f"saga 'names', step {name!r}: step names must match" in str(info.value)


def test_names_with_a_trailing_newline_are_refused() -> None:
    with pytest.raises(DefinitionError):
        Saga("newline\n", [fetch])
    with pytest.raises(DefinitionError):
        Saga("ok", [step(fetch, name="fetch\n")])


def test_unresolvable_type_hints_name_saga_and_step() -> None:
    with pytest.raises(DefinitionError, match="saga 'hints', step 'hinted': cannot resolve"):
        Saga("hints", [hinted])


def test_a_bound_method_step_is_refused() -> None:
    # Its signature lacks self, but its ref "module:Class.method" names the plain function,
    # which takes (self, ctx, value): accepting it would fail on every worker.
    with pytest.raises(DefinitionError, match="saga 'bound', step 'method'"):
        Saga("bound", [Holder().method])
    with pytest.raises(DefinitionError, match="exactly two positional parameters"):
        function_by_ref(f"{MODULE}:Holder.method")


# --- typed steps and result encoding ----------------------------------------------------------


def test_typed_step_validates_its_input() -> None:
    info = Saga("typed", [charge]).get_step("charge").function
    order = info.validate_input({"order_id": "12", "amount": 3})
    assert order == Order(order_id=12, amount=3.0)
    with pytest.raises(pydantic.ValidationError):
        info.validate_input({"order_id": "not a number", "amount": 1})
    with pytest.raises(pydantic.ValidationError):
        info.validate_input({"amount": 1})


def test_saga_validates_run_input_against_its_first_step() -> None:
    saga = Saga("typed", [charge])
    assert json.loads(saga.validate_input({"order_id": "12", "amount": 3})) == {
        "order_id": 12,
        "amount": 3.0,
    }
    with pytest.raises(InputError, match=r"saga 'typed': the input does not fit the parameter"):
        saga.validate_input({"order_id": "x"})


def test_untyped_step_passes_input_through() -> None:
    info = Saga("untyped", [fetch]).get_step("fetch").function
    value = {"any": ["thing", 1]}
    assert info.validate_input(value) == value


def ctx_for(name: str) -> StepContext:
    return StepContext(
        run_id="run-1",
        saga="sg",
        step=name,
        step_key=name,
        attempt=1,
        idempotency_key=f"run-1:{name}",
        run_input=None,
        load_results=dict,
    )


def test_typed_step_encodes_a_model_result_to_json() -> None:
    info = Saga("typed", [charge]).get_step("charge").function
    result = info.fn(ctx_for("charge"), info.validate_input({"order_id": 5, "amount": 9.5}))
    text = info.encode_result(result, limit=1000, run_id="run-1", step="charge")
    assert isinstance(text, str)
    assert json.loads(text) == {"order_id": 5, "paid": True}


def test_untyped_step_encodes_a_model_result_to_json() -> None:
    info = Saga("untyped_model", [untyped_returns_model]).steps[0].function
    result = info.fn(ctx_for("untyped_returns_model"), 3)
    text = info.encode_result(result, limit=1000, run_id="run-1", step="s")
    assert json.loads(text) == {"order_id": 3, "paid": False}


def test_encode_plain_json_data() -> None:
    info = Saga("plain", [fetch]).steps[0].function
    value = {"a": [1, 2.5, None, True, "é"]}
    assert json.loads(info.encode_result(value, limit=1000, run_id="r", step="fetch")) == value


@pytest.mark.parametrize("text", ["a\x00b", "\\\x00", "\x00"])
def test_a_result_with_a_nul_character_is_refused(text: str) -> None:
    # Postgres' jsonb refuses \u0000: journaling it would fail as a store error.
    info = Saga("plain", [fetch]).steps[0].function
    with pytest.raises(StepResultError, match=r"step 'fetch' of run 'r' .* NUL character"):
        info.encode_result({"text": text}, limit=1000, run_id="r", step="fetch")


def test_a_result_with_the_text_of_a_nul_escape_is_accepted() -> None:
    info = Saga("plain", [fetch]).steps[0].function
    value = {"text": "\\u0000 and \\\\u0000"}
    assert json.loads(info.encode_result(value, limit=1000, run_id="r", step="fetch")) == value


def test_result_at_the_limit_is_accepted_and_one_byte_over_is_refused() -> None:
    info = Saga("sized", [fetch]).steps[0].function
    assert info.encode_result("x" * 8, limit=10, run_id="r", step="fetch") == '"xxxxxxxx"'
    with pytest.raises(StepResultError) as error:
        info.encode_result("x" * 9, limit=10, run_id="run-big", step="fetch[3]")
    message = str(error.value)
    assert "'fetch[3]'" in message
    assert "'run-big'" in message
    assert "11 bytes" in message
    assert "limit of 10 bytes" in message
    assert "SAGA_MAX_RESULT_BYTES" in message


def test_size_limit_counts_utf8_bytes() -> None:
    info = Saga("sized", [fetch]).steps[0].function
    # Four characters of two bytes each in UTF-8, plus two quotes: 10 bytes.
    assert info.encode_result("éééé", limit=10, run_id="r", step="fetch")
    with pytest.raises(StepResultError, match="12 bytes"):
        info.encode_result("ééééé", limit=10, run_id="r", step="fetch")


@pytest.mark.parametrize("value", [object(), {"handle": object()}, b"\xff\xfe", fetch, Ellipsis])
def test_non_json_result_raises_step_result_error_naming_run_and_step(value: Any) -> None:
    info = Saga("not_json", [fetch]).steps[0].function
    with pytest.raises(StepResultError) as error:
        info.encode_result(value, limit=1_000_000, run_id="run-obj", step="fetch")
    message = str(error.value)
    assert "'fetch'" in message
    assert "'run-obj'" in message
    assert "cannot be journaled" in message
    assert type(value).__name__ in message


def test_step_result_error_is_not_retried_by_the_step_policy() -> None:
    saga_step = Saga("not_json", [fetch]).steps[0]
    with pytest.raises(StepResultError) as error:
        saga_step.function.encode_result(object(), limit=100, run_id="r", step="fetch")
    assert saga_step.options.retry.decide(1, error.value).retry is False


# --- refs and loading -------------------------------------------------------------------------


def test_ref_of_a_module_level_saga() -> None:
    assert sagas.ten.ref() == "tests.sagas:ten"
    assert sagas.fatal.ref() == "tests.sagas:fatal"
    assert module_level.ref() == f"{MODULE}:module_level"


def test_ref_of_a_saga_not_at_module_level_explains_what_to_do() -> None:
    local = Saga("local_saga", [fetch])
    assert local.module == MODULE
    with pytest.raises(DefinitionError) as info:
        local.ref()
    message = str(info.value)
    assert "'local_saga'" in message
    assert "not a module-level attribute" in message
    assert repr(MODULE) in message


def test_load_saga_round_trips_ref() -> None:
    assert load_definition("tests.sagas:ten") is sagas.ten
    assert load_definition(sagas.two.ref()) is sagas.two
    assert load_definition(module_level.ref()) is module_level


@pytest.mark.parametrize("ref", ["nomodule", "tests.sagas", ":ten", "tests.sagas:", ""])
def test_load_saga_refuses_malformed_refs(ref: str) -> None:
    with pytest.raises(UnknownSagaError, match=r"is not a (saga )?reference.*'module:attribute'"):
        load_definition(ref)


def test_load_saga_missing_attribute() -> None:
    with pytest.raises(UnknownSagaError) as info:
        load_definition("tests.sagas:nope")
    message = str(info.value)
    assert "'tests.sagas'" in message
    assert "'nope'" in message


def test_load_saga_missing_module() -> None:
    with pytest.raises(UnknownSagaError) as info:
        load_definition("no.such.module:x")
    message = str(info.value)
    assert "cannot import module 'no.such.module'" in message
    assert "'no.such.module:x'" in message
    assert isinstance(info.value.__cause__, ImportError)


@pytest.mark.parametrize(
    ("ref", "found"),
    [
        ("tests.sagas:record", "function"),
        ("tests.sagas:FAST_RETRY", "RetryPolicy"),
        ("tests.sagas:Saga", "type"),
        ("tests.sagas:Flaky", "type"),
    ],
)
def test_load_saga_attribute_that_is_not_a_saga(ref: str, found: str) -> None:
    with pytest.raises(UnknownSagaError) as info:
        load_definition(ref)
    message = str(info.value)
    assert f"does not name a saga (found {found})" in message
    # It lists the sagas the module does have.
    for name in ("ten", "two", "not_json", "too_big", "fatal", "exhausts"):
        assert f"'{name}'" in message


# -- step options: declared once (StepArgs), typos refused ------------------------------------


def test_a_misspelt_step_option_is_refused_with_the_closest_name() -> None:
    with pytest.raises(
        DefinitionError, match=r"'retries' is not a step option \(did you mean 'retry'\?\)"
    ):
        step(fetch, retries=SLOW)  # type: ignore[call-arg]
    trip = Saga("typo")
    with pytest.raises(DefinitionError, match=r"'timout' is not a step option"):
        trip.step(timout=3)(fetch)  # type: ignore[call-arg]


def test_a_misspelt_option_in_a_workflow_step_is_refused() -> None:
    from saga.workflow import WorkflowContext

    ctx = WorkflowContext(
        run_id="r", workflow="wf", input=None, journal={}, consume_event=lambda n, k: (False, None)
    )
    with pytest.raises(DefinitionError, match=r"workflow 'wf', step 'fetch': 'pivott'"):
        ctx.start(fetch, 1, pivott=True)  # type: ignore[call-arg]
    with pytest.raises(DefinitionError, match=r"'queues' is not a step option"):
        ctx.map(fetch, [1, 2], queues="gpu")  # type: ignore[call-arg]


def test_every_step_option_reaches_the_journaled_options() -> None:
    decl = step(fetch, retry=SLOW, timeout=2.0, pivot=True, compensate_retry=SLOW, queue="gpu")
    saga = Saga("all-options", [decl])
    assert saga.get_step("fetch").options == StepOptions(
        retry=SLOW, timeout_seconds=2.0, pivot=True, compensate_retry=SLOW, queue="gpu"
    )


# -- compensations take None: the step's outcome may be unknown -------------------------------


def undo_typed(ctx: StepContext, booking: dict[str, Any]) -> None:
    return None


def undo_optional(ctx: StepContext, booking: dict[str, Any] | None) -> None:
    return None


def test_a_compensation_that_cannot_take_none_is_refused_when_defined() -> None:
    with pytest.raises(DefinitionError, match=r"must accept None.*`X \| None`"):
        Saga("strict-undo", [step(fetch, compensate=undo_typed)])
    saga = Saga("optional-undo", [step(fetch, compensate=undo_optional)])
    assert saga.get_step("fetch").compensation is not None


def test_a_workflow_compensation_that_cannot_take_none_is_refused() -> None:
    from saga.workflow import WorkflowContext

    ctx = WorkflowContext(
        run_id="r", workflow="wf", input=None, journal={}, consume_event=lambda n, k: (False, None)
    )
    with pytest.raises(DefinitionError, match="must accept None"):
        ctx.start(fetch, 1, compensate=undo_typed)


def test_journaled_options_carry_only_what_differs_from_the_defaults() -> None:
    # The options ride in the step's journal row, written again at every claim and outcome.
    assert StepOptions().to_json() == {}
    options = StepOptions(retry=RetryPolicy(max_attempts=2), timeout_seconds=3.0, queue="gpu")
    assert options.to_json() == {
        "retry": {"max_attempts": 2},
        "timeout_seconds": 3.0,
        "queue": "gpu",
    }
    assert StepOptions.from_json(options.to_json()) == options
