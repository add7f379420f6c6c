"""Workflows written as code: the agent loop as ordinary Python.

The coordinator advances a run by replaying the workflow function against the journal. Each
``ctx.step(...)`` (and ``start``, ``sleep``, ``wait_event``) takes the next call position; a
journaled position returns its saved result at once, the first one not in the journal is
scheduled and the replay stops there. A replay that asks, at some position, for another step than
the journal holds there stops the run with a NonDeterminismError naming both.

Workflow code is the deterministic skeleton: no I/O, clocks or randomness outside steps.
"""

from __future__ import annotations

import functools
import inspect
import sys
from collections.abc import Callable, Coroutine, Iterable, Mapping
from dataclasses import dataclass
from typing import Any, Generic, ParamSpec, TypeVar, Unpack, overload

from pydantic import ValidationError

from saga.definition import (
    NAME,
    FunctionInfo,
    StepArgs,
    StepOptions,
    check_step_args,
    compensation_info,
    definition_ref,
    function_info,
    step_name,
)
from saga.errors import DefinitionError, SagaError
from saga.failures import ErrorType, exception_text
from saga.keys import workflow_key
from saga.limits import Concurrency

P = ParamSpec("P")
R = TypeVar("R")
T = TypeVar("T")

AsyncStep = Callable[[Any, Any], Coroutine[Any, Any, R]]  # an ``async def`` step function


class StepFailed(SagaError):
    """A step of the workflow failed for good. Catch it to take another path; left uncaught,
    the run fails and the completed steps are compensated."""


class EventTimeout(StepFailed):
    """``ctx.wait_event`` timed out before the event arrived."""


class NonDeterminismError(SagaError):
    """The workflow asked for another step than the journal recorded at that position."""


class Suspend(BaseException):
    """Raised inside a replay when the run must wait for steps in flight. A BaseException so that
    ``except Exception`` in workflow code cannot swallow it."""


class _Diverged(BaseException):
    """Carries a NonDeterminismError out of workflow code, past ``except Exception``."""

    def __init__(self, error: NonDeterminismError) -> None:
        self.error = error


@dataclass(frozen=True)
class JournalEntry:
    """What a replay knows of one position: from the journal, or just scheduled."""

    position: int
    step_key: str
    name: str
    kind: str
    state: str
    result: Any
    error: Mapping[str, Any] | None


@dataclass(frozen=True)
class Call:
    """A step the replay wants scheduled."""

    position: int
    step_key: str
    name: str
    kind: str  # action | timer | event
    function: FunctionInfo | None
    input_json: str  # encoded when called: as the function's parameter annotation says
    compensation: FunctionInfo | None
    options: StepOptions
    delay_seconds: float | None = None  # timer: sleep; event: timeout


class Handle(Generic[T]):
    """A started step; ``ctx.gather`` waits for it."""

    __slots__ = ("function", "position")

    def __init__(self, position: int, function: FunctionInfo | None = None) -> None:
        self.position = position
        self.function = function  # decodes the journaled result into the step's return type


class WorkflowContext:
    """What workflow code calls. Every method is journaled by call position."""

    def __init__(
        self,
        *,
        run_id: str,
        workflow: str,
        input: Any,
        journal: Mapping[int, JournalEntry],
        consume_event: Callable[[str, str], tuple[bool, Any]],
    ) -> None:
        self.run_id = run_id
        self.workflow = workflow
        self.input = input
        self._journal = journal
        self._consume_event = consume_event
        self._position = 0
        self.scheduled: list[Call] = []
        self.received: list[tuple[int, str, Any]] = []  # events consumed during this replay

    # -- steps --------------------------------------------------------------------------------

    # An async step (``async def``) returns what its coroutine returns: the overloads say so.
    @overload
    def step(self, fn: AsyncStep[R], arg: Any = None, **options: Unpack[StepArgs]) -> R: ...
    @overload
    def step(
        self, fn: Callable[[Any, Any], R], arg: Any = None, **options: Unpack[StepArgs]
    ) -> R: ...
    def step(
        self, fn: Callable[[Any, Any], Any], arg: Any = None, **options: Unpack[StepArgs]
    ) -> Any:
        """Run ``fn(step_ctx, arg)`` as a journaled step and return its result."""
        return self.gather(self.start(fn, arg, **options))[0]

    @overload
    def start(
        self, fn: AsyncStep[R], arg: Any = None, **options: Unpack[StepArgs]
    ) -> Handle[R]: ...
    @overload
    def start(
        self, fn: Callable[[Any, Any], R], arg: Any = None, **options: Unpack[StepArgs]
    ) -> Handle[R]: ...
    def start(
        self, fn: Callable[[Any, Any], Any], arg: Any = None, **options: Unpack[StepArgs]
    ) -> Handle[Any]:
        """Start a step without waiting for it; several started steps run in parallel."""
        name = step_name(fn, options)
        where = f"workflow {self.workflow!r}, step {name!r}"
        check_step_args(options, where)
        position = self._next(name, "action")
        if position in self._journal:
            # Journaled: replay costs a lookup (and, for a typed result, its validation).
            return Handle(position, function_info(fn, self.workflow))
        if not NAME.match(name):
            raise DefinitionError(f"{where}: step names must match {NAME.pattern}")
        function = function_info(fn, where)
        input_json = function.encode_input(arg, where)
        compensate = options.get("compensate")
        compensation = None if compensate is None else compensation_info(compensate, where)
        key = workflow_key(name, position)
        self.scheduled.append(
            Call(
                position,
                key,
                name,
                "action",
                function,
                input_json,
                compensation,
                StepOptions.from_args(options, where),
            )
        )
        return Handle(position, function)

    @overload
    def map(
        self, fn: AsyncStep[R], items: Iterable[Any], **options: Unpack[StepArgs]
    ) -> list[R]: ...
    @overload
    def map(
        self, fn: Callable[[Any, Any], R], items: Iterable[Any], **options: Unpack[StepArgs]
    ) -> list[R]: ...
    def map(
        self, fn: Callable[[Any, Any], Any], items: Iterable[Any], **options: Unpack[StepArgs]
    ) -> list[Any]:
        """Run ``fn`` over each item in parallel (fan-out) and return the results in order."""
        return self.gather(*[self.start(fn, item, **options) for item in items])

    def gather(self, *handles: Handle[Any]) -> list[Any]:
        """Wait for started steps; their results in order. Raises StepFailed for the first
        failed one."""
        results = []
        for h in handles:
            entry = self._journal.get(h.position)
            if entry is None or entry.state not in ("completed", "failed"):
                raise Suspend
            if entry.state == "failed":
                error = entry.error or {}
                kind = EventTimeout if error.get("type") == ErrorType.EVENT_TIMEOUT else StepFailed
                raise kind(
                    f"step {entry.name!r} of workflow {self.workflow!r} failed for good: "
                    f"{error.get('message', error)}"
                )
            results.append(self._decoded(entry, h.function))
        return results

    def _decoded(self, entry: JournalEntry, function: FunctionInfo | None) -> Any:
        """A journaled result as the step's return type. One that no longer fits the type (the
        code changed under a running run) is a divergence, never a business failure."""
        if function is None:
            return entry.result
        try:
            return function.decode_result(entry.result)
        except ValidationError as exc:
            raise _Diverged(
                NonDeterminismError(
                    f"workflow {self.workflow!r} of run {self.run_id!r}: the journaled result of "
                    f"step {entry.name!r} (call {entry.position}) no longer fits the return type "
                    f"of {function.ref}: {exception_text(exc)}. Deploy the code the run started "
                    f"with and retry it, or fork the run from an earlier step"
                )
            ) from None

    # -- waits --------------------------------------------------------------------------------

    def sleep(self, seconds: float) -> None:
        """A durable sleep: no worker slot is held; the run resumes when it is over."""
        position = self._next("sleep", "timer")
        if position not in self._journal:
            self.scheduled.append(
                Call(
                    position,
                    workflow_key("sleep", position),
                    "sleep",
                    "timer",
                    None,
                    "null",
                    None,
                    StepOptions(),
                    float(seconds),
                )
            )
        self.gather(Handle(position))

    def wait_event(self, name: str, *, timeout: float | None = None) -> Any:
        """Wait durably for an outside event sent with ``SagaClient.send_event``; its payload.
        Raises EventTimeout after ``timeout`` seconds."""
        if not NAME.match(name):
            raise DefinitionError(f"workflow {self.workflow!r}: bad event name {name!r}")
        position = self._next(name, "event")
        if position not in self._journal:
            arrived, payload = self._consume_event(name, workflow_key(name, position))
            if arrived:  # sent before the run got here: journal it and go on
                self.received.append((position, name, payload))
                self._journal = {
                    **self._journal,
                    position: JournalEntry(
                        position,
                        workflow_key(name, position),
                        name,
                        "event",
                        "completed",
                        payload,
                        None,
                    ),
                }
                return payload
            self.scheduled.append(
                Call(
                    position,
                    workflow_key(name, position),
                    name,
                    "event",
                    None,
                    "null",
                    None,
                    StepOptions(),
                    timeout,
                )
            )
        return self.gather(Handle(position))[0]

    def _next(self, name: str, kind: str) -> int:
        self._position += 1
        entry = self._journal.get(self._position)
        if entry is not None and (entry.name, entry.kind) != (name, kind):
            raise _Diverged(
                NonDeterminismError(
                    f"workflow {self.workflow!r} of run {self.run_id!r} diverged from its "
                    f"journal at call {self._position}: the journal has {entry.kind} "
                    f"{entry.name!r}, the code now asks for {kind} {name!r}. Deploy the code "
                    f"the run started with and retry it, or fork the run from an earlier step"
                )
            )
        return self._position


class AsyncWorkflowContext:
    """What an ``async def`` workflow calls: ``WorkflowContext``'s methods, to be awaited.
    They never wait on anything real (a replay reads the journal, and suspends where it ends),
    so a replay needs no event loop."""

    def __init__(self, ctx: WorkflowContext) -> None:
        self.sync = ctx
        self.run_id, self.workflow, self.input = ctx.run_id, ctx.workflow, ctx.input

    @overload
    async def step(self, fn: AsyncStep[R], arg: Any = None, **options: Unpack[StepArgs]) -> R: ...
    @overload
    async def step(
        self, fn: Callable[[Any, Any], R], arg: Any = None, **options: Unpack[StepArgs]
    ) -> R: ...
    async def step(
        self, fn: Callable[[Any, Any], Any], arg: Any = None, **options: Unpack[StepArgs]
    ) -> Any:
        return self.sync.step(fn, arg, **options)

    @overload
    async def start(
        self, fn: AsyncStep[R], arg: Any = None, **options: Unpack[StepArgs]
    ) -> Handle[R]: ...
    @overload
    async def start(
        self, fn: Callable[[Any, Any], R], arg: Any = None, **options: Unpack[StepArgs]
    ) -> Handle[R]: ...
    async def start(
        self, fn: Callable[[Any, Any], Any], arg: Any = None, **options: Unpack[StepArgs]
    ) -> Handle[Any]:
        return self.sync.start(fn, arg, **options)

    @overload
    async def map(
        self, fn: AsyncStep[R], items: Iterable[Any], **options: Unpack[StepArgs]
    ) -> list[R]: ...
    @overload
    async def map(
        self, fn: Callable[[Any, Any], R], items: Iterable[Any], **options: Unpack[StepArgs]
    ) -> list[R]: ...
    async def map(
        self, fn: Callable[[Any, Any], Any], items: Iterable[Any], **options: Unpack[StepArgs]
    ) -> list[Any]:
        return self.sync.map(fn, items, **options)

    async def gather(self, *handles: Handle[Any]) -> list[Any]:
        return self.sync.gather(*handles)

    async def sleep(self, seconds: float) -> None:
        self.sync.sleep(seconds)

    async def wait_event(self, name: str, *, timeout: float | None = None) -> Any:
        return self.sync.wait_event(name, timeout=timeout)


def _drive(coroutine: Coroutine[Any, Any, Any], workflow: str) -> Any:
    """Run an async workflow's replay to its end: it never suspends on the journal, so one
    ``send`` finishes it (or raises Suspend where the journal ends)."""
    refused = DefinitionError(
        f"workflow {workflow!r} awaited something other than its context's methods; workflow "
        f"code must not do I/O or wait on clocks: do it in a step (async steps may await)"
    )
    try:
        coroutine.send(None)
    except StopIteration as done:
        return done.value
    except RuntimeError as exc:  # asyncio's own awaitables, with no loop running the replay
        if "no running event loop" in str(exc):
            raise refused from exc
        raise
    coroutine.close()
    raise refused


@dataclass(frozen=True)
class ReplayOutcome:
    """What one replay found: steps to schedule, or the workflow's return value or error."""

    scheduled: list[Call]
    received: list[tuple[int, str, Any]]
    finished: bool = False
    result: Any = None
    error: BaseException | None = None


class Workflow(Generic[P, R]):
    """A workflow written as code. Build it with ``@workflow(...)``."""

    def __init__(
        self,
        fn: Callable[[Any, Any], Any],
        *,
        name: str,
        version: str,
        module: str,
        concurrency: Concurrency | None = None,
    ) -> None:
        if not NAME.match(name):
            raise DefinitionError(f"workflow name {name!r} must match {NAME.pattern}")
        info = function_info(fn, f"workflow {name!r}")
        if concurrency is not None:
            if not isinstance(concurrency, Concurrency):
                raise DefinitionError(f"workflow {name!r}: concurrency must be a saga.Concurrency")
            concurrency.validate(f"workflow {name!r}")
        # At most N runs at a time (per key): a run holds a slot from its first step to its end.
        self.concurrency = concurrency
        self.fn = fn
        self.name = name
        self.version = str(version)
        self.module = module
        self.input_info = info
        functools.update_wrapper(self, fn)  # type: ignore[arg-type]

    def __repr__(self) -> str:
        return f"Workflow({self.name!r})"

    @property
    def version_tag(self) -> str:
        """Recorded with each run. Replay itself checks the code against the journal."""
        return self.version

    def ref(self) -> str:
        return definition_ref(self, self.name, self.module)

    def validate_input(self, value: Any) -> str:
        """The run's input as JSON, validated against the workflow's parameter type."""
        return self.input_info.encode_input(value, f"workflow {self.name!r}")

    def replay(self, ctx: WorkflowContext) -> ReplayOutcome:
        try:
            if inspect.iscoroutinefunction(self.fn):
                value = self.input_info.validate_input(ctx.input)
                result = _drive(self.fn(AsyncWorkflowContext(ctx), value), self.name)
            else:
                result = self.fn(ctx, self.input_info.validate_input(ctx.input))
        except Suspend:
            return ReplayOutcome(ctx.scheduled, ctx.received)
        except _Diverged as diverged:
            return ReplayOutcome([], [], finished=True, error=diverged.error)
        except Exception as exc:
            return ReplayOutcome([], ctx.received, finished=True, error=exc)
        return ReplayOutcome([], ctx.received, finished=True, result=result)


def workflow(
    name: str | None = None, *, version: str = "1", concurrency: Concurrency | None = None
) -> Callable[[Callable[[Any, Any], R]], Workflow[Any, R]]:
    """Declare a workflow written as code::

    @workflow("research_agent")
    def agent(ctx: WorkflowContext, question: str) -> str:
        plan = ctx.step(make_plan, question)
        ...
    """
    module = sys._getframe(1).f_globals.get("__name__", "__main__")

    def build(fn: Callable[[Any, Any], R]) -> Workflow[Any, R]:
        return Workflow(
            fn, name=name or fn.__name__, version=version, module=module, concurrency=concurrency
        )

    return build
