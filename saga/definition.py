"""Saga definitions: named steps, each a plain function ``fn(ctx, value) -> result``.

A definition lives in a user module and is found by its import path ``module:attribute``; the run
records that path so any worker can load the definition. Definitions are validated when built, so
a broken one fails when its module is imported, naming the saga and the step.
"""

from __future__ import annotations

import importlib
import inspect
import itertools
import re
import sys
import typing
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

from pydantic import TypeAdapter

from saga.errors import DefinitionError, StepResultError, UnknownSagaError
from saga.retry import RetryPolicy

_NAME = re.compile(r"^[A-Za-z_][A-Za-z0-9_.\-]{0,127}$")
_ANY_ADAPTER: TypeAdapter[Any] = TypeAdapter(Any)


class StepContext:
    """What a step function gets besides its input.

    ``idempotency_key`` is the same for every attempt of this step in this run: pass it to outside
    systems (payment APIs, email senders, model providers) so a retried attempt is not a new effect.
    """

    __slots__ = (
        "_load_results",
        "_results",
        "attempt",
        "idempotency_key",
        "run_id",
        "run_input",
        "saga",
        "step",
    )

    def __init__(
        self,
        *,
        run_id: str,
        saga: str,
        step: str,
        attempt: int,
        idempotency_key: str,
        run_input: Any,
        load_results: Callable[[], Mapping[str, Any]],
    ) -> None:
        self.run_id = run_id
        self.saga = saga
        self.step = step
        self.attempt = attempt
        self.idempotency_key = idempotency_key
        self.run_input = run_input
        self._load_results = load_results
        self._results: Mapping[str, Any] | None = None

    @property
    def results(self) -> Mapping[str, Any]:
        """Results of the run's completed steps by step name (read from the journal when used)."""
        if self._results is None:
            self._results = self._load_results()
        return self._results


StepFunction = Callable[[StepContext, Any], Any]


@dataclass(frozen=True)
class Step:
    """One step of a saga: its function, name and retry policy."""

    fn: StepFunction
    name: str
    retry: RetryPolicy
    input_adapter: TypeAdapter[Any] = field(repr=False)
    output_adapter: TypeAdapter[Any] = field(repr=False)

    def validate_input(self, value: Any) -> Any:
        return self.input_adapter.validate_python(value)

    def encode_result(self, value: Any, *, limit: int, run_id: str) -> str:
        """The result as JSON text, or StepResultError naming the run, step and limit."""
        try:
            data = self.output_adapter.dump_json(value)
        except Exception as exc:  # pydantic raises several types for "not serialisable"
            raise StepResultError(
                f"step {self.name!r} of run {run_id!r} returned a {type(value).__name__} that is "
                f"not JSON-serialisable ({exc}); return JSON data or a pydantic model"
            ) from exc
        if len(data) > limit:
            raise StepResultError(
                f"step {self.name!r} of run {run_id!r} returned {len(data)} bytes of JSON, over "
                f"the limit of {limit} bytes (SAGA_MAX_RESULT_BYTES); store large data elsewhere "
                f"and return a reference"
            )
        return data.decode()


@dataclass(frozen=True)
class StepDecl:
    """A step function with options; what ``step()`` returns for a ``Saga``'s list."""

    fn: StepFunction
    name: str | None = None
    retry: RetryPolicy | None = None


def step(
    fn: StepFunction, *, name: str | None = None, retry: RetryPolicy | None = None
) -> StepDecl:
    """Give ``fn`` a name or retry policy other than the saga's defaults."""
    return StepDecl(fn, name, retry)


def _make_step(
    fn: StepFunction,
    *,
    name: str | None,
    retry: RetryPolicy | None,
    saga_name: str,
    default_retry: RetryPolicy,
) -> Step:
    step_name = str(name or getattr(fn, "__name__", ""))
    where = f"saga {saga_name!r}, step {step_name!r}"
    if not callable(fn):
        raise DefinitionError(f"{where}: a step must be a function, got {type(fn).__name__}")
    if not _NAME.match(step_name):
        raise DefinitionError(f"{where}: step names must match {_NAME.pattern}")
    if retry is not None and not isinstance(retry, RetryPolicy):
        raise DefinitionError(f"{where}: retry must be a RetryPolicy, got {type(retry).__name__}")
    try:
        params = list(inspect.signature(fn).parameters.values())
    except (TypeError, ValueError) as exc:
        raise DefinitionError(f"{where}: cannot read the function's signature: {exc}") from exc
    positional = [p for p in params if p.kind in (p.POSITIONAL_ONLY, p.POSITIONAL_OR_KEYWORD)]
    required_rest = [
        p
        for p in params[2:]
        if p.default is p.empty and p.kind not in (p.VAR_POSITIONAL, p.VAR_KEYWORD)
    ]
    if len(positional) < 2 or required_rest:
        raise DefinitionError(
            f"{where}: a step function takes exactly two positional parameters, "
            f"(ctx: StepContext, value), got {inspect.signature(fn)}"
        )
    try:
        hints = typing.get_type_hints(fn)
    except Exception as exc:
        raise DefinitionError(f"{where}: cannot resolve type hints: {exc}") from exc
    in_hint = hints.get(positional[1].name)
    out_hint = hints.get("return")
    return Step(
        fn=fn,
        name=step_name,
        retry=retry or default_retry,
        input_adapter=_ANY_ADAPTER if in_hint is None else TypeAdapter(in_hint),
        output_adapter=_ANY_ADAPTER if out_hint is None else TypeAdapter(out_hint),
    )


class Saga:
    """A saga of steps run in order, each step's result the next one's input.

    >>> pipeline = Saga("summarise", [fetch, summarise, store])   # doctest: +SKIP

    The first step gets the run's input; the last step's result is the run's result.
    """

    def __init__(
        self,
        name: str,
        steps: Sequence[StepFunction | StepDecl],
        *,
        version: str = "1",
        retry: RetryPolicy | None = None,
    ) -> None:
        if not isinstance(name, str) or not _NAME.match(name):
            raise DefinitionError(f"saga name {name!r} must match {_NAME.pattern}")
        if retry is not None and not isinstance(retry, RetryPolicy):
            raise DefinitionError(f"saga {name!r}: retry must be a RetryPolicy")
        default_retry = retry or RetryPolicy()
        built: list[Step] = []
        for item in steps:
            decl = item if isinstance(item, StepDecl) else StepDecl(item)
            built.append(
                _make_step(
                    decl.fn,
                    name=decl.name,
                    retry=decl.retry,
                    saga_name=name,
                    default_retry=default_retry,
                )
            )
        if not built:
            raise DefinitionError(f"saga {name!r} has no steps")
        seen: set[str] = set()
        for s in built:
            if s.name in seen:
                raise DefinitionError(f"saga {name!r}: duplicate step name {s.name!r}")
            seen.add(s.name)
        self.name = name
        self.version = version
        self.steps: tuple[Step, ...] = tuple(built)
        self._by_name = {s.name: s for s in built}
        self._next = {a.name: b for a, b in itertools.pairwise(built)}
        # The module that built the saga; ref() looks the attribute up there.
        self.module: str = sys._getframe(1).f_globals.get("__name__", "__main__")

    def __repr__(self) -> str:
        return f"Saga({self.name!r}, steps={[s.name for s in self.steps]})"

    def step(self, name: str) -> Step:
        try:
            return self._by_name[name]
        except KeyError:
            raise UnknownSagaError(
                f"saga {self.name!r} has no step {name!r}; its steps are {list(self._by_name)}. "
                f"Was the definition changed while runs were in flight?"
            ) from None

    @property
    def first(self) -> Step:
        return self.steps[0]

    def next_after(self, name: str) -> Step | None:
        """The step that follows ``name``, or None when ``name`` is the last."""
        self.step(name)
        return self._next.get(name)

    def ref(self) -> str:
        """The import path workers use to load this definition."""
        module = sys.modules.get(self.module)
        for attr, value in vars(module or object()).items():
            if value is self:
                return f"{self.module}:{attr}"
        raise DefinitionError(
            f"saga {self.name!r} is not a module-level attribute of {self.module!r}; define it at "
            f"module level so workers can import it"
        )


def load_saga(ref: str) -> Saga:
    """Import ``module:attribute`` and return the saga it names."""
    module_name, sep, attr = ref.partition(":")
    if not sep or not module_name or not attr:
        raise UnknownSagaError(f"{ref!r} is not a saga reference: write it as 'module:attribute'")
    try:
        module = importlib.import_module(module_name)
    except ImportError as exc:
        raise UnknownSagaError(
            f"cannot import module {module_name!r} for saga {ref!r}: {exc}"
        ) from exc
    value = getattr(module, attr, None)
    if not isinstance(value, Saga):
        raise UnknownSagaError(
            f"{ref!r} does not name a saga (found {type(value).__name__}); "
            f"sagas in {module_name!r}: "
            f"{[k for k, v in vars(module).items() if isinstance(v, Saga)]}"
        )
    return value
