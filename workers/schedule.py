"""Runs started by Celery beat: one run per schedule tick, however often the tick is sent.

Beat sends ``saga.start`` with the entry's name (``schedule``). The publishing process (beat)
stamps the message with the time it fired; the worker rounds that time down to the tick (the
interval of an interval schedule, the minute of a crontab or solar one) and names the run
``<entry>-<tick>``. A tick sent twice (two beats by mistake, a beat restarted without its
state) names the same run, and starting a run is idempotent by id.
"""

from __future__ import annotations

import datetime as dt
import hashlib
import math
import re
import time
from collections.abc import Mapping
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


def stamp_fired_at(sender: Any = None, body: Any = None, **_: Any) -> None:
    """``before_task_publish``: stamp a scheduled start with the time it was sent (in beat's
    process, when it fires), before any queue delay."""
    if sender != START_TASK or not isinstance(body, tuple | list) or len(body) < 2:
        return
    kwargs = body[1]
    if isinstance(kwargs, dict) and kwargs.get("schedule") and kwargs.get("fired_at") is None:
        kwargs["fired_at"] = time.time()
