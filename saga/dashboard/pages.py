"""The pages, rendered on the server. Every value goes through ``h``/``esc``."""

from __future__ import annotations

import datetime as dt
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass
from typing import Any
from urllib.parse import quote, urlencode

from saga.dashboard.html import Html, esc, h, join
from saga.runs_view import COUNT_CAP
from saga.states import RunState

RUN_STATES = tuple(s.value for s in RunState)


@dataclass(frozen=True)
class Chrome:
    """What every page shows around its content."""

    read_only: bool
    logged_in: bool  # show the log-out button
    csrf: str
    refresh_seconds: int = 0  # 0: no auto-refresh


def layout(title: str, body: Html, chrome: Chrome, *, refresh: bool = False) -> str:
    seconds = chrome.refresh_seconds if refresh else 0
    badge = h('<span class="badge ro">read-only</span>') if chrome.read_only else Html("")
    logout = (
        h(
            '<form method="post" action="/logout" class="inline">'
            '<input type="hidden" name="csrf" value="{}"><button>Log out</button></form>',
            chrome.csrf,
        )
        if chrome.logged_in
        else Html("")
    )
    return h(
        "<!doctype html>\n<html lang=en><head><meta charset=utf-8>"
        '<meta name="viewport" content="width=device-width, initial-scale=1">'
        "<title>{title} · saga</title>"
        '<link rel="stylesheet" href="/static/app.css">'
        '<script src="/static/app.js" defer></script></head>'
        '<body data-refresh="{seconds}"><header><a href="/" class="brand">durable-saga</a>'
        '<a href="/">Runs</a> {badge} <span class="spacer"></span>'
        '<span id="refresh-status"></span> {logout}</header>'
        "<main>{body}</main></body></html>",
        title=title,
        seconds=seconds,
        badge=badge,
        logout=logout,
        body=body,
    )


def when(value: Any) -> Html:
    if value is None or value == "":
        return Html("")
    if isinstance(value, str):
        try:
            value = dt.datetime.fromisoformat(value)
        except ValueError:
            return esc(value)
    if isinstance(value, dt.datetime):
        text = value.astimezone(dt.UTC).strftime("%Y-%m-%d %H:%M:%S.%f")[:-3] + "Z"
        return h('<time datetime="{}">{}</time>', value.isoformat(), text)
    return esc(value)


def state_badge(state: str) -> Html:
    return h('<span class="state state-{0}">{0}</span>', state)


def run_link(run_id: str) -> Html:
    return h('<a class="run-link" href="/runs/{}">{}</a>', quote(run_id, safe=""), run_id)


# -- the runs list -------------------------------------------------------------------------------


@dataclass(frozen=True)
class ListParams:
    """The list's filters as the query string had them (echoed back into the form)."""

    states: tuple[str, ...] = ()
    saga: str | None = None
    created_since: str | None = None
    created_until: str | None = None
    finished_since: str | None = None
    finished_until: str | None = None
    error_type: str | None = None
    run_id_prefix: str | None = None
    order: str = "newest"
    limit: int = 50

    def query(self, **extra: str) -> str:
        pairs: list[tuple[str, str]] = [("state", s) for s in self.states]
        for name in (
            "saga",
            "created_since",
            "created_until",
            "finished_since",
            "finished_until",
            "error_type",
            "run_id_prefix",
        ):
            value = getattr(self, name)
            if value:
                pairs.append((name, value))
        if self.order != "newest":
            pairs.append(("order", self.order))
        if self.limit != 50:
            pairs.append(("limit", str(self.limit)))
        pairs.extend(extra.items())
        return urlencode(pairs)


def _filter_form(p: ListParams) -> Html:
    boxes = join(
        h(
            '<label class="check"><input type="checkbox" name="state" value="{0}"{1}> {0}</label>',
            s,
            Html(" checked") if s in p.states else Html(""),
        )
        for s in RUN_STATES
    )

    def text(name: str, label: str, kind: str = "text") -> Html:
        return h(
            '<label>{label} <input type="{kind}" name="{name}" value="{value}"></label>',
            label=label,
            kind=kind,
            name=name,
            value=getattr(p, name) or "",
        )

    order = join(
        h('<option value="{0}"{1}>{0} first</option>', o, Html(" selected") if o == p.order else "")
        for o in ("newest", "oldest")
    )
    return h(
        '<form method="get" action="/" id="filters" class="filters">'
        "<fieldset><legend>State</legend>{boxes}</fieldset>"
        "<fieldset><legend>Run</legend>{saga}{prefix}{error}</fieldset>"
        "<fieldset><legend>Created (UTC)</legend>{cs}{cu}</fieldset>"
        "<fieldset><legend>Finished (UTC)</legend>{fs}{fu}</fieldset>"
        '<fieldset><legend>Order</legend><select name="order">{order}</select></fieldset>'
        '<div class="buttons"><button type="submit" id="apply-filters">Filter</button>'
        '<a href="/" class="button">Clear</a></div></form>',
        boxes=boxes,
        saga=text("saga", "saga"),
        prefix=text("run_id_prefix", "run id starts with"),
        error=text("error_type", "error type"),
        cs=text("created_since", "since", "datetime-local"),
        cu=text("created_until", "until", "datetime-local"),
        fs=text("finished_since", "since", "datetime-local"),
        fu=text("finished_until", "until", "datetime-local"),
        order=order,
    )


def runs_page(
    params: ListParams,
    runs: Sequence[Mapping[str, Any]],
    counts: Mapping[str, int],
    next_cursor: str | None,
    first_page: bool,
    chrome: Chrome,
) -> Html:
    count_items = join(
        h(
            '<li><a href="/?{q}" class="count" data-state="{s}">{badge} <b>{n}</b></a></li>',
            q=ListParams(**{**params.__dict__, "states": (s,)}).query(),
            s=s,
            badge=state_badge(s),
            n=_count(counts.get(s, 0)),
        )
        for s in RUN_STATES
    )
    rows = join(
        h(
            '<tr data-run-id="{id}" data-state="{state}"><td>{link}</td><td>{saga}</td>'
            "<td>{badge}</td><td>{created}</td><td>{updated}</td><td>{finished}</td>"
            '<td class="error">{error}</td></tr>',
            id=r["run_id"],
            state=r["state"],
            link=run_link(r["run_id"]),
            saga=r["saga"],
            badge=state_badge(r["state"]),
            created=when(r.get("created_at")),
            updated=when(r.get("updated_at")),
            finished=when(r.get("finished_at")),
            error=_short_error(r.get("error_type"), r.get("error_message")),
        )
        for r in runs
    )
    nav = []
    if not first_page:
        nav.append(h('<a href="/?{}" id="first-page">First page</a>', params.query()))
    if next_cursor:
        nav.append(
            h('<a href="/?{}" id="next-page">Next page →</a>', params.query(cursor=next_cursor))
        )
    empty = Html("") if runs else h('<p class="empty">No run matches these filters.</p>')
    body = h(
        "<h1>Runs</h1>{form}"
        '<ul class="counts" id="counts">{counts}</ul>'
        '<table id="runs"><thead><tr><th>run</th><th>saga</th><th>state</th><th>created</th>'
        "<th>updated</th><th>finished</th><th>error</th></tr></thead><tbody>{rows}</tbody></table>"
        '{empty}<nav class="pages">{nav}</nav>',
        form=_filter_form(params),
        counts=count_items,
        rows=rows,
        empty=empty,
        nav=join(nav, " "),
    )
    return body


def _count(n: int) -> str:
    return f"{n:,}+" if n >= COUNT_CAP else f"{n:,}"


def _short_error(error_type: Any, message: Any) -> Html:
    if not error_type and not message:
        return Html("")
    text = f"{error_type or ''}: {message or ''}".strip(": ")
    return esc(text if len(text) <= 120 else text[:119] + "…")


# -- confirmations, login, errors ----------------------------------------------------------------


ACTION_TITLES = {
    "retry": "Retry this run",
    "cancel": "Cancel this run",
    "fork": "Fork this run from a step",
    "event": "Send an event to this run",
}

ACTION_HELP = {
    "retry": "A failed run resumes at its failed steps; a compensation_failed run retries its "
    "failed compensation. Completed steps are read back from the journal, not run again.",
    "cancel": "Nothing new starts; the run's started steps with a compensation are undone in "
    "reverse order, and the run ends cancelled.",
    "fork": "A new run starts from this run's journal before the chosen step: that step and "
    "every step after it run again, under the definition the workers have now.",
    "event": "The event is delivered to the run's wait of that name, or kept until the run "
    "waits for it.",
}


def confirm_page(
    action: str,
    run_id: str,
    state: str,
    step_keys: Iterable[str],
    wait_names: Iterable[str],
    chrome: Chrome,
    step_key: str | None = None,
) -> str:
    fields: list[Html] = []
    if action == "cancel":
        fields.append(
            h('<label>reason <input name="reason" value="cancelled from the dashboard"></label>')
        )
    if action == "fork":
        options = join(
            h('<option value="{0}"{1}>{0}</option>', k, Html(" selected") if k == step_key else "")
            for k in step_keys
        )
        fields.append(h('<label>from step <select name="step_key">{}</select></label>', options))
        fields.append(h('<label>new run id (optional) <input name="new_run_id"></label>'))
    if action == "event":
        names = list(wait_names)
        fields.append(
            h(
                '<label>event name <input name="name" value="{}" required></label>',
                names[0] if names else "",
            )
        )
        fields.append(
            h(
                '<label>payload (JSON) <textarea name="payload_json" rows="6">null</textarea>'
                "</label>"
            )
        )
    body = h(
        '<h1>{title}</h1><p>Run {link} is {badge}.</p><p class="help">{help}</p>'
        '<form method="post" action="/runs/{qid}/{action}" class="confirm" id="confirm-form">'
        '<input type="hidden" name="csrf" value="{csrf}">{fields}'
        '<div class="buttons"><button type="submit" id="confirm" class="danger">Confirm: {verb}'
        '</button> <a href="/runs/{qid}" class="button" id="back">Back</a></div></form>',
        title=ACTION_TITLES[action],
        link=run_link(run_id),
        badge=state_badge(state),
        help=ACTION_HELP[action],
        qid=quote(run_id, safe=""),
        action=action,
        csrf=chrome.csrf,
        fields=join(fields),
        verb={"event": "send the event"}.get(action, action),
    )
    return layout(ACTION_TITLES[action], body, chrome)


def login_page(next_path: str, problem: str | None, chrome: Chrome) -> str:
    body = h(
        "<h1>Log in</h1>{problem}"
        '<form method="post" action="/login" class="confirm" id="login-form">'
        '<input type="hidden" name="next" value="{next}">'
        '<label>dashboard token <input type="password" name="token" autofocus required></label>'
        '<div class="buttons"><button type="submit">Log in</button></div></form>'
        '<p class="help">The token is the server\'s SAGA_DASHBOARD_TOKEN.</p>',
        problem=h('<p class="flash error">{}</p>', problem) if problem else "",
        next=next_path,
    )
    return layout("Log in", body, chrome)


def error_page(status: str, message: str, chrome: Chrome) -> str:
    body = h(
        '<h1>{}</h1><p class="flash error" id="error">{}</p><p><a href="/">Runs</a></p>',
        status,
        message,
    )
    return layout(status, body, chrome)
