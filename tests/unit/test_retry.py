"""RetryPolicy: a pure object, tested with seeded randomness and no clock."""

from __future__ import annotations

import json
import math
import random
from typing import Any

import pytest

from saga.errors import DefinitionError, StepResultError
from saga.retry import RetryDecision, RetryPolicy


class Permanent(ValueError):
    pass


class MorePermanent(Permanent):
    pass


def test_defaults_are_valid_and_documented_values() -> None:
    policy = RetryPolicy()
    assert policy.max_attempts == 5
    assert policy.non_retryable == ()


def test_backoff_grows_exponentially_without_jitter() -> None:
    policy = RetryPolicy(
        max_attempts=10,
        initial_backoff_seconds=0.5,
        max_backoff_seconds=1000.0,
        multiplier=3.0,
        jitter=0.0,
    )
    delays = [policy.backoff(attempt) for attempt in range(1, 7)]
    assert delays == pytest.approx([0.5, 1.5, 4.5, 13.5, 40.5, 121.5])


def test_backoff_is_capped_at_max_backoff() -> None:
    policy = RetryPolicy(
        max_attempts=50, initial_backoff_seconds=1.0, max_backoff_seconds=10.0, jitter=0.0
    )
    delays = [policy.backoff(attempt) for attempt in range(1, 40)]
    assert delays[:4] == pytest.approx([1.0, 2.0, 4.0, 8.0])
    assert all(d == pytest.approx(10.0) for d in delays[4:])
    assert max(delays) == pytest.approx(10.0)


def test_backoff_of_attempt_zero_or_below_is_the_initial_backoff() -> None:
    policy = RetryPolicy(initial_backoff_seconds=2.0, jitter=0.0)
    assert policy.backoff(0) == pytest.approx(2.0)
    assert policy.backoff(-3) == pytest.approx(2.0)


def test_multiplier_one_gives_a_constant_delay() -> None:
    policy = RetryPolicy(initial_backoff_seconds=3.0, multiplier=1.0, jitter=0.0)
    assert {policy.backoff(a) for a in range(1, 20)} == {3.0}


@pytest.mark.parametrize("jitter", [0.0, 0.1, 0.2, 0.5, 1.0])
@pytest.mark.parametrize("seed", [0, 1, 42])
def test_jitter_stays_within_bounds(jitter: float, seed: int) -> None:
    policy = RetryPolicy(
        max_attempts=20,
        initial_backoff_seconds=1.0,
        max_backoff_seconds=30.0,
        multiplier=2.0,
        jitter=jitter,
    )
    rng = random.Random(seed)
    for attempt in range(1, 15):
        base = min(30.0, 2.0 ** (attempt - 1))
        for _ in range(50):
            delay = policy.backoff(attempt, rng)
            assert delay >= 0.0
            assert base * (1 - jitter) - 1e-9 <= delay <= base * (1 + jitter) + 1e-9


def test_jitter_actually_spreads_delays() -> None:
    policy = RetryPolicy(initial_backoff_seconds=10.0, max_backoff_seconds=10.0, jitter=0.2)
    rng = random.Random(7)
    delays = {policy.backoff(1, rng) for _ in range(100)}
    assert len(delays) > 50
    assert min(delays) < 9.5 and max(delays) > 10.5


def test_same_seed_gives_same_delays() -> None:
    policy = RetryPolicy(jitter=0.5)
    first = [policy.backoff(a, random.Random(123)) for a in range(1, 6)]
    second = [policy.backoff(a, random.Random(123)) for a in range(1, 6)]
    assert first == second


def test_decide_retries_until_max_attempts_then_stops() -> None:
    policy = RetryPolicy(
        max_attempts=4, initial_backoff_seconds=1.0, max_backoff_seconds=100.0, jitter=0.0
    )
    error = RuntimeError("flaky")
    decisions = [policy.decide(attempt, error) for attempt in range(1, 7)]
    assert decisions[:3] == [
        RetryDecision(retry=True, delay_seconds=1.0),
        RetryDecision(retry=True, delay_seconds=2.0),
        RetryDecision(retry=True, delay_seconds=4.0),
    ]
    assert all(d == RetryDecision(retry=False) for d in decisions[3:])


def test_max_attempts_one_never_retries() -> None:
    policy = RetryPolicy(max_attempts=1)
    assert policy.decide(1, RuntimeError()) == RetryDecision(retry=False)


def test_decide_uses_the_given_rng_for_its_delay() -> None:
    policy = RetryPolicy(max_attempts=3, jitter=0.5)
    a = policy.decide(1, RuntimeError(), random.Random(5))
    b = policy.decide(1, RuntimeError(), random.Random(5))
    assert a.retry and a == b
    assert 0.5 <= a.delay_seconds <= 1.5


@pytest.mark.parametrize("error", [Permanent("no"), MorePermanent("subclass, no")])
def test_non_retryable_types_and_their_subclasses_are_never_retried(error: Exception) -> None:
    policy = RetryPolicy(max_attempts=10, non_retryable=(KeyError, Permanent))
    for attempt in range(1, 10):
        assert policy.decide(attempt, error) == RetryDecision(retry=False)
    # Other errors still retry under the same policy.
    assert policy.decide(1, RuntimeError()).retry


def test_non_retryable_by_qualified_name_matches_the_type_and_subclasses() -> None:
    by_name = RetryPolicy(
        max_attempts=10, non_retryable=(f"{__name__}.Permanent", "builtins.KeyError")
    )
    assert by_name.decide(1, Permanent("no")) == RetryDecision(retry=False)
    assert by_name.decide(1, MorePermanent("no")) == RetryDecision(retry=False)
    assert by_name.decide(1, KeyError("k")) == RetryDecision(retry=False)
    assert by_name.decide(1, ValueError("a base class of Permanent")).retry
    assert by_name.decide(1, RuntimeError()).retry


def test_json_round_trip_keeps_behaviour() -> None:
    policy = RetryPolicy(
        max_attempts=7,
        initial_backoff_seconds=0.25,
        max_backoff_seconds=9.0,
        multiplier=1.5,
        jitter=0.1,
        non_retryable=(Permanent, "builtins.KeyError"),
    )
    data = policy.to_json()
    assert data["non_retryable"] == sorted(["builtins.KeyError", f"{__name__}.Permanent"])
    restored = RetryPolicy.from_json(json.loads(json.dumps(data)))
    assert restored.to_json() == data
    for attempt in range(1, 9):
        for error in (Permanent(), MorePermanent(), KeyError(), RuntimeError()):
            expected = policy.decide(attempt, error, random.Random(attempt))
            assert restored.decide(attempt, error, random.Random(attempt)) == expected


def test_from_json_of_a_minimal_document() -> None:
    assert RetryPolicy.from_json({}) == RetryPolicy()
    assert RetryPolicy.from_json({"max_attempts": 2}).max_attempts == 2
    with pytest.raises(DefinitionError, match="max_attempts"):
        RetryPolicy.from_json({"max_attempts": 0})


def test_step_result_error_is_never_retried_even_without_non_retryable() -> None:
    policy = RetryPolicy(max_attempts=10)
    error = StepResultError("step 'x' of run 'r' returned 2000000 bytes")
    for attempt in range(1, 10):
        assert policy.decide(attempt, error) == RetryDecision(retry=False)


def test_policy_is_frozen_and_hashable() -> None:
    policy = RetryPolicy(non_retryable=(ValueError,))
    with pytest.raises(AttributeError):
        policy.max_attempts = 3  # type: ignore[misc]
    assert hash(policy) == hash(RetryPolicy(non_retryable=(ValueError,)))


@pytest.mark.parametrize(
    ("kwargs", "expected"),
    [
        ({"max_attempts": 0}, "max_attempts must be >= 1, got 0"),
        ({"max_attempts": -2}, "max_attempts must be >= 1, got -2"),
        ({"initial_backoff_seconds": -1.0}, "backoff seconds must not be negative"),
        (
            {"initial_backoff_seconds": -5.0, "max_backoff_seconds": -1.0},
            "backoff seconds must not be negative",
        ),
        (
            {"initial_backoff_seconds": 10.0, "max_backoff_seconds": 5.0},
            "max_backoff_seconds must be >= initial_backoff_seconds",
        ),
        ({"multiplier": 0.5}, "multiplier must be >= 1, got 0.5"),
        ({"jitter": -0.1}, "jitter must be within 0..1, got -0.1"),
        ({"jitter": 1.5}, "jitter must be within 0..1, got 1.5"),
        ({"jitter": math.nan}, "jitter"),
        ({"non_retryable": (int,)}, "non_retryable must hold exception types"),
        ({"non_retryable": (b"builtins.ValueError",)}, "non_retryable must hold exception types"),
        ({"non_retryable": (ValueError(),)}, "non_retryable must hold exception types"),
    ],
)
def test_invalid_policy_raises_definition_error_naming_the_field(
    kwargs: dict[str, Any], expected: str
) -> None:
    with pytest.raises(DefinitionError, match="invalid RetryPolicy") as info:
        RetryPolicy(**kwargs)
    assert expected in str(info.value)


def test_every_problem_is_reported_at_once() -> None:
    with pytest.raises(DefinitionError) as info:
        RetryPolicy(max_attempts=0, multiplier=0.1, jitter=2.0)
    message = str(info.value)
    assert "max_attempts" in message
    assert "multiplier" in message
    assert "jitter" in message


def test_backoff_with_a_huge_attempt_number_is_capped_not_an_overflow() -> None:
    policy = RetryPolicy(
        max_attempts=1_000_000, initial_backoff_seconds=1.0, max_backoff_seconds=60.0, jitter=0.0
    )
    assert policy.backoff(2000) == pytest.approx(60.0)
    assert policy.decide(2000, RuntimeError()) == RetryDecision(retry=True, delay_seconds=60.0)


@pytest.mark.parametrize(
    "field", ["initial_backoff_seconds", "max_backoff_seconds", "multiplier", "jitter"]
)
def test_nan_values_are_refused(field: str) -> None:
    # NaN compares False with everything, so it would slip past the range checks.
    with pytest.raises(DefinitionError, match=field):
        RetryPolicy(**{field: math.nan})


@pytest.mark.parametrize("value", [2.5, True, "3"])
def test_max_attempts_must_be_an_int(value: object) -> None:
    with pytest.raises(DefinitionError, match="max_attempts"):
        RetryPolicy(max_attempts=value)  # type: ignore[arg-type]


def test_a_single_type_for_non_retryable_gives_a_definition_error() -> None:
    with pytest.raises(DefinitionError, match="non_retryable"):
        RetryPolicy(non_retryable=ValueError)  # type: ignore[arg-type]


def test_a_single_name_for_non_retryable_gives_a_definition_error() -> None:
    # Not silently a tuple of one-character names that match nothing.
    with pytest.raises(DefinitionError, match="non_retryable"):
        RetryPolicy(non_retryable="builtins.ValueError")  # type: ignore[arg-type]
