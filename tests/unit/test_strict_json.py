"""Strict JSON at the edge: NaN, infinities and out-of-range numbers are refused, never nulled."""

from __future__ import annotations

import math
from typing import Any

import pytest
from pydantic import BaseModel, TypeAdapter

from saga import strict_json
from saga.definition import Saga, StepContext
from saga.errors import InputError, StepResultError


class Reading(BaseModel):
    value: float
    note: str | None = None


def measure(ctx: StepContext, reading: Reading) -> Reading:
    return reading


@pytest.mark.parametrize(
    "value",
    [math.nan, math.inf, -math.inf, {"x": [1, math.nan]}, [{"deep": {"er": -math.inf}}]],
)
def test_non_finite_numbers_are_refused_not_nulled(value: Any) -> None:
    with pytest.raises(strict_json.NotJSONError, match="NaN and infinite numbers"):
        strict_json.dump(value)


def test_a_model_with_a_non_finite_field_is_refused() -> None:
    with pytest.raises(strict_json.NotJSONError):
        strict_json.dump(Reading(value=math.inf), TypeAdapter(Reading))


def test_nulls_and_the_word_null_pass() -> None:
    assert strict_json.dump({"a": None, "b": "null", "c": 1.5}) == b'{"a":null,"b":"null","c":1.5}'
    assert strict_json.dump(Reading(value=2.0), TypeAdapter(Reading)) == (
        b'{"value":2.0,"note":null}'
    )


@pytest.mark.parametrize(
    "text", ["NaN", "[Infinity]", '{"x": -Infinity}', '{"x": 1e999}', "[-1e400]", "{"]
)
def test_loads_refuses_what_json_cannot_hold(text: str) -> None:
    with pytest.raises(strict_json.NotJSONError):
        strict_json.loads(text)


def test_loads_keeps_ordinary_numbers() -> None:
    assert strict_json.loads('{"a": 1e300, "b": -2.5, "c": 3}') == {"a": 1e300, "b": -2.5, "c": 3}


def test_a_run_input_with_nan_is_an_input_error() -> None:
    saga = Saga("readings", [measure])
    with pytest.raises(InputError, match=r"saga 'readings'.*NaN"):
        saga.validate_input({"value": math.nan})


def test_a_step_result_with_infinity_is_a_step_result_error() -> None:
    info = Saga("readings", [measure]).get_step("measure").function
    with pytest.raises(StepResultError, match=r"run 'r1'.*NaN and infinite"):
        info.encode_result(Reading(value=-math.inf), limit=10_000, run_id="r1", step="measure")


@pytest.mark.parametrize("value", ["a\x00b", {"k\x00": 1}, [{"deep": "\x00"}]])
def test_text_with_a_nul_is_refused_before_postgres_sees_it(value: Any) -> None:
    with pytest.raises(strict_json.NotJSONError, match="NUL character"):
        strict_json.dump(value)
    with pytest.raises(strict_json.NotJSONError, match="NUL character"):
        strict_json.loads(strict_json.ANY.dump_json(value))


def test_an_escaped_backslash_before_u0000_is_just_text() -> None:
    assert strict_json.loads(strict_json.dump("x\\u0000")) == "x\\u0000"


def test_a_step_result_with_a_nul_fails_the_step_without_a_retry() -> None:
    info = Saga("readings", [measure]).get_step("measure").function
    with pytest.raises(StepResultError, match=r"run 'r1'.*NUL character") as error:
        info.encode_result(Reading(value=1.0, note="\x00"), limit=10_000, run_id="r1", step="m")
    from saga.retry import RetryPolicy

    assert RetryPolicy(max_attempts=5).decide(1, error.value).retry is False
