"""Saga definitions as step graphs, and what every kind of definition shares.

A step is a plain module-level function ``fn(ctx, value) -> result``. A definition lives in a user
module and is found by its import path ``module:attribute``; each journal row records the import
path of the function it runs, so a worker needs no definition to run a step. Definitions are
validated when built, so a broken one fails when its module is imported, naming saga and step.
"""

from __future__ import annotations

import dataclasses
import difflib
import functools
import graphlib
import hashlib
import importlib
import inspect
import re
import sys
import types
import typing
from collections.abc import Callable, Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any, TypedDict, Unpack

from pydantic import TypeAdapter, ValidationError
from pydantic_core import PydanticSerializationError

from saga import strict_json
from saga.errors import DefinitionError, InputError, StepResultError, UnknownSagaError
from saga.failures import exception_text
from saga.limits import TOKENS, Concurrency, RateLimit, check_distinct, check_priority
from saga.retry import DEFAULT_RETRY, RetryPolicy

NAME = re.compile(r"^[A-Za-z_][A-Za-z0-9_.\-]{0,127}\Z")
# Broker queue names a step may be routed to (Redis keys and AMQP queues both accept these).
QUEUE_NAME = re.compile(r"[A-Za-z0-9_.:-]{1,200}")
_ANY_ADAPTER: TypeAdapter[Any] = TypeAdapter(Any)


@dataclass(frozen=True)
class Undo:
    """What a compensation undoes (``ctx.undo``): the step's key and idempotency key, its input,
    and whether it completed. When it completed, the compensation's value is its result. When
    not, its outcome is unknown (an attempt started and raised, was cut off, or lost its worker:
    the effect may have been applied all the same), the value is None, and the compensation
    undoes by ``idempotency_key`` whatever the outside system holds under it (nothing, maybe)."""

    step_key: str
    idempotency_key: str
    completed: bool
    input: Any = None

    def to_json(self) -> dict[str, Any]:
        return dataclasses.asdict(self)


class StepContext:
    """What a step function gets besides its input.

    ``idempotency_key`` is the same for every attempt of this step in this run: pass it to outside
    systems (payment APIs, email senders, model providers) so a retried attempt is not a new effect.
    ``undo`` is set for a compensation: what it undoes.
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
        "step_key",
        "undo",
        "usage",
    )

    def __init__(
        self,
        *,
        run_id: str,
        saga: str,
        step: str,
        step_key: str,
        attempt: int,
        idempotency_key: str,
        run_input: Any,
        load_results: Callable[[], Mapping[str, Any]],
        undo: Undo | None = None,
    ) -> None:
        self.run_id = run_id
        self.saga = saga
        self.step = step
        self.step_key = step_key
        self.attempt = attempt
        self.idempotency_key = idempotency_key
        self.run_input = run_input
        self._load_results = load_results
        self.undo = undo
        self._results: Mapping[str, Any] | None = None
        # Units of its rate limits it reported using (saga.limits), journaled with its result.
        self.usage: dict[str, int] = {}

    def used_units(self, limit: str, units: int) -> None:
        """What this attempt really took from its rate limit ``limit`` (by name), once known:
        it replaces the estimate the step declared (``RateLimit(units=...)``)."""
        if not isinstance(units, int) or isinstance(units, bool) or units < 0:
            raise DefinitionError(f"used_units: units must be a non-negative int, got {units!r}")
        self.usage[limit] = units

    def used_tokens(self, tokens: int) -> None:
        """The model tokens this attempt used, for its rate limits declared with
        ``tokens=True`` (``saga.agent.complete`` reports them itself)."""
        self.used_units(TOKENS, tokens)

    @property
    def results(self) -> Mapping[str, Any]:
        """Results of the run's completed steps by step key (read from the journal when used)."""
        if self._results is None:
            self._results = self._load_results()
        return self._results


StepFunction = Callable[[StepContext, Any], Any]


# -- functions by reference -----------------------------------------------------------------


def fn_ref(fn: Callable[..., Any], where: str) -> str:
    """The import path of a module-level function; workers import it by this path."""
    module = getattr(fn, "__module__", None)
    qualname = getattr(fn, "__qualname__", None)
    if not callable(fn) or not module or not qualname:
        raise DefinitionError(f"{where}: expected a function, got {type(fn).__name__}")
    if inspect.ismethod(fn):
        raise DefinitionError(
            f"{where}: {qualname!r} is a bound method; steps and compensations must be "
            f"module-level functions so any worker can import them"
        )
    if "<" in qualname:
        raise DefinitionError(
            f"{where}: {qualname!r} is a lambda or a nested function; steps and compensations "
            f"must be module-level functions so any worker can import them"
        )
    return f"{module}:{qualname}"


@functools.lru_cache(maxsize=4096)
def load_ref(ref: str) -> Any:
    """Import ``module:qualname``."""
    module_name, sep, qualname = ref.partition(":")
    if not sep or not module_name or not qualname:
        raise UnknownSagaError(f"{ref!r} is not a reference: write it as 'module:attribute'")
    try:
        value: Any = importlib.import_module(module_name)
    except ImportError as exc:
        raise UnknownSagaError(f"cannot import module {module_name!r} for {ref!r}: {exc}") from exc
    for part in qualname.split("."):
        try:
            value = getattr(value, part)
        except AttributeError:
            raise UnknownSagaError(
                f"module {module_name!r} has no attribute {qualname!r} (looking up {ref!r})"
            ) from None
    return value


@dataclass(frozen=True)
class FunctionInfo:
    """A step or compensation function with the pydantic adapters of its annotations."""

    fn: StepFunction
    ref: str
    input_adapter: TypeAdapter[Any] = field(repr=False)
    output_adapter: TypeAdapter[Any] = field(repr=False)
    # False when the return type is plain JSON (int, str, dict[str, Any], ...): a journaled
    # result is then already the value, and replay need not validate it again.
    decodes_result: bool = False

    def validate_input(self, value: Any) -> Any:
        return self.input_adapter.validate_python(value)

    def encode_input(self, value: Any, where: str) -> str:
        """``value`` validated against the parameter annotation, as strict JSON; InputError
        saying what does not fit."""
        adapter = self.input_adapter
        try:
            return strict_json.dump(adapter.validate_python(value), adapter).decode()
        except ValidationError as exc:
            raise InputError(
                f"{where}: the input does not fit the parameter of {self.ref}: "
                f"{exception_text(exc)}"
            ) from None
        except (strict_json.NotJSONError, PydanticSerializationError) as exc:
            raise InputError(f"{where}: the input cannot be journaled as JSON: {exc}") from None

    def decode_result(self, value: Any) -> Any:
        """A journaled (JSON) result as the type the function returns, e.g. a pydantic model."""
        return self.output_adapter.validate_python(value) if self.decodes_result else value

    def encode_result(self, value: Any, *, limit: int, run_id: str, step: str) -> str:
        """The result as JSON text, or StepResultError naming the run, step and limit."""
        try:
            # warnings="error": a value that does not fit the annotation fails here, where it
            # was made, not at a later replay that decodes it.
            data = strict_json.dump(value, self.output_adapter)
        except Exception as exc:  # pydantic raises several types for "not serialisable"
            raise StepResultError(
                f"step {step!r} of run {run_id!r} returned a {type(value).__name__} that "
                f"cannot be journaled ({exception_text(exc)}); return JSON data or a pydantic "
                f"model"
            ) from exc
        if len(data) > limit:
            raise StepResultError(
                f"step {step!r} of run {run_id!r} returned {len(data)} bytes of JSON, over "
                f"the limit of {limit} bytes (SAGA_MAX_RESULT_BYTES); store large data elsewhere "
                f"and return a reference"
            )
        return data.decode()


def function_info(fn: Callable[..., Any], where: str) -> FunctionInfo:
    """Check ``fn`` is a module-level ``fn(ctx, value)`` and read its annotations."""
    ref = fn_ref(fn, where)
    return _function_info(fn, ref, where)


def compensation_info(fn: Callable[..., Any], where: str) -> FunctionInfo:
    """A compensation: a step function whose value may be None (see ``Undo``)."""
    info = function_info(fn, f"{where}, compensation")
    try:
        info.input_adapter.validate_python(None)
    except ValidationError:
        raise DefinitionError(
            f"{where}: compensation {info.ref} must accept None as its value: when the step's "
            f"outcome is unknown (an attempt raised or lost its worker, perhaps after its "
            f"effect) the compensation runs with None and undoes by ctx.undo.idempotency_key. "
            f"Annotate the value as `X | None`"
        ) from None
    return info


@functools.lru_cache(maxsize=4096)
def _function_info(fn: Callable[..., Any], ref: str, where: str) -> FunctionInfo:
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
            f"{where}: {ref} must take exactly two positional parameters, (ctx, value), "
            f"got {inspect.signature(fn)}"
        )
    try:
        hints = typing.get_type_hints(fn)
    except Exception as exc:
        raise DefinitionError(f"{where}: cannot resolve the type hints of {ref}: {exc}") from exc
    in_hint, out_hint = hints.get(positional[1].name), hints.get("return")
    return FunctionInfo(
        fn=fn,
        ref=ref,
        input_adapter=_ANY_ADAPTER if in_hint is None else TypeAdapter(in_hint),
        output_adapter=_ANY_ADAPTER if out_hint is None else TypeAdapter(out_hint),
        decodes_result=out_hint is not None and not _plain_json(out_hint),
    )


_JSON_SCALARS = (int, float, str, bool, type(None))


def _plain_json(hint: Any) -> bool:
    """Whether values of ``hint`` are their own JSON form (so decoding changes nothing)."""
    if hint is Any or hint is None or hint in _JSON_SCALARS or hint in (dict, list):
        return True
    origin, args = typing.get_origin(hint), typing.get_args(hint)
    if origin is dict:  # JSON keys are strings: dict[int, X] comes back with str keys
        return args[0] in (str, Any) and _plain_json(args[1])
    if origin in (list, typing.Union, types.UnionType):
        return all(_plain_json(a) for a in args)
    return False


def function_by_ref(ref: str) -> FunctionInfo:
    """What a worker calls: the function a journal row names."""
    return _function_info(load_ref(ref), ref, f"function {ref!r}")


# -- step options -----------------------------------------------------------------------------


class StepArgs(TypedDict, total=False):
    """A step's options: the keyword arguments of ``step()``, ``Saga.step``, ``ctx.step``,
    ``ctx.start`` and ``ctx.map``, declared here once. A new option is a key here and, when
    workers need it, a field of ``StepOptions`` (which journals it with the step)."""

    name: str | None  # the step's name; by default its function's
    compensate: StepFunction | None  # undoes the step's effect when the run compensates
    retry: RetryPolicy | None  # by default the saga's, else RetryPolicy()
    timeout: float | None  # seconds an attempt may run
    pivot: bool  # the point of no return: once it completes, failures no longer compensate
    compensate_retry: RetryPolicy | None  # for its compensation; by default COMPENSATION_RETRY
    queue: str | None  # broker queue for the step and its compensation; by default the run's
    concurrency: Concurrency | None  # at most N of it running at a time (per key)
    rate_limit: RateLimit | list[RateLimit] | None  # units per window shared by every worker
    priority: int | None  # goes before lower ones waiting for a limit; by default the run's


def check_step_args(args: Mapping[str, Any], where: str) -> None:
    """Refuse keyword arguments that name no step option (``**`` would take them silently)."""
    for key in args:
        if key not in StepArgs.__annotations__:
            close = difflib.get_close_matches(key, StepArgs.__annotations__, n=1)
            hint = f" (did you mean {close[0]!r}?)" if close else ""
            raise DefinitionError(
                f"{where}: {key!r} is not a step option{hint}; the options are "
                f"{', '.join(StepArgs.__annotations__)}"
            )


def step_name(fn: Callable[..., Any], args: StepArgs) -> str:
    return str(args.get("name") or getattr(fn, "__name__", ""))


@dataclass(frozen=True)
class StepOptions:
    """How a step runs; journaled with the step, so workers need no definition."""

    retry: RetryPolicy = field(default_factory=RetryPolicy)
    timeout_seconds: float | None = None
    pivot: bool = False
    compensate_retry: RetryPolicy | None = None  # for its compensation; None: the default
    queue: str | None = None  # broker queue for it and its compensation; None: the run's
    undo: Undo | None = None  # a compensation's: what it undoes
    # Flow control (saga.limits): declared here, journaled as resolved gates ("gates").
    concurrency: Concurrency | None = None
    rate_limits: tuple[RateLimit, ...] = ()
    priority: int | None = None

    def validate(self, where: str) -> None:
        if self.queue is not None and not (
            isinstance(self.queue, str) and QUEUE_NAME.fullmatch(self.queue)
        ):
            raise DefinitionError(
                f"{where}: queue must be a queue name matching {QUEUE_NAME.pattern}, "
                f"got {self.queue!r}"
            )
        if not isinstance(self.retry, RetryPolicy):
            raise DefinitionError(
                f"{where}: retry must be a RetryPolicy, got {type(self.retry).__name__}"
            )
        if self.compensate_retry is not None and not isinstance(self.compensate_retry, RetryPolicy):
            raise DefinitionError(
                f"{where}: compensate_retry must be a RetryPolicy, got "
                f"{type(self.compensate_retry).__name__}"
            )
        if self.timeout_seconds is not None and not self.timeout_seconds > 0:
            raise DefinitionError(f"{where}: timeout must be positive, got {self.timeout_seconds}")
        if self.concurrency is not None:
            if not isinstance(self.concurrency, Concurrency):
                raise DefinitionError(f"{where}: concurrency must be a saga.Concurrency")
            self.concurrency.validate_for_step(where)
        for limit in self.rate_limits:
            if not isinstance(limit, RateLimit):
                raise DefinitionError(f"{where}: rate_limit must be a saga.RateLimit (or a list)")
            limit.validate(where)
        if len({limit.name for limit in self.rate_limits}) < len(self.rate_limits):
            raise DefinitionError(f"{where}: two rate limits of the same name")
        if self.priority is not None:
            check_priority(self.priority, where)

    @property
    def limited(self) -> bool:
        return self.concurrency is not None or bool(self.rate_limits)

    def gates(
        self,
        name: str,
        run_input: Any,
        step_input_json: str,
        where: str,
        run_limit: Concurrency | None = None,
        run_name: str = "",
    ) -> list[dict[str, Any]]:
        """The step's limits with their keys worked out for this run (``saga.limits``), its
        run's own limit first: what its journal row carries as ``gates``."""
        check_distinct(run_limit, run_name, self.concurrency, name, where)
        gates = []
        if run_limit is not None:
            gates.append(run_limit.gate(run_name, run_input, where, run_level=True))
        if self.concurrency is not None:
            gates.append(self.concurrency.gate(name, run_input, where, run_level=False))
        if self.rate_limits:
            step_input = strict_json.loads(step_input_json) if step_input_json else None
            gates.extend(r.gate(run_input, step_input, where) for r in self.rate_limits)
        return gates

    def to_json(self) -> dict[str, Any]:
        """What differs from the defaults (``from_json`` fills them in): the options ride in
        the step's journal row, which every claim and outcome writes again whole."""
        data: dict[str, Any] = {}
        if self.retry != DEFAULT_RETRY:
            data["retry"] = self.retry.changes()
        if self.timeout_seconds is not None:
            data["timeout_seconds"] = self.timeout_seconds
        if self.pivot:
            data["pivot"] = True
        if self.compensate_retry is not None:
            data["compensate_retry"] = self.compensate_retry.changes()
        if self.queue is not None:
            data["queue"] = self.queue
        if self.undo is not None:
            data["undo"] = self.undo.to_json()
        if self.priority is not None:
            data["priority"] = self.priority
        return data

    @classmethod
    def from_args(
        cls, args: StepArgs, where: str, default_retry: RetryPolicy | None = None
    ) -> StepOptions:
        """The journaled options of a step declared with ``args``; validated."""
        retry = args.get("retry")
        rate = args.get("rate_limit")
        options = cls(
            retry=(default_retry or RetryPolicy()) if retry is None else retry,
            timeout_seconds=args.get("timeout"),
            pivot=bool(args.get("pivot", False)),
            compensate_retry=args.get("compensate_retry"),
            queue=args.get("queue"),
            concurrency=args.get("concurrency"),
            rate_limits=() if rate is None else tuple(rate) if isinstance(rate, list) else (rate,),
            priority=args.get("priority"),
        )
        options.validate(where)
        return options

    @classmethod
    def from_json(cls, data: Mapping[str, Any]) -> StepOptions:
        retry, undo = data.get("retry"), data.get("compensate_retry")
        return cls(
            retry=RetryPolicy.from_json(retry) if retry else DEFAULT_RETRY,
            timeout_seconds=data.get("timeout_seconds"),
            pivot=bool(data.get("pivot", False)),
            compensate_retry=RetryPolicy.from_json(undo) if undo else None,
            queue=data.get("queue"),
            undo=Undo(**data["undo"]) if data.get("undo") else None,
            priority=data.get("priority"),
        )


# -- step graphs ------------------------------------------------------------------------------


@dataclass(frozen=True)
class StepDecl:
    """A step of a graph as declared: what ``step()`` returns for a ``Saga``'s list."""

    fn: StepFunction
    after: tuple[str, ...] | None = None
    map_over: str | None = None
    args: StepArgs = field(default_factory=lambda: StepArgs())


Deps = str | Callable[..., Any] | Iterable[str | Callable[..., Any]]


def _names(deps: Deps | None) -> tuple[str, ...]:
    if deps is None:
        return ()
    if isinstance(deps, str) or callable(deps):
        deps = [deps]
    return tuple(d if isinstance(d, str) else getattr(d, "__name__", repr(d)) for d in deps)


def step(
    fn: StepFunction,
    *,
    after: str | StepFunction | Iterable[str | StepFunction] | None = None,
    map_over: str | StepFunction | None = None,
    **options: Unpack[StepArgs],
) -> StepDecl:
    """Declare a step with options (``StepArgs``). In a ``Saga``'s list, a step without
    ``after`` follows the one before it. ``queue`` sends the step (and its compensation) to that
    broker queue, for workers that have what it needs (a GPU, an API quota); by default it goes
    to the run's."""
    check_step_args(options, f"step {step_name(fn, options)!r}")
    return StepDecl(
        fn,
        None if after is None else _names(after),
        None if map_over is None else _names(map_over)[0],
        options,
    )


@dataclass(frozen=True)
class GraphStep:
    """A validated node of a step graph."""

    name: str
    function: FunctionInfo
    after: tuple[str, ...]
    map_over: str | None
    compensation: FunctionInfo | None
    options: StepOptions


class Saga:
    """A saga as a graph of steps: dependencies, parallel branches, fan-out and fan-in.

    Built from a list, steps run in order, each step's result the next one's input::

        pipeline = Saga("summarise", [fetch, summarise, store])

    or with the ``step`` decorator, naming dependencies::

        trip = Saga("book_trip")

        @trip.step()
        def quote(ctx, request): ...

        @trip.step(after=quote, compensate=cancel_flight)
        def flight(ctx, quote): ...

    A step with no dependencies gets the run's input; one dependency, that step's result; several,
    a dict of their results by name. ``map_over=X`` runs one branch per item of X's result (a
    list); a step after a mapped step gets the list of branch results, in order. The run's result
    is the result of its last step (or a dict of results when the graph ends in several steps).
    """

    def __init__(
        self,
        name: str,
        steps: Sequence[StepFunction | StepDecl] | None = None,
        *,
        version: str = "1",
        retry: RetryPolicy | None = None,
        concurrency: Concurrency | None = None,
    ) -> None:
        if not isinstance(name, str) or not NAME.match(name):
            raise DefinitionError(f"saga name {name!r} must match {NAME.pattern}")
        if retry is not None and not isinstance(retry, RetryPolicy):
            raise DefinitionError(f"saga {name!r}: retry must be a RetryPolicy")
        if concurrency is not None:
            if not isinstance(concurrency, Concurrency):
                raise DefinitionError(f"saga {name!r}: concurrency must be a saga.Concurrency")
            concurrency.validate(f"saga {name!r}")
        # At most N runs at a time (per key): a run holds a slot from its first step to its end.
        self.concurrency = concurrency
        self.name = name
        self.version = str(version)
        self.default_retry = RetryPolicy() if retry is None else retry
        self._steps: dict[str, GraphStep] = {}
        # The module that built the saga; ref() looks the attribute up there.
        self.module: str = sys._getframe(1).f_globals.get("__name__", "__main__")
        previous: str | None = None
        decls = [s if isinstance(s, StepDecl) else StepDecl(s) for s in steps or ()]
        for decl in decls:
            after = (
                decl.after
                if decl.after is not None
                else (() if previous is None or decl.map_over else (previous,))
            )
            previous = self._add(decl, after, check_deps=False)
        if steps is not None:  # else steps come one by one from the decorator, each checked
            self._validate_graph()

    # -- building -----------------------------------------------------------------------------

    def step(
        self,
        *,
        after: str | StepFunction | Iterable[str | StepFunction] | None = None,
        map_over: str | StepFunction | None = None,
        **options: Unpack[StepArgs],
    ) -> Callable[[StepFunction], StepFunction]:
        """Decorator adding a step; dependencies must be added first. Returns ``fn`` unchanged."""

        def add(fn: StepFunction) -> StepFunction:
            decl = step(fn, after=after, map_over=map_over, **options)
            self._add(decl, decl.after or (), check_deps=True)
            return fn

        return add

    def _add(self, decl: StepDecl, after: tuple[str, ...], *, check_deps: bool) -> str:
        name = step_name(decl.fn, decl.args)
        where = f"saga {self.name!r}, step {name!r}"
        if not NAME.match(name) or "#" in name or "[" in name:
            raise DefinitionError(f"{where}: step names must match {NAME.pattern}")
        if name in self._steps:
            raise DefinitionError(f"{where}: duplicate step name")
        if decl.map_over is not None:
            after = tuple(dict.fromkeys((*after, decl.map_over)))
        if check_deps:
            unknown = [d for d in after if d not in self._steps]
            if unknown:
                raise DefinitionError(
                    f"{where}: depends on unknown step(s) {unknown}; add dependencies first"
                )
        compensate = decl.args.get("compensate")
        options = StepOptions.from_args(decl.args, where, self.default_retry)
        check_distinct(self.concurrency, self.name, options.concurrency, name, where)
        self._steps[name] = GraphStep(
            name=name,
            function=function_info(decl.fn, where),
            after=after,
            map_over=decl.map_over,
            compensation=None if compensate is None else compensation_info(compensate, where),
            options=options,
        )
        return name

    def _validate_graph(self) -> None:
        if not self._steps:
            raise DefinitionError(f"saga {self.name!r} has no steps")
        for s in self._steps.values():
            unknown = [d for d in s.after if d not in self._steps]
            if unknown:
                raise DefinitionError(
                    f"saga {self.name!r}, step {s.name!r}: depends on unknown step(s) {unknown}"
                )
        try:
            graphlib.TopologicalSorter({s.name: s.after for s in self._steps.values()}).prepare()
        except graphlib.CycleError as exc:
            raise DefinitionError(
                f"saga {self.name!r} has a dependency cycle: {' -> '.join(exc.args[1])}"
            ) from None

    # -- reading ------------------------------------------------------------------------------

    def __repr__(self) -> str:
        return f"Saga({self.name!r}, steps={list(self._steps)})"

    @property
    def steps(self) -> tuple[GraphStep, ...]:
        return tuple(self._steps.values())

    def get_step(self, name: str) -> GraphStep:
        try:
            return self._steps[name]
        except KeyError:
            raise UnknownSagaError(
                f"saga {self.name!r} has no step {name!r}; its steps are {list(self._steps)}"
            ) from None

    def limits(self) -> list[Concurrency | RateLimit]:
        """The limits its steps declare (not its own ``concurrency``)."""
        out: list[Concurrency | RateLimit] = []
        for s in self._steps.values():
            if s.options.concurrency is not None:
                out.append(s.options.concurrency)
            out.extend(s.options.rate_limits)
        return out

    @property
    def roots(self) -> tuple[GraphStep, ...]:
        return tuple(s for s in self._steps.values() if not s.after)

    @property
    def sinks(self) -> tuple[GraphStep, ...]:
        used = {d for s in self._steps.values() for d in s.after}
        return tuple(s for s in self._steps.values() if s.name not in used)

    def successors(self, name: str) -> tuple[GraphStep, ...]:
        return tuple(s for s in self._steps.values() if name in s.after)

    def validate_input(self, value: Any) -> str:
        """The run's input as JSON, validated against the root steps' parameter types."""
        self._validate_graph()
        where = f"saga {self.name!r}"
        for root in self.roots[1:]:  # each root takes the input: it must fit every one
            root.function.encode_input(value, where)
        return self.roots[0].function.encode_input(value, where)

    @functools.cached_property
    def fingerprint(self) -> str:
        """Identifies the graph's shape: a run refuses to advance under another shape."""
        shape = sorted((s.name, s.after, s.map_over, s.function.ref) for s in self._steps.values())
        return hashlib.sha256(repr(shape).encode()).hexdigest()[:16]

    @property
    def version_tag(self) -> str:
        """Recorded with each run: the declared version and the graph's shape."""
        return f"{self.version}+{self.fingerprint}"

    def ref(self) -> str:
        return definition_ref(self, self.name, self.module)


def definition_ref(obj: object, name: str, module_name: str) -> str:
    """The import path workers use to load a definition built at module level."""
    module = sys.modules.get(module_name)
    for attr, value in vars(module or object()).items():
        if value is obj:
            return f"{module_name}:{attr}"
    raise DefinitionError(
        f"saga {name!r} is not a module-level attribute of {module_name!r}; define it at module "
        f"level so workers can import it"
    )
