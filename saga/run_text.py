"""Runs as an operator reads them in a terminal: list rows and a run's whole story
(``saga list``, ``saga show``). ``--json`` prints ``saga.runs_view``'s own dicts instead."""

from __future__ import annotations

import datetime as dt
import json
from collections.abc import Iterator, Sequence
from typing import Any

from saga.runs_view import AttemptView, LimitView, RunDetail, RunRow, StepView
from saga.states import FINAL_STEP_STATES, GateKind, GateSlotState, StepKind

PREVIEW = 160  # characters of an input or result shown inline (--json has them whole)


def when(t: dt.datetime | None) -> str:
    return "" if t is None else t.astimezone(dt.UTC).strftime("%Y-%m-%d %H:%M:%S")


def preview(value: Any, width: int = PREVIEW) -> str:
    text = json.dumps(value, default=str, ensure_ascii=False)
    return text if len(text) <= width else f"{text[: width - 1]}… ({len(text)} chars)"


def seconds(start: dt.datetime | None, end: dt.datetime | None) -> str:
    if start is None or end is None:
        return ""
    return f"{(end - start).total_seconds():.2f}s"


LIST_HEADER = f"{'run id':<34} {'saga':<20} {'state':<19} {'created (UTC)':<19}  error"


def list_line(r: RunRow) -> str:
    error = "" if r.error_type is None else f"{r.error_type}: {r.error_message or ''}"
    return f"{r.run_id:<34} {r.saga:<20} {r.state:<19} {when(r.created_at):<19}  {error[:70]}"


def trace_url(template: str | None, trace_id: str | None) -> str | None:
    if not template or not trace_id:
        return None
    return template.replace("{trace_id}", trace_id)


def show_lines(d: RunDetail, *, trace_link: str | None, tracebacks: bool) -> Iterator[str]:
    yield f"run {d.run_id}  saga {d.saga} v{d.saga_version} ({d.saga_ref})  {d.state}"
    ended = f"  finished {when(d.finished_at)} ({seconds(d.created_at, d.finished_at)})"
    yield f"created {when(d.created_at)}" + (ended if d.finished_at else "")
    if d.trace_id:
        yield f"trace {d.trace_id}" + (f"  {trace_link}" if trace_link else "")
    yield f"input  {preview(d.input)}"
    if d.result is not None:
        yield f"result {preview(d.result)}"
    if d.error:
        yield f"error  {d.error.get('type', '')}: {d.error.get('message', d.error)}"
    yield ""
    yield f"{'#':>3}  {'step':<30} {'kind':<12} {'state':<10} {'attempts':>8}"
    for s in d.steps:
        yield from _step_lines(s, tracebacks)
    if d.waits:
        yield ""
        yield "waiting:"
        for w in d.waits:
            due = f", until {when(w.due_at)}" if w.due_at else ""
            step = f" (step {w.step_key})" if w.kind == "limit" else ""
            yield f"  {w.kind} {w.name!r}{step} since {when(w.since)}{due}"
    yield ""
    yield "events:"
    for e in d.events:
        actor = f" by {e.actor}" if e.actor else ""
        detail = f"  {preview(e.detail, 100)}" if e.detail else ""
        yield f"  {when(e.at)}  {e.event}{actor}{detail}"
    if d.usage is not None:
        t = d.usage["total"]
        yield (
            f"model usage: {d.usage['calls']} completions, {t['total_tokens']} tokens "
            f"({t['prompt_tokens']} prompt, {t['completion_tokens']} completion)"
        )


def _step_lines(s: StepView, tracebacks: bool) -> Iterator[str]:
    name = s.step_key
    if s.kind == StepKind.COMPENSATION:
        name = f"undo {s.compensation_of}"
    yield f"{s.seq:>3}  {name:<30} {s.kind:<12} {s.state:<10} {len(s.attempts):>8}"
    if s.input is not None:
        yield f"       input  {preview(s.input)}"
    if s.result is not None:
        yield f"       result {preview(s.result)}"
    if s.state not in FINAL_STEP_STATES:
        yield from (f"       limit  {limit_text(v)}" for v in s.limits)
    yield from _attempt_lines(s.attempts, tracebacks)


def limit_text(v: LimitView) -> str:
    """A limit of a step not yet ended, and where it stands at it: ``concurrency 'svc' key 'a':
    3/3 in use; throttled, 2nd of 5 in line since ...``."""
    key = f" key {v.key!r}" if v.key else ""
    if v.kind == GateKind.RATE:
        per = f"{v.period:g} s" if v.period is not None else "?"
        what = f"rate limit {v.name!r}{key}: {v.units} of {v.limit} units per {per}"
        if v.in_use is not None:
            what += f", {v.in_use} granted in the window"
    else:
        what = f"concurrency {v.name!r}{key}" + (" (per run)" if v.run_level else "")
        what += (
            f": {v.in_use}/{v.limit} in use" if v.in_use is not None else f": {v.limit} at a time"
        )
    if v.status == GateSlotState.WAITING:
        place = f"{v.place} of {v.in_line}" if v.place and v.in_line else "waiting"
        what += f"; throttled, {place} in line since {when(v.since)}"
    elif v.status == GateSlotState.OFFERED:
        what += "; budget freed for it: dispatched to take it"
    elif v.status == GateSlotState.HELD:
        what += "; its run holds a slot" if v.run_level else "; holds a slot"
    if v.paused_until is not None:
        what += f"; paused until {when(v.paused_until)} (the service asked)"
    return what


def _attempt_lines(attempts: Sequence[AttemptView], tracebacks: bool) -> Iterator[str]:
    for a in attempts:
        took = seconds(a.claimed_at, a.finished_at)
        error = f"  {a.error_type}: {a.message}" if a.error_type else ""
        yield (
            f"       attempt {a.attempt:<2} {a.outcome:<9} {a.worker or '':<28} "
            f"{when(a.claimed_at)} {took:>8}{error[:100]}"
        )
        if tracebacks and a.traceback:
            yield from (f"         {line}" for line in a.traceback.rstrip().splitlines())
