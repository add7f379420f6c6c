"""``async def`` workflows replay like sync ones, with no event loop: their context's methods
never wait on anything real. Awaiting anything else is refused with a clear error."""

from __future__ import annotations

import asyncio
from typing import Any

from saga.errors import DefinitionError
from saga.workflow import AsyncWorkflowContext, JournalEntry, WorkflowContext, workflow


async def double(ctx: Any, x: int) -> int:
    return 2 * x


def add_one(ctx: Any, x: int) -> int:
    return x + 1


@workflow("async_replay")
async def async_replay(ctx: AsyncWorkflowContext, x: int) -> list[int]:
    a = await ctx.step(double, x)  # an async step
    b = await ctx.step(add_one, a)  # a sync one
    both = await ctx.map(double, [a, b])
    return [a, b, *both]


@workflow("awaits_io")
async def awaits_io(ctx: AsyncWorkflowContext, x: int) -> int:
    await asyncio.sleep(0.01)  # I/O in workflow code
    return x


def _ctx(journal: dict[int, JournalEntry], input: Any = 3) -> WorkflowContext:
    return WorkflowContext(
        run_id="r",
        workflow="wf",
        input=input,
        journal=journal,
        consume_event=lambda name, key: (False, None),
    )


def _done(position: int, key: str, name: str, result: Any) -> JournalEntry:
    return JournalEntry(position, key, name, "action", "completed", result, None)


def test_an_async_workflow_schedules_its_first_step_then_suspends() -> None:
    outcome = async_replay.replay(_ctx({}))
    assert not outcome.finished
    assert [(c.step_key, c.input_json) for c in outcome.scheduled] == [("double#1", "3")]


def test_an_async_workflow_replays_the_journal_to_its_result() -> None:
    journal = {
        1: _done(1, "double#1", "double", 6),
        2: _done(2, "add_one#2", "add_one", 7),
        3: _done(3, "double#3", "double", 12),
        4: _done(4, "double#4", "double", 14),
    }
    outcome = async_replay.replay(_ctx(journal))
    assert outcome.finished and outcome.error is None
    assert outcome.result == [6, 7, 12, 14]


def test_an_async_workflow_fans_out_where_the_journal_ends() -> None:
    journal = {1: _done(1, "double#1", "double", 6), 2: _done(2, "add_one#2", "add_one", 7)}
    outcome = async_replay.replay(_ctx(journal))
    assert [c.step_key for c in outcome.scheduled] == ["double#3", "double#4"]


def test_awaiting_io_in_workflow_code_fails_the_run_saying_why() -> None:
    outcome = awaits_io.replay(_ctx({}))
    assert outcome.finished
    assert isinstance(outcome.error, DefinitionError)
    assert "awaited something other than its context's methods" in str(outcome.error)
