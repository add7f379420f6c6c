"""Reading a run's detail (``RunsView.run_detail(...).to_json()``): its steps, attempts and times,
and what they tell: which attempts were lost, and which steps were read back from the journal."""

from __future__ import annotations

import datetime as dt
from collections.abc import Mapping, Sequence
from typing import Any

from saga.errors import InputError

Detail = Mapping[str, Any]


def run_of(detail: Detail) -> Mapping[str, Any]:
    """The run's own fields (``RunDetail`` keeps them at the top level)."""
    return detail


def steps_of(detail: Detail) -> list[Mapping[str, Any]]:
    return list(detail.get("steps") or [])


def action_steps(detail: Detail) -> list[Mapping[str, Any]]:
    """The steps a fork can start from: the run's own steps, not its compensations."""
    return [s for s in steps_of(detail) if s.get("kind") != "compensation"]


def waiting_event_names(detail: Detail) -> list[str]:
    return [str(w["name"]) for w in detail.get("waits") or [] if w.get("kind") == "event"]


def payload_of(detail: Detail, step_key: str | None, field: str) -> Any:
    """A step's (or, without a step, the run's) input, result or error, for the download."""
    if field not in ("input", "result", "error"):
        raise InputError(f"field={field!r}: use input, result or error")
    if step_key is None:
        return run_of(detail).get(field)
    for s in steps_of(detail):
        if s["step_key"] == step_key:
            return s.get(field)
    raise InputError(f"run {run_of(detail)['run_id']!r} has no step {step_key!r}")


def parse_time(value: Any) -> dt.datetime | None:
    if isinstance(value, dt.datetime):
        return value
    if isinstance(value, str) and value:
        try:
            return dt.datetime.fromisoformat(value)
        except ValueError:
            return None
    return None


def seconds_between(start: Any, end: Any) -> float | None:
    a, b = parse_time(start), parse_time(end)
    return (b - a).total_seconds() if a and b else None


def duration(start: Any, end: Any) -> str:
    s = seconds_between(start, end)
    if s is None:
        return ""
    return f"{s * 1000:.0f} ms" if s < 10 else f"{s:.1f} s"


def attempts_of(step: Mapping[str, Any]) -> list[Mapping[str, Any]]:
    return list(step.get("attempts") or [])


def outcome_of(attempt: Mapping[str, Any]) -> str:
    return str(attempt.get("outcome") or "running")


def resumptions(detail: Detail) -> list[dt.datetime]:
    """When the run resumed after an interruption: a lost attempt's end (its worker died), or
    an operator's retry. Steps completed before then were read back from the journal, not run
    again."""
    times = [
        parse_time(a.get("finished_at"))
        for s in steps_of(detail)
        for a in attempts_of(s)
        if outcome_of(a) == "lost"
    ]
    times += [
        parse_time(e.get("at")) for e in detail.get("events") or [] if e.get("event") == "retry"
    ]
    return sorted(t for t in times if t)


def read_back(
    step: Mapping[str, Any], run: Mapping[str, Any], resumed: Sequence[dt.datetime]
) -> str:
    """Why this step's result came from the journal rather than a new run of it, or ""."""
    if step.get("state") != "completed":
        return ""
    finished = parse_time(step.get("finished_at"))
    created = parse_time(run.get("created_at"))
    if finished and created and finished < created:
        return "copied from the journal of the run it was forked from"
    if finished and any(finished < t for t in resumed):
        return "read back from the journal after the run resumed, not run again"
    return ""


def anchor(step_key: str) -> str:
    return "".join(c if c.isalnum() or c in "-_" else f"_{ord(c):x}" for c in step_key)


def worker_process(worker: Any) -> str:
    """The process in a worker id (``host:pid:boot:delivery``): attempts are grouped by it."""
    if not worker:
        return "(no worker)"
    return ":".join(str(worker).split(":")[:2])
