"""Retry policy: a pure object that turns (attempt, error) into a decision."""

from __future__ import annotations

import math
import random
from dataclasses import dataclass
from typing import Any

from saga.errors import DefinitionError, StepResultError


@dataclass(frozen=True)
class RetryDecision:
    retry: bool
    delay_seconds: float = 0.0


@dataclass(frozen=True)
class RetryPolicy:
    """Exponential backoff with jitter and a maximum number of attempts.

    ``max_attempts`` counts every attempt, the first included (1 means never retry). An attempt
    lost with its worker (lease expired) counts too. Errors of a ``non_retryable`` type, and
    results that cannot be journaled, fail the step at once. An error with a numeric
    ``retry_after_seconds`` attribute (a rate limit's Retry-After) delays the retry at least
    that long.
    """

    max_attempts: int = 5
    initial_backoff_seconds: float = 1.0
    max_backoff_seconds: float = 60.0
    multiplier: float = 2.0
    jitter: float = 0.2  # +/- this fraction of the delay, so retries of many runs spread out
    # Exception types, or their qualified names ("module.Name"): names let a worker decide
    # without importing the module that defines the type.
    non_retryable: tuple[type[BaseException] | str, ...] = ()

    def __post_init__(self) -> None:
        problems = []
        numbers = {
            "initial_backoff_seconds": self.initial_backoff_seconds,
            "max_backoff_seconds": self.max_backoff_seconds,
            "multiplier": self.multiplier,
            "jitter": self.jitter,
        }
        for name, value in numbers.items():
            if not isinstance(value, int | float) or not math.isfinite(value):
                raise DefinitionError(
                    f"invalid RetryPolicy: {name} must be a finite number, got {value!r}"
                )
        if not isinstance(self.max_attempts, int) or isinstance(self.max_attempts, bool):
            raise DefinitionError(
                f"invalid RetryPolicy: max_attempts must be an int, got {self.max_attempts!r}"
            )
        if not isinstance(self.non_retryable, tuple | list):
            raise DefinitionError(
                f"invalid RetryPolicy: non_retryable must be a tuple of exception types or "
                f"names, got {self.non_retryable!r}; write non_retryable=({self.non_retryable!r},)"
            )
        if self.max_attempts < 1:
            problems.append(f"max_attempts must be >= 1, got {self.max_attempts}")
        if self.initial_backoff_seconds < 0 or self.max_backoff_seconds < 0:
            problems.append("backoff seconds must not be negative")
        if self.max_backoff_seconds < self.initial_backoff_seconds:
            problems.append("max_backoff_seconds must be >= initial_backoff_seconds")
        if self.multiplier < 1:
            problems.append(f"multiplier must be >= 1, got {self.multiplier}")
        if not 0 <= self.jitter <= 1:
            problems.append(f"jitter must be within 0..1, got {self.jitter}")
        if not all(
            isinstance(t, str) or (isinstance(t, type) and issubclass(t, BaseException))
            for t in self.non_retryable
        ):
            problems.append("non_retryable must hold exception types or their qualified names")
        if problems:
            raise DefinitionError("invalid RetryPolicy: " + "; ".join(problems))

    def backoff(self, attempt: int, rng: random.Random | None = None) -> float:
        """Delay before the attempt after ``attempt`` (1-based)."""
        try:
            grown = self.initial_backoff_seconds * self.multiplier ** max(0, attempt - 1)
        except OverflowError:  # a huge attempt number: the cap applies long before
            grown = self.max_backoff_seconds
        base = min(self.max_backoff_seconds, grown)
        spread = base * self.jitter
        return max(0.0, base + (rng or random).uniform(-spread, spread))

    def decide(
        self, attempt: int, error: BaseException, rng: random.Random | None = None
    ) -> RetryDecision:
        if isinstance(error, StepResultError) or self._is_non_retryable(error):
            return RetryDecision(retry=False)
        if attempt >= self.max_attempts:
            return RetryDecision(retry=False)
        delay = self.backoff(attempt, rng)
        # An error may say when to come back (a 429's Retry-After): never retry sooner.
        asked = getattr(error, "retry_after_seconds", None)
        if isinstance(asked, int | float) and math.isfinite(asked) and asked > delay:
            delay = float(asked)
        return RetryDecision(retry=True, delay_seconds=delay)

    def _is_non_retryable(self, error: BaseException) -> bool:
        names = {_qualified(t) if isinstance(t, type) else t for t in self.non_retryable}
        return any(_qualified(cls) in names for cls in type(error).__mro__)

    def to_json(self) -> dict[str, Any]:
        return {
            "max_attempts": self.max_attempts,
            "initial_backoff_seconds": self.initial_backoff_seconds,
            "max_backoff_seconds": self.max_backoff_seconds,
            "multiplier": self.multiplier,
            "jitter": self.jitter,
            "non_retryable": sorted(
                _qualified(t) if isinstance(t, type) else t for t in self.non_retryable
            ),
        }

    def changes(self) -> dict[str, Any]:
        """``to_json`` without the fields at their defaults (``from_json`` restores them)."""
        return {k: v for k, v in self.to_json().items() if v != _DEFAULT_JSON[k]}

    @classmethod
    def from_json(cls, data: dict[str, Any]) -> RetryPolicy:
        return cls(**{**data, "non_retryable": tuple(data.get("non_retryable", ()))})


def _qualified(cls: type) -> str:
    return f"{cls.__module__}.{cls.__qualname__}"


# The policy of a step that sets none: one object (it is frozen), not one per step and claim.
DEFAULT_RETRY = RetryPolicy()
_DEFAULT_JSON: dict[str, Any] = DEFAULT_RETRY.to_json()
