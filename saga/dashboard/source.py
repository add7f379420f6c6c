"""What the dashboard reads, all through ``saga.runs_view.RunsView`` (the same reads as
``saga list`` and ``saga show``), as JSON-ready dicts; and the list's query string read into a
``RunFilter``."""

from __future__ import annotations

import datetime as dt
from collections.abc import Mapping, Sequence
from typing import Any

from saga.dashboard.pages import RUN_STATES, ListParams
from saga.errors import RunNotFoundError, SagaError
from saga.runs_view import RunFilter, RunsView

MAX_LIMIT = 500


class FilterError(SagaError):
    """A filter in the query string cannot be read."""


class Source:
    def __init__(self, view: RunsView) -> None:
        self.view = view

    def list_runs(
        self, flt: RunFilter, *, newest_first: bool, limit: int, cursor: str | None
    ) -> tuple[list[dict[str, Any]], str | None]:
        page = self.view.list_runs(flt, newest_first=newest_first, limit=limit, cursor=cursor)
        return [r.to_json() for r in page.runs], page.next_cursor

    def count_by_state(self, flt: RunFilter) -> dict[str, int]:
        return self.view.count_by_state(flt)

    def run_detail(self, run_id: str) -> dict[str, Any]:
        detail = self.view.run_detail(run_id)
        if detail is None:
            raise RunNotFoundError(f"no run has id {run_id!r}")
        data: dict[str, Any] = detail.to_json()
        return data

    def close(self) -> None:
        self.view.close()


def _time(name: str, text: str | None) -> dt.datetime | None:
    """An ISO time; one without a zone (a datetime-local field) is UTC."""
    if not text:
        return None
    try:
        value = dt.datetime.fromisoformat(text)
    except ValueError:
        raise FilterError(
            f"{name}={text!r} is not a time: use ISO 8601, e.g. 2026-12-04T20:30 (UTC unless "
            f"it names a zone)"
        ) from None
    return value if value.tzinfo else value.replace(tzinfo=dt.UTC)


def list_params(
    query: Mapping[str, Sequence[str]],
) -> tuple[ListParams, RunFilter, str | None]:
    """The list's filters, order, page size and cursor from a query string."""

    def one(name: str) -> str | None:
        values = query.get(name)
        return (values[0].strip() or None) if values else None

    states = tuple(dict.fromkeys(s for s in query.get("state", ()) if s))
    unknown = [s for s in states if s not in RUN_STATES]
    if unknown:
        raise FilterError(f"unknown state {unknown[0]!r}: use one of {', '.join(RUN_STATES)}")
    order = one("order") or "newest"
    if order not in ("newest", "oldest"):
        raise FilterError(f"order={order!r}: use newest or oldest")
    try:
        limit = int(one("limit") or 50)
    except ValueError:
        raise FilterError("limit must be a whole number") from None
    if not 1 <= limit <= MAX_LIMIT:
        raise FilterError(f"limit must be between 1 and {MAX_LIMIT}")
    params = ListParams(
        states=states,
        saga=one("saga"),
        created_since=one("created_since"),
        created_until=one("created_until"),
        finished_since=one("finished_since"),
        finished_until=one("finished_until"),
        error_type=one("error_type"),
        run_id_prefix=one("run_id_prefix"),
        order=order,
        limit=limit,
    )
    flt = RunFilter(
        states=states,
        saga=params.saga,
        created_since=_time("created_since", params.created_since),
        created_until=_time("created_until", params.created_until),
        finished_since=_time("finished_since", params.finished_since),
        finished_until=_time("finished_until", params.finished_until),
        error_type=params.error_type,
        run_id_prefix=params.run_id_prefix,
    )
    return params, flt, one("cursor")
