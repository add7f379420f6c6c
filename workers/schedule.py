"""Runs started by Celery beat: one run per schedule tick, however often the tick is sent.

Beat sends ``saga.start`` with the entry's name (``schedule``). The publishing process (beat)
stamps the message with the time it fired, rounds that time down to the tick (the interval of
an interval schedule, the minute of a crontab or solar one) and names the run
``<entry>-<tick>`` (``run_id``). The period comes from beat's own entry (the one it is
applying, whatever its scheduler: django-celery-beat's too), else from the sending app's
``beat_schedule``: never from the worker's configuration, which may not hold the entry. A tick
sent twice (two beats by mistake, a beat restarted without its state) names the same run, and
starting a run is idempotent by id. A message with a schedule and no run id (sent by a process
without the engine installed) is named by the worker, from its own ``beat_schedule``.
"""

from __future__ import annotations

import datetime as dt
import hashlib
import math
import re
import time
from collections.abc import Mapping
from contextvars import ContextVar
from typing import Any

from saga.messages import START_TASK

MINUTE = 60.0  # the resolution of crontab and solar schedules
_NOT_IN_RUN_ID = re.compile(r"[^A-Za-z0-9_.\-]")


def period_of(schedule: Any) -> float:
    """Seconds between the ticks of a beat schedule (``run_every`` for an interval schedule)."""
    if isinstance(schedule, int | float) and schedule > 0:
        return float(schedule)
    if isinstance(schedule, dt.timedelta) and schedule.total_seconds() > 0:
        return schedule.total_seconds()
    every = getattr(schedule, "run_every", None)  # celery.schedules.schedule
    if type(schedule).__name__ == "schedule" and isinstance(every, dt.timedelta):
        return max(every.total_seconds(), 1.0)
    return MINUTE  # crontab, solar, or one we cannot read: ticks are at least a minute apart


def tick_of(fired_at: float, period: float) -> dt.datetime:
    """The tick a fire at ``fired_at`` belongs to. Beat fires an entry at least ``period`` after
    its previous fire, so two real ticks never share a bucket; two fires of one tick do."""
    return dt.datetime.fromtimestamp(math.floor(fired_at / period) * period, dt.UTC)


def scheduled_run_id(entry: str, tick: dt.datetime) -> str:
    """``<entry>-<YYYYmmddTHHMMSSZ>``, fit for a run id (letters, digits, ``_.-``, at most 200);
    an entry name that needed changing gets a short hash, so two names never collide."""
    safe = _NOT_IN_RUN_ID.sub("-", entry).lstrip("-_.")[:150] or "schedule"
    if safe != entry:
        safe = f"{safe}-{hashlib.sha256(entry.encode()).hexdigest()[:8]}"
    return f"{safe}-{tick:%Y%m%dT%H%M%SZ}"


def run_id_for(entry: str, beat_schedule: Mapping[str, Any] | None, fired_at: float | None) -> str:
    """The run id of a beat entry's tick. Without ``fired_at`` (a message sent by a process
    without the engine installed) the time of this call stands in for it."""
    spec = (beat_schedule or {}).get(entry)
    schedule = spec.get("schedule") if isinstance(spec, Mapping) else None
    when = time.time() if fired_at is None else fired_at
    return scheduled_run_id(entry, tick_of(when, period_of(schedule)))


# The beat entry being applied in this process (set around beat's Scheduler.apply_async).
_applying: ContextVar[Any] = ContextVar("saga_beat_entry", default=None)
# The caller's kwargs dict stamped by the last publish, and the keys added to it: removed again
# once the message is sent (Celery's body holds the caller's own dict, not a copy).
_stamped: ContextVar[tuple[dict[str, Any], tuple[str, ...]] | None] = ContextVar(
    "saga_stamped", default=None
)


def track_beat_entries(sender: Any = None, **_: Any) -> None:
    """``beat_init``/``beat_embedded_init``: note which entry beat is applying, so that the
    start it sends is named from that entry's own schedule."""
    scheduler: Any = getattr(sender, "scheduler", None)
    apply = getattr(scheduler, "apply_async", None)
    if apply is None or getattr(apply, "saga_tracked", False):
        return

    def apply_async(entry: Any, *args: Any, **kwargs: Any) -> Any:
        token = _applying.set(entry)
        try:
            return apply(entry, *args, **kwargs)
        finally:
            _applying.reset(token)

    apply_async.saga_tracked = True  # type: ignore[attr-defined]
    scheduler.apply_async = apply_async


def _schedule_of(entry: str, beat_schedule: Mapping[str, Any] | None) -> Any:
    """The schedule of beat entry ``entry``: the entry beat is applying, else the app's."""
    applying = _applying.get()
    if applying is not None and getattr(applying, "name", None) == entry:
        return getattr(applying, "schedule", None)
    spec = (beat_schedule or {}).get(entry)
    return spec.get("schedule") if isinstance(spec, Mapping) else None


def stamp_fired_at(
    sender: Any = None, body: Any = None, beat_schedule: Mapping[str, Any] | None = None, **_: Any
) -> None:
    """``before_task_publish``: stamp a scheduled start with the time it was sent (in beat's
    process, when it fires, before any queue delay) and, when this process knows the entry's
    schedule, the run id of its tick. The keys are added to the caller's dict only for the
    publish: ``restore_kwargs`` takes them out again."""
    if sender != START_TASK or not isinstance(body, tuple | list) or len(body) < 2:
        return
    restore_kwargs()  # a publish that failed before after_task_publish: its dict as it was
    kwargs = body[1]
    if not isinstance(kwargs, dict) or not kwargs.get("schedule"):
        return
    added: dict[str, Any] = {}
    if kwargs.get("fired_at") is None:
        added["fired_at"] = time.time()
    entry = kwargs["schedule"]
    schedule = _schedule_of(entry, beat_schedule) if isinstance(entry, str) else None
    if kwargs.get("run_id") is None and schedule is not None:
        fired_at = added.get("fired_at", kwargs.get("fired_at"))
        if isinstance(fired_at, int | float) and fired_at >= 0:
            added["run_id"] = scheduled_run_id(entry, tick_of(fired_at, period_of(schedule)))
    kwargs.update(added)
    _stamped.set((kwargs, tuple(added)))


def restore_kwargs(sender: Any = None, **_: Any) -> None:
    """``after_task_publish``: the caller's kwargs as they were before ``stamp_fired_at``."""
    stamped = _stamped.get()
    if stamped is None:
        return
    _stamped.set(None)
    kwargs, added = stamped
    for key in added:
        kwargs.pop(key, None)
