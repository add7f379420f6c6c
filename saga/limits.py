"""Flow control as steps and definitions declare it: concurrency limits, rate limits, priorities.

A limit is declared with a name and, optionally, a key (a tenant, a user, a provider account),
as a string or as a function of the run's input. Its key is worked out when the step is
scheduled and journaled with the step as a *gate* (``"c:<name>:<key>"`` or ``"r:<name>:<key>"``):
workers need no definition to respect it. Gates are taken when a step is claimed and given back
in the transaction that ends its attempt (migration 0010); a step a gate refuses waits in
Postgres as ``throttled`` until the gate is handed to it.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass
from typing import Any, Literal

from saga.errors import DefinitionError, InputError, SagaError

OnLimit = Literal["queue", "refuse", "cancel_oldest"]
ON_LIMIT: tuple[str, ...] = ("queue", "refuse", "cancel_oldest")
KeyFn = Callable[[Any], Any]
Key = str | KeyFn | None
UnitsFn = Callable[[Any], int]


class RateLimited(SagaError):
    """Raise it from a step when the outside service said "too many requests" (HTTP 429): the
    step's rate limits are paused for everyone for ``retry_after_seconds`` (when given), and the
    step is retried no sooner, as its retry policy allows. ``saga.agent``'s model calls raise a
    subclass of their own on a provider's 429 (any error with a ``retry_after_seconds``
    attribute pauses the limits the same way)."""

    def __init__(self, message: str = "rate limited", retry_after_seconds: float | None = None):
        super().__init__(message)
        self.retry_after_seconds = retry_after_seconds


def _check_name(name: Any, where: str, what: str) -> str:
    if not isinstance(name, str) or not name or ":" in name or len(name) > 100:
        raise DefinitionError(
            f"{where}: a {what}'s name must be a non-empty string without ':' (at most 100 "
            f"characters), got {name!r}"
        )
    return name


def _check_key(key: Any, where: str, what: str, field: str = "key") -> None:
    if key is not None and not callable(key) and not isinstance(key, str):
        raise DefinitionError(
            f"{where}: a {what}'s {field} must be a string or a function of the run's input, "
            f"got {type(key).__name__}"
        )


def _resolve_key(key: Key, run_input: Any, where: str) -> str:
    if key is None:
        return ""
    value = key(run_input) if callable(key) else key
    if not isinstance(value, str | int) or isinstance(value, bool):
        raise DefinitionError(
            f"{where}: the limit's key function returned {type(value).__name__}; it must "
            f"return a string (e.g. a tenant id)"
        )
    text = str(value)
    if len(text) > 200:
        raise DefinitionError(f"{where}: a limit's key may be at most 200 characters")
    return text


@dataclass(frozen=True)
class Concurrency:
    """At most ``limit`` steps (or runs, on a ``Saga``/``workflow``) at a time, per ``key``.

    ``name`` names the limit: every step declaring the same name and key shares it (by default
    the step's or the definition's own name). ``key`` splits it: ``key=lambda run: run["tenant"]``
    gives each tenant ``limit`` slots. ``fair`` groups the waiters of one gate for round-robin:
    when a slot frees, the group holding the fewest slots goes next (by default the key, so a
    global limit with ``fair=`` by tenant stops one tenant's 1,000 runs starving another's 3).
    Waiters go by priority first.

    On a ``Saga`` or ``workflow`` (runs, not steps), ``on_limit`` says what a new run does when
    its key already has ``limit`` runs: ``"queue"`` (default) waits in line; ``"refuse"``
    refuses it (``client.start`` raises LimitReachedError, no run is made); ``"cancel_oldest"``
    cancels the oldest runs of the key (compensating what they did), and the new one waits for
    their slot: with ``Concurrency(1, key=...)``, a singleton per key where the newest wins."""

    limit: int
    key: Key = None
    name: str | None = None
    fair: Key = None
    on_limit: OnLimit = "queue"

    def validate(self, where: str) -> None:
        if not isinstance(self.limit, int) or isinstance(self.limit, bool) or self.limit < 1:
            raise DefinitionError(
                f"{where}: Concurrency limit must be a positive int, got {self.limit!r}"
            )
        if self.name is not None:
            _check_name(self.name, where, "concurrency limit")
        _check_key(self.key, where, "concurrency limit")
        _check_key(self.fair, where, "concurrency limit", "fair")
        if self.on_limit not in ON_LIMIT:
            raise DefinitionError(
                f"{where}: on_limit must be one of {', '.join(ON_LIMIT)}, got {self.on_limit!r}"
            )

    def validate_for_step(self, where: str) -> None:
        self.validate(where)
        if self.on_limit != "queue":
            raise DefinitionError(
                f"{where}: on_limit={self.on_limit!r} applies to runs: put this Concurrency on "
                f"the Saga or workflow; a step's limit always waits in line"
            )

    def gate(
        self, default_name: str, run_input: Any, where: str, *, run_level: bool
    ) -> dict[str, Any]:
        key = _resolve_key(self.key, run_input, where)
        fair = key if self.fair is None else _resolve_key(self.fair, run_input, where)
        return {
            "gate": f"c:{self.name or default_name}:{key}",
            "kind": "concurrency",
            "limit": self.limit,
            "fair": fair,
            **({"run": True} if run_level else {}),
        }


@dataclass(frozen=True)
class RateLimit:
    """At most ``limit`` units in any window of ``per`` seconds, shared by every worker, per
    ``key`` (a provider account, a tenant). A step takes ``units`` (1 per request by default, or
    an estimate of a model call's tokens: an int, or a function of the step's input); a step that
    needs more than the window allows waits as ``throttled`` until budget frees. Steps sharing
    ``name`` and key share the budget. Budget is booked when a step is claimed and counts for
    the window and a guard (5% of it, at most 250 ms): a step's request reaches the service a
    varying few milliseconds later, and the guard keeps the service's own count within the limit.
    A step may say what it really used once it knows (``ctx.used_units(name, n)``); with
    ``tokens=True`` the units are model tokens, and ``saga.agent.complete`` reports the
    provider's count itself."""

    name: str
    limit: int
    per: float = 60.0
    key: Key = None
    units: int | UnitsFn = 1
    tokens: bool = False

    def validate(self, where: str) -> None:
        _check_name(self.name, where, "rate limit")
        if not isinstance(self.limit, int) or isinstance(self.limit, bool) or self.limit < 1:
            raise DefinitionError(f"{where}: RateLimit limit must be a positive int")
        if (
            not isinstance(self.per, int | float)
            or isinstance(self.per, bool)
            or not math.isfinite(self.per)
            or self.per <= 0
        ):
            raise DefinitionError(f"{where}: RateLimit per must be a positive number of seconds")
        _check_key(self.key, where, "rate limit")
        if callable(self.units):
            return
        if not isinstance(self.units, int) or isinstance(self.units, bool) or self.units < 1:
            raise DefinitionError(f"{where}: RateLimit units must be a positive int or a function")
        if self.units > self.limit:
            raise DefinitionError(
                f"{where}: a step taking {self.units} units can never fit a limit of "
                f"{self.limit} per {self.per} s; raise the limit or lower the units"
            )

    def gate(self, run_input: Any, step_input: Any, where: str) -> dict[str, Any]:
        key = _resolve_key(self.key, run_input, where)
        units = self.units(step_input) if callable(self.units) else self.units
        if not isinstance(units, int) or isinstance(units, bool):
            raise DefinitionError(f"{where}: the rate limit's units function must return an int")
        # An estimate above the whole window could never be granted: it takes the whole window.
        units = max(1, min(units, self.limit))
        return {
            "gate": f"r:{self.name}:{key}",
            "kind": "rate",
            "limit": self.limit,
            "period": float(self.per),
            "units": units,
            "fair": key,
            **({"tokens": True} if self.tokens else {}),
        }


def check_distinct(
    run_limit: Concurrency | None,
    run_name: str,
    step_limit: Concurrency | None,
    step_name: str,
    where: str,
) -> None:
    """A run's limit and one of its steps' must not be one gate: the run's slot would count
    against its own step (with limit 1, a step waiting for a slot its run holds until it ends)
    and the gate's limit would flip between the two declared."""
    if run_limit is None or step_limit is None:
        return
    name = step_limit.name or step_name
    if name == (run_limit.name or run_name):
        raise DefinitionError(
            f"{where}: the step's concurrency limit and its run's are both named {name!r}: one "
            f"limit cannot count both runs and steps; give one of them another name "
            f"(Concurrency(..., name=...))"
        )


def check_run_keys(limits: Iterable[Concurrency | RateLimit], run_input: Any, where: str) -> None:
    """Work out every key the run's limits take from its input, when it starts: a key function
    that fails on this input fails ``client.start`` (InputError), not a step later on."""
    for limit in limits:
        for key in (limit.key, getattr(limit, "fair", None)):
            try:
                _resolve_key(key, run_input, where)
            except DefinitionError:
                raise
            except Exception as exc:
                name = limit.name or "(unnamed)"
                raise InputError(
                    f"{where}: the key function of limit {name!r} fails on this input "
                    f"({type(exc).__name__}: {exc}); the run's input must have what the limit's "
                    f"key reads"
                ) from exc


def check_priority(priority: Any, where: str, error: type[SagaError] = DefinitionError) -> int:
    if not isinstance(priority, int) or isinstance(priority, bool) or abs(priority) > 1_000_000:
        raise error(
            f"{where}: priority must be an int between -1000000 and 1000000 (higher goes first), "
            f"got {priority!r}"
        )
    return priority


TOKENS = "*tokens"  # what ``StepContext.used_tokens`` reports: for limits with tokens=True


def reported_units(options: Mapping[str, Any], usage: Mapping[str, int]) -> list[tuple[str, int]]:
    """The rate gates whose grant a step's reported usage corrects: (gate, units)."""
    out = []
    for gate in gates_of(options):
        if gate["kind"] != "rate":
            continue
        name = str(gate["gate"]).split(":", 2)[1]
        units = usage.get(name, usage.get(TOKENS) if gate.get("tokens") else None)
        if units is not None:
            out.append((str(gate["gate"]), units))
    return out


def gates_of(options: Mapping[str, Any]) -> list[dict[str, Any]]:
    """The gates a journaled step's options name, in the order they are taken: its run's slot,
    then its own concurrency, then rate limits (a step holding a slot waits for budget, never
    the other way round), each by name: the order every transaction locks gates in
    (saga_gate_release too, migration 0010), so two never deadlock."""
    gates = list(options.get("gates") or ())
    return sorted(
        gates, key=lambda g: (not g.get("run"), g.get("kind") != "concurrency", str(g["gate"]))
    )
