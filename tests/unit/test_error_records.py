"""Error records keep no pydantic input value: not in the message, not in any traceback of the
chain; a step's own exception keeps its message for the journal's readers."""

from __future__ import annotations

import pytest
from pydantic import BaseModel, TypeAdapter, ValidationError

from saga import strict_json
from saga.definition import FunctionInfo, StepContext
from saga.errors import InputError, StepResultError
from saga.failures import error_record, exception_text, without_inputs

SECRET = "sk-live-4f9a7c1e"


class Order(BaseModel):
    quantity: int
    card: str


def validation_error() -> ValidationError:
    with pytest.raises(ValidationError) as caught:
        Order.model_validate({"quantity": SECRET, "card": 4})
    return caught.value


def test_a_validation_error_is_recorded_without_its_input_values() -> None:
    exc = validation_error()
    assert SECRET in str(exc)  # what pydantic itself prints
    record = error_record(exc, attempt=1, traceback=True)
    assert SECRET not in record["message"] and SECRET not in record["traceback"]
    assert record["message"].splitlines() == [
        "2 validation error(s) for Order",
        "quantity: Input should be a valid integer, unable to parse string as an integer "
        "[type=int_parsing]",
        "card: Input should be a valid string [type=string_type]",
    ]
    assert (
        record["traceback"]
        .rstrip()
        .endswith("card: Input should be a valid string [type=string_type]")
    )


def test_a_validation_error_anywhere_in_the_chain_loses_its_inputs() -> None:
    try:
        try:
            Order.model_validate({"quantity": SECRET, "card": "x"})
        except ValidationError as inner:
            raise RuntimeError("the order could not be read") from inner
    except RuntimeError as outer:
        record = error_record(outer, traceback=True)
    assert record["message"] == "the order could not be read"
    assert SECRET not in record["traceback"]
    assert "The above exception was the direct cause" in record["traceback"]
    assert "quantity: Input should be a valid integer" in record["traceback"]


def test_a_serialisation_error_loses_its_input_value() -> None:
    with pytest.raises(Exception) as caught:
        strict_json.dump(SECRET, TypeAdapter(int))
    assert SECRET in str(caught.value)
    assert SECRET not in exception_text(caught.value)
    assert "input_value=(not shown)" in exception_text(caught.value)


def test_the_engines_own_messages_about_inputs_and_results_quote_no_value() -> None:
    def charge(ctx: StepContext, order: Order) -> int:
        return 0

    info = FunctionInfo(charge, "m:charge", TypeAdapter(Order), TypeAdapter(int))
    with pytest.raises(InputError) as bad_input:
        info.encode_input({"quantity": SECRET, "card": "x"}, "run 'r1'")
    assert SECRET not in str(bad_input.value)
    assert "quantity: Input should be a valid integer" in str(bad_input.value)
    with pytest.raises(StepResultError) as bad_result:
        info.encode_result(SECRET, limit=1000, run_id="r1", step="charge")
    assert SECRET not in str(bad_result.value)
    assert SECRET not in error_record(bad_result.value, traceback=True)["traceback"]


def test_a_steps_own_exception_keeps_its_message_for_the_journal() -> None:
    record = error_record(ValueError(f"bad key {SECRET}"), traceback=True)
    assert record["message"] == f"bad key {SECRET}"
    assert "ValueError: bad key" in record["traceback"]


def test_a_message_quoting_an_input_value_is_cleaned() -> None:
    text = f"[type=int_parsing, input_value='{SECRET}', input_type=str]"
    assert without_inputs(text) == "[type=int_parsing, input_value=(not shown), input_type=str]"
